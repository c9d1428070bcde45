"""fastlm.models.bert: the BERT-style encoder with the masked-LM objective.

Shapes, the masking statistics of make_batch (15% chosen; 80/10/10), loss on an overfit batch,
bidirectionality (the opposite of the causal test), padding masks, the trainer end to end with
exact resume, masked accuracy / pseudo-perplexity (fastlm.mlm_eval, fastlm.eval), the Hugging
Face BertForMaskedLM export (equal logits), and [CLS]-pooled classification fine-tuning on the
demo task beating the majority class.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from fastlm import checkpoint, models
from fastlm.config import ConfigError, ModelConfig
from fastlm.models.bert import BERT, IGNORE, SPECIALS, mask_tokens, sinusoids
from fastlm.train.optim import AdamW


def tiny_config(**over) -> ModelConfig:
    kw = {"preset": "", "arch": "bert", "vocab_size": 256, "block_size": 32, "n_layer": 2,
          "n_head": 4, "n_embd": 32, "norm_eps": 1e-12}
    kw.update(over)
    return ModelConfig(**kw)


def tiny_bert(seed: int = 0, scale: float = 0.0, **over) -> BERT:
    torch.manual_seed(seed)
    model = models.build(tiny_config(**over))
    if scale:  # weights larger than the init's so outputs are far from uniform
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Model
def test_registered_with_reserved_specials_above_the_vocab():
    assert "bert" in models.available()
    model = tiny_bert()
    assert isinstance(model, BERT) and model.objective == "masked" and model.pooling == "first"
    assert (model.pad_id, model.cls_id, model.sep_id, model.mask_id) == (256, 257, 258, 259)
    assert model.n_tokens == 256 + len(SPECIALS) == model.wte.weight.shape[0]
    assert model.lm_head.weight is model.wte.weight  # tied decoder
    torch.testing.assert_close(model.wpe.weight, sinusoids(32, 32, std=0.06))  # the init
    odd = sinusoids(10, 7, std=0.5)
    assert odd.shape == (10, 7) and abs(odd.std().item() - 0.5) < 1e-6
    torch.testing.assert_close(odd[0, 1::2] / odd[0, 1], torch.ones(3))  # cos(0) columns
    untied = tiny_bert(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_forward_shapes_and_loss_only_at_masked_positions():
    model = tiny_bert(scale=0.2)
    x = torch.randint(0, 256, (3, 17))
    logits, loss = model(x)
    assert logits.shape == (3, 17, 260) and loss is None
    inputs, targets = model.make_batch(x, x, torch.Generator().manual_seed(0))
    no_logits, loss = model(inputs, targets)
    assert no_logits is None and loss.shape == () and torch.isfinite(loss)
    # the gathered-rows loss equals the cross-entropy of the full logits at the masked rows
    full, loss2 = model(inputs, targets, return_logits=True)
    expect = F.cross_entropy(full.reshape(-1, 260), targets.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no position to predict"):
        model(x, torch.full_like(x, IGNORE))
    with pytest.raises(ValueError, match="exceeds model.block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="masked model"):
        model.generate(x, 3)


@pytest.mark.parametrize("over,message", [({"bias": False}, "model.bias=false"),
                                          ({"n_head": 5}, "divisible by model.n_head"),
                                          ({"n_kv_head": 2}, "grouped-query")])
def test_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        models.build(tiny_config(**over))


def test_output_at_t_depends_on_later_tokens():
    """The opposite of the causal test: changing only tokens after t changes the output at t
    (and changing tokens before t changes it too)."""
    model = tiny_bert(scale=0.2)
    x = torch.randint(0, 256, (1, 16))
    base = model(x)[0]
    for t in range(15):
        y = x.clone()
        y[0, t + 1:] = (y[0, t + 1:] + 1) % 256
        assert not torch.allclose(model(y)[0][0, t], base[0, t]), f"position {t} sees no future"
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 256
    assert not torch.allclose(model(y)[0][0, -1], base[0, -1])


def test_padding_is_masked_out_with_lengths():
    model = tiny_bert(scale=0.2)
    x = torch.randint(0, 256, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    a = model.encode(x)
    b = model.encode(padded, lengths=torch.tensor([9]))[:, :9]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.encode(padded)[:, :9], a, atol=1e-4)  # unmasked pads leak


def test_token_types_change_the_output():
    model = tiny_bert(scale=0.2)
    x = torch.randint(0, 256, (2, 10))
    types = torch.zeros_like(x)
    types[:, 5:] = 1
    assert not torch.allclose(model(x)[0], model(x, token_type_ids=types)[0])


def test_loss_falls_on_an_overfit_batch():
    model = tiny_bert().train()
    opt = AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    inputs, targets = model.make_batch(x, x, torch.Generator().manual_seed(2))  # one batch
    losses = []
    for _ in range(60):
        _, loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(260) at init
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0], losses[-10:]


# ---------------------------------------------------------------------------------------------
# Masking statistics
def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_masking_statistics():
    V, p = 256, 0.15
    x = torch.randint(0, V, (128, 256), generator=torch.Generator().manual_seed(0))
    inputs, targets = mask_tokens(x, p, V, mask_id=V + 3,
                                  generator=torch.Generator().manual_seed(1))
    chosen = targets != IGNORE
    n = x.numel()
    assert _within(int(chosen.sum()), n, p)
    # targets are the originals at chosen positions; the rest is untouched
    assert torch.equal(targets[chosen], x[chosen])
    assert torch.equal(inputs[~chosen], x[~chosen])
    m = int(chosen.sum())
    masked = inputs[chosen] == V + 3
    replaced = (inputs[chosen] != x[chosen]) & ~masked
    kept = inputs[chosen] == x[chosen]
    assert _within(int(masked.sum()), m, 0.8)
    # a random draw equals the original with probability 1/V: it then counts as kept
    assert _within(int(replaced.sum()), m, 0.1 * (1 - 1 / V))
    assert _within(int(kept.sum()), m, 0.1 + 0.1 / V)
    # random replacements are ordinary ids, never a reserved special
    assert int(inputs[chosen & (inputs != V + 3)].max()) < V


def test_random_replacement_never_draws_a_special():
    model = tiny_bert(vocab_size=5, block_size=64)  # few ids: every id is drawn many times
    x = torch.randint(0, 5, (256, 64))
    inputs, targets = model.make_batch(x, x, torch.Generator().manual_seed(0))
    specials = {model.pad_id, model.cls_id, model.sep_id}
    assert not any(int(v) in specials for v in inputs.unique())
    replaced = (targets != IGNORE) & (inputs != model.mask_id) & (inputs != x)
    assert int(replaced.sum()) > 100 and int(inputs[replaced].max()) < 5


def test_at_least_one_masked_per_row_and_deterministic():
    x = torch.randint(0, 256, (200, 8))
    # p = 0.01 over 8 tokens: ~92% of rows would draw nothing without the fallback
    inputs, targets = mask_tokens(x, 0.01, 256, 259, torch.Generator().manual_seed(3))
    assert bool(((targets != IGNORE).sum(1) >= 1).all())
    again = mask_tokens(x, 0.01, 256, 259, torch.Generator().manual_seed(3))
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    other = mask_tokens(x, 0.01, 256, 259, torch.Generator().manual_seed(4))
    assert not torch.equal(targets, other[1])
    # the generator advances by the same amount whatever the content (resume replays masks)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mask_tokens(x, 0.15, 256, 259, g1)
    mask_tokens(torch.zeros_like(x), 0.15, 256, 259, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


# ---------------------------------------------------------------------------------------------
# Trainer, resume, evaluation
TEXT = ("def greet(name):\n    return 'hello, ' + name\n\n"
        "class Point:\n    x: int = 0\n    y: int = 0\n\n") * 60

TINY = ["--model.preset=tiny-bert", "--model.arch=bert", "--model.n_layer=1",
        "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
        "--train.batch_size=8", "--optim.lr=1e-2", "--optim.warmup_steps=5", "--eval.batches=2",
        "--train.log_interval=5", "--train.progress=false", "--eval.interval=10"]


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "val"]


def test_trainer_runs_bert_resumes_exactly_and_evaluates(tmp_path, capsys):
    from fastlm.eval.core import main as eval_main
    from fastlm.train.loop import main
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    common = [f"--data={corpus}", *TINY]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight), "--train.max_steps=20"]) == 0
    out = capsys.readouterr().out
    assert "(bert)" in out and "--- sample" not in out  # a masked model prints no sample
    val = _metrics(straight)
    assert val[0]["val_loss"] > 5.0 and val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    main([*common, "--out", str(split), "--train.max_steps=20", "--checkpoint.interval=10"])
    import shutil
    shutil.rmtree(split / "checkpoints" / "step_000020")
    resumed = tmp_path / "resumed"
    main([*common, "--out", str(resumed), "--train.max_steps=20",
          f"--checkpoint.resume={split}"])
    from safetensors.torch import load_file
    wa, wb = (load_file(checkpoint.load(d).path / "model.safetensors") for d in (straight,
                                                                                 resumed))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    assert _metrics(resumed)[-1]["val_loss"] == val[-1]["val_loss"]
    # python -m fastlm.eval on the run: masked accuracy and pseudo-perplexity, not perplexity
    res = tmp_path / "res.json"
    assert eval_main(["--checkpoint", str(straight), "--no-progress", "--json", str(res)]) == 0
    scores = json.loads(res.read_text())
    assert 0 < scores["masked_accuracy"] <= 1 and scores["masked_tokens"] > 0
    assert 1 < scores["pseudo_perplexity"] < 260 and "perplexity" not in scores
    assert math.isclose(scores["pseudo_perplexity"], math.exp(scores["pseudo_nll"]))


def test_pseudo_perplexity_masks_each_token_alone():
    from fastlm.eval.mlm import even_windows, mlm_scores, pseudo_nll
    from fastlm.tokenizer import Tokenizer
    model = tiny_bert(scale=0.2)
    w = torch.randint(0, 256, (12,))
    got = pseudo_nll(model, w, batch_size=5)  # batches that do not divide T
    for t in range(12):
        x = w.clone()
        x[t] = model.mask_id
        logp = F.log_softmax(model(x[None])[0][0, t], -1)
        torch.testing.assert_close(got[t], -logp[w[t]], rtol=1e-5, atol=1e-5)
    assert even_windows(list(range(100)), 10, 3)[:, 0].tolist() == [0, 40, 90]
    scores = mlm_scores(model, Tokenizer.byte(), "some text to score " * 20, context=16,
                        ppl_context=16, ppl_windows=2)
    assert scores["pseudo_tokens"] == 32 and 0 <= scores["masked_accuracy"] <= 1
    assert math.isclose(scores["pseudo_bits_per_byte"], scores["pseudo_nll"] / math.log(2))


# ---------------------------------------------------------------------------------------------
# Hugging Face export
@pytest.mark.parametrize("tie", [True, False])
def test_export_to_bert_for_masked_lm_logits_equal(tmp_path, tie):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from fastlm.export.hf import export_hf
    from fastlm.tokenizer import Tokenizer
    model = tiny_bert(scale=0.2, tie_embeddings=tie)
    export_hf(model, tmp_path, Tokenizer.byte())
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, local_files_only=True)
    hf = hf.eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    idx = torch.randint(0, model.n_tokens, (2, 23))  # specials included
    types = (torch.arange(23) >= 11).long().expand(2, 23)
    with torch.no_grad():
        theirs = hf(idx, token_type_ids=types).logits
        ours = model(idx, token_type_ids=types)[0]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # a right-padded batch: transformers' attention_mask == fastlm's lengths
        lengths = torch.tensor([23, 15])
        mask = (torch.arange(23)[None] < lengths[:, None]).long()
        theirs = hf(idx, attention_mask=mask).logits
        ours = model(idx, lengths=lengths)[0]
        torch.testing.assert_close(theirs[1, :15], ours[1, :15], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert hf_tok.mask_token_id == model.mask_id and hf_tok.cls_token_id == model.cls_id
    assert hf_tok("ab[MASK]c").input_ids == [97, 98, model.mask_id, 99]


# ---------------------------------------------------------------------------------------------
# Classification fine-tuning with [CLS] pooling
def test_classifier_pools_cls_and_ignores_padding():
    from fastlm.models.classifier import Classifier
    clf = Classifier(tiny_bert(scale=0.2), 3).eval()
    seq = torch.randint(1, 256, (1, 7))
    padded = torch.cat([seq, torch.zeros(1, 4, dtype=torch.long)], 1)
    a, _ = clf(seq)
    b, _ = clf(padded, lengths=torch.tensor([7]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    cls = torch.cat([torch.tensor([[clf.gpt.cls_id]]), seq], 1)
    torch.testing.assert_close(clf.head(clf.gpt.encode(cls)[:, 0]), a)
    full = torch.randint(1, 256, (1, 32))  # block_size tokens: the last one makes room for CLS
    assert clf(full)[0].shape == (1, 3)


def test_classification_finetune_on_demo_task_beats_majority(tmp_path):
    from fastlm.data.text import stdlib_files
    from fastlm.eval.demo_tasks import _line_kinds
    from fastlm.eval.core import main as eval_main
    from fastlm.finetune.loop import main as finetune_main
    from fastlm.eval.tasks import write_jsonl
    _, files = stdlib_files()
    rng = random.Random(0)
    rows = []  # the demo task's labelling (code / comment / docstring) on some stdlib files
    for path in files[:150]:
        rows += _line_kinds(path.read_text(encoding="utf-8", errors="replace"), rng, 3)
    rng.shuffle(rows)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, rows[:-200])
    write_jsonl(test, rows[-200:])
    model = tiny_bert(n_embd=64, n_head=2, block_size=128).train()
    base = tmp_path / "base"
    checkpoint.save(base, 1, model, AdamW(model.parameters()), {"step": 1},
                    {"model": dict(vars(model.config))})
    out = tmp_path / "clf"
    finetune_main(["--checkpoint", str(base), "--task", "classify", "--data", str(train),
                   "--out", str(out), "--train.max_steps=120", "--eval.interval=40",
                   "--train.progress=false", "--optim.lr=1e-3"])
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["best"]["val_accuracy"] > summary["majority_baseline"] + 0.1, summary
    res = tmp_path / "res.json"
    eval_main(["--checkpoint", str(out), "--task", str(test), "--task-type", "classify",
               "--json", str(res), "--no-progress"])
    labels = [json.loads(line)["label"] for line in test.read_text().splitlines()]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    assert json.loads(res.read_text())["accuracy"] > majority + 0.1


def test_sft_refuses_a_masked_model(tmp_path):
    from fastlm.finetune.loop import main as finetune_main
    from fastlm.eval.tasks import write_jsonl
    model = tiny_bert()
    base = tmp_path / "base"
    checkpoint.save(base, 1, model, AdamW(model.parameters()), {"step": 1},
                    {"model": dict(vars(model.config))})
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": "a", "response": "b"}] * 4)
    with pytest.raises(SystemExit, match="--task sft needs a causal model"):
        finetune_main(["--checkpoint", str(base), "--task", "sft", "--data", str(data),
                       "--out", str(tmp_path / "o")])
