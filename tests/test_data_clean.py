"""Cleaning steps and deduplication of the data pipeline, each on crafted documents."""
import random

import numpy as np
import pytest

from fastlm.data.clean import CleanConfig, clean_document, repeated_line_frac, symbol_ratio
from fastlm.data.dedup import DedupConfig, Deduper, DedupHasher, lsh_params

OFF = dict(nfc=False, controls=False, whitespace=False)


def run(doc, **cfg):
    report = {}
    return clean_document(doc, CleanConfig(**cfg), report), report


def test_invalid_utf8_replace_and_drop():
    bad = b"caf\xc3\xa9 \xff\xfe ok"
    text, report = run(bad)
    assert text == "café \ufffd\ufffd ok" and report["invalid_utf8_replaced"] == 1
    text, report = run(bad, invalid_utf8="drop")
    assert text is None and report["dropped_invalid_utf8"] == 1
    text, report = run("lone \ud800 surrogate")  # str from JSON can be invalid too
    assert text == "lone \ufffd\ufffd\ufffd surrogate" and report["invalid_utf8_replaced"] == 1
    assert run(b"fine \xe2\x9c\x93")[0] == "fine \u2713"


def test_nfc():
    decomposed = "cafe\u0301"  # e + combining acute
    text, report = run(decomposed)
    assert text == "caf\u00e9" and report["nfc_changed"] == 1
    assert run(decomposed, nfc=False)[0] == decomposed


def test_controls_removed_but_newlines_and_tabs_kept():
    text, report = run("a\x00b\x07c\td\ne\x1b[0m\ufefff\x85", whitespace=False)
    assert text == "abc\td\ne[0mf" and report["control_chars_removed"] == 5
    assert run("a\x00b", controls=False, whitespace=False)[0] == "a\x00b"


def test_whitespace_normalisation_keeps_indentation():
    doc = "\n\n  def f():\r\n\u00a0   return 1   \r\n\n\n\n\nx = 2\t \n\n"
    text, report = run(doc)
    assert text == "  def f():\n    return 1\n\nx = 2" and report["whitespace_changed"] == 1
    assert run(doc, whitespace=False, controls=False)[0] == doc


def test_lowercase_optional():
    assert run("Hello World")[0] == "Hello World"
    assert run("Hello World", lowercase=True)[0] == "hello world"


def test_pii_scrubbing():
    doc = ("Mail jane.doe+work@mail.example.org or call (555) 123-4567, +44 20 7946 0958 or "
           "555.987.6543. Hosts 10.0.0.254 and 2001:db8:85a3::8a2e:370:7334.\n"
           "Not PII: v1.2.3, 2024-01-15, 12:30:45, std::vector, a::b, 999.1.1.1, id 1234567890")
    text, report = run(doc, pii=True)
    assert text == ("Mail <EMAIL> or call <PHONE>, <PHONE> or <PHONE>. Hosts <IP> and <IP>.\n"
                    "Not PII: v1.2.3, 2024-01-15, 12:30:45, std::vector, a::b, 999.1.1.1, "
                    "id 1234567890")
    assert (report["pii_emails"], report["pii_phones"], report["pii_ips"]) == (1, 3, 2)
    assert run(doc)[0] == doc  # off by default


@pytest.mark.parametrize("doc,cfg,reason", [
    ("   \n\t ", {}, "dropped_empty"),
    ("short", {"min_chars": 10}, "dropped_too_short"),
    ("x" * 50, {"max_chars": 40}, "dropped_too_long"),
    ("#$%^&*(){}[] ok", {"max_symbol_ratio": 1.0}, "dropped_symbol_ratio"),
    ("buy now\nbuy now\nbuy now\nbuy now\nreal line", {"max_repeated_line_frac": 0.5},
     "dropped_repeated_lines"),
])
def test_quality_filters(doc, cfg, reason):
    text, report = run(doc, **cfg)
    assert text is None and report[reason] == 1
    looser = {k: (None if k.startswith("max") else 0) for k in cfg}
    if reason != "dropped_empty":
        assert run(doc, **looser)[0] is not None


