"""Scores that need no model: classification accuracy and macro-F1, and BLEU/chrF via sacrebleu.

BLEU and chrF are sacrebleu's corpus scores with its standard settings (13a tokenisation for
BLEU, character 6-grams with beta 2 for chrF); the returned signature string says exactly which,
so numbers are comparable with published ones.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def accuracy(predictions: Sequence, golds: Sequence) -> float:
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"accuracy: need equally many predictions and golds (> 0), got "
                         f"{len(predictions)} and {len(golds)}")
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def macro_f1(predictions: Sequence, golds: Sequence) -> float:
    """Mean over classes (those in golds or predictions) of F1 = 2TP / (2TP + FP + FN), the
    definition scikit-learn's f1_score(average="macro") uses."""
    accuracy(predictions, golds)  # the same argument checks
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g in zip(predictions, golds):
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    classes = set(predictions) | set(golds)
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes) / len(classes)


def majority_baseline(train_labels: Sequence, test_labels: Sequence) -> float:
    """Accuracy of always answering the most frequent training label."""
    top = Counter(train_labels).most_common(1)[0][0]
    return sum(g == top for g in test_labels) / len(test_labels)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (0-100) of hypotheses against one reference each, with sacrebleu's
    signatures. Needs `pip install sacrebleu`."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU/chrF need sacrebleu: pip install sacrebleu "
                          "(or pip install 'fastlm[eval]')") from None
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"bleu: need equally many hypotheses and references (> 0), got "
                         f"{len(hypotheses)} and {len(references)}")
    hyps, refs = list(hypotheses), [list(references)]
    b = sacrebleu.metrics.BLEU()
    c = sacrebleu.metrics.CHRF()
    bleu_score, chrf_score = b.corpus_score(hyps, refs), c.corpus_score(hyps, refs)
    return {"bleu": bleu_score.score, "chrf": chrf_score.score,
            "bleu_signature": str(b.get_signature()), "chrf_signature": str(c.get_signature())}