def test_filter_measures():
    assert symbol_ratio("ab!!") == 1.0 and symbol_ratio("a b") == 0.0
    assert symbol_ratio("!!!") == float("inf")
    assert repeated_line_frac("a\nb\na\n\na") == pytest.approx(0.5)
    assert repeated_line_frac("") == 0.0


def test_language_filter():
    pytest.importorskip("py3langid", reason="language id needs the optional py3langid package")
    en = "The quick brown fox jumps over the lazy dog while the farmer watches from the hill."
    fr = "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde."
    assert run(en, languages=("en",))[0] == en
    text, report = run(fr, languages=("en",))
    assert text is None and report["dropped_language"] == 1


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="invalid_utf8"):
        CleanConfig(invalid_utf8="ignore")
    with pytest.raises(ValueError, match="min_chars"):
        CleanConfig(min_chars=10, max_chars=5)


# -- deduplication -------------------------------------------------------------------------

def _doc(rng, vocab, n=300):
    return " ".join(rng.choice(vocab) for _ in range(n))


def _perturb(rng, vocab, doc, n_changes):
    words = doc.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def test_lsh_params_bracket_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(t, 128)
        assert bands * rows <= 128 and abs((1 / bands) ** (1 / rows) - t) < 0.05


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    h = DedupHasher(DedupConfig(num_perm=256))
    a = _doc(rng, vocab, 500)
    for changes in (5, 30, 100):
        b = _perturb(rng, vocab, a, changes)
        sa, sb = set(h.shingles(a).tolist()), set(h.shingles(b).tolist())
        jaccard = len(sa & sb) / len(sa | sb)
        estimate = float(np.mean(h.signature(a) == h.signature(b)))
        assert abs(estimate - jaccard) < 0.1, (changes, jaccard, estimate)


def test_exact_and_near_duplicates_removed_distinct_kept():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    originals = [_doc(rng, vocab) for _ in range(20)]
    near = [_perturb(rng, vocab, d, 3) for d in originals[:8]]  # ~95% Jaccard
    far = [_perturb(rng, vocab, d, 120) for d in originals[8:12]]  # <30% Jaccard: distinct
    exact = originals[12:16]
    docs = originals + near + far + exact
    h, dd = DedupHasher(DedupConfig()), Deduper(DedupConfig())
    reasons = [dd.check_and_add(*h.keys(d)) for d in docs]
    assert reasons[:20] == [None] * 20
    assert reasons[20:28] == ["dropped_near_dup"] * 8
    assert reasons[28:32] == [None] * 4
    assert reasons[32:] == ["dropped_exact_dup"] * 4


def test_dedup_keys_deterministic_across_instances():
    text = "the same words in the same order every time " * 20
    k1 = DedupHasher(DedupConfig()).keys(text)
    k2 = DedupHasher(DedupConfig()).keys(text)
    assert k1[0] == k2[0] and np.array_equal(k1[1], k2[1])
    assert DedupHasher(DedupConfig()).keys("tiny")[1].size == lsh_params(0.8, 128)[0]
    assert DedupHasher(DedupConfig()).keys("!!! ???")[1].size == 0  # no words: no LSH keys


def test_dedup_log_reload(tmp_path):
    cfg = DedupConfig()
    h = DedupHasher(cfg)
    dd = Deduper(cfg)
    dd.open_log(tmp_path / "log", 0)
    dd.check_and_add(*h.keys("first document with some words in it"))
    length = dd.flush_log()
    dd.check_and_add(*h.keys("second document, logged after the checkpoint"))
    dd.close()
    again = Deduper(cfg)
    again.open_log(tmp_path / "log", length)  # the second key is past the checkpoint: forgotten
    assert again.check_and_add(*h.keys("first document with some words in it")) == "dropped_exact_dup"
    assert again.check_and_add(*h.keys("second document, logged after the checkpoint")) is None
    again.close()
