"""fastlm.eval: perplexity / bits per byte against hand computations, sliding windows, multiple
choice log-likelihoods, BLEU against sacrebleu, classification metrics, the CLI and its errors.

Random-init tiny models: every property here holds for any weights, so no training is needed.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import checkpoint
from fastlm.checkpoint import CheckpointError
from fastlm.config import ModelConfig
from fastlm.eval.core import (
    bits_per_byte,
    bleu,
    loglikelihood,
    main,
    multiple_choice_accuracy,
    perplexity,
    token_nll,
    windows,
)
from fastlm.eval.scores import accuracy, macro_f1, majority_baseline
from fastlm.models.gpt import GPT
from fastlm.train.optim import AdamW
from fastlm.restore import load
from fastlm.eval.tasks import TaskError, read_jsonl, write_jsonl
from fastlm.tokenizer import Tokenizer


def tiny(arch="gpt2", block=16) -> GPT:
    cfg = ModelConfig(preset="", arch=arch, vocab_size=256, block_size=block, n_layer=2,
                      n_head=2, n_embd=32, mlp_hidden=64 if arch == "llama" else 0)
    return GPT(cfg).eval()


def save_run(tmp_path, model, extra=None):
    cfg = {"model": {k: v for k, v in vars(model.config).items()}, **(extra or {})}
    run = tmp_path / "run"
    checkpoint.save(run, 5, model, AdamW(model.parameters()), {"step": 5}, cfg)
    (run / "metrics.jsonl").write_text("")
    return run


def test_perplexity_is_exp_mean_nll_by_hand():
    model = tiny()
    ids = torch.randint(0, 256, (17,))  # one window: 16 inputs, 16 targets
    logits, _ = model(ids[None, :-1])
    by_hand = math.exp(F.cross_entropy(logits[0].double(), ids[1:]).item())
    assert perplexity(model, ids.tolist()) == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stride_equal_context_is_non_overlapping(arch):
    model = tiny(arch)
    ids = torch.randint(0, 256, (16 * 3 + 7,))  # 3 full windows and a short one
    nll = token_nll(model, ids.tolist(), context=16, stride=16, batch_size=3)
    x, y = ids[:-1], ids[1:]
    chunks = []
    for b in range(0, len(y), 16):
        logits, _ = model(x[None, b:b + 16])
        chunks.append(F.cross_entropy(logits[0].double(), y[b:b + 16], reduction="none"))
    torch.testing.assert_close(nll, torch.cat(chunks).detach(), rtol=1e-5, atol=1e-5)


def test_sliding_window_scores_each_token_once_with_enough_context():
    model = tiny()
    ids = torch.randint(0, 256, (50,))
    assert [w[2] for w in windows(49, 16, 4)] == [0, 16, 20, 24, 28, 32, 36, 40, 44, 48][:10]
    nll = token_nll(model, ids.tolist(), context=16, stride=4, batch_size=4)
    assert not torch.isnan(nll).any()
    # target 30 is scored by the window starting at 16 (it covers inputs 16..31)
    logits, _ = model(ids[None, 16:32])
    want = -F.log_softmax(logits[0, 30 - 16].double(), -1)[ids[31]]
    assert nll[30].item() == pytest.approx(want.item(), rel=1e-5)


def test_bits_per_byte_with_byte_and_multibyte_tokens():
    model = tiny()
    tok = Tokenizer.byte()
    text = "def f(x):\n    return x * 2  # é\n"
    nll = token_nll(model, tok.encode_ordinary(text))
    assert bits_per_byte(model, tok, text) == pytest.approx(nll.mean().item() / math.log(2))


def test_multiple_choice_matches_hand_log_likelihood():
    model = tiny()
    tok = Tokenizer.byte()
    ctx, cont = tok.encode_ordinary("ab"), tok.encode_ordinary("cde")
    seq = torch.tensor(ctx + cont)
    by_hand = 0.0
    for i in range(len(ctx), len(seq)):  # log p(seq[i] | seq[:i]) from a fresh forward each
        logits, _ = model(seq[None, :i])
        by_hand += F.log_softmax(logits[0, -1].double(), -1)[seq[i]].item()
    (ll, _), = loglikelihood(model, [(ctx, cont)])
    assert ll == pytest.approx(by_hand, rel=1e-5)
    # and a choice the model itself prefers wins both scores
    examples = [{"context": "ab", "choices": ["cde", "zzzzzzzz"], "label": 0}]
    ll_other = loglikelihood(model, [(ctx, tok.encode_ordinary("zzzzzzzz"))])[0][0]
    res = multiple_choice_accuracy(model, tok, examples)
    assert res["accuracy"] == float(ll > ll_other)
    assert res["accuracy_norm"] == float(ll / 3 > ll_other / 8)


def test_loglikelihood_batched_equals_single_and_truncates_left():
    model = tiny()
    reqs = [([1, 2, 3], [4, 5]), ([7] * 30, [8, 9, 10]), ([11], [12])]
    batched = loglikelihood(model, reqs, batch_size=3)
    single = [loglikelihood(model, [r], batch_size=1)[0] for r in reqs]
    for (a, _), (b, _) in zip(batched, single):
        assert a == pytest.approx(b, rel=1e-5)


def test_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello world"]
    res = bleu(hyps, refs)
    assert res["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert res["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert res["bleu_signature"].startswith("nrefs:1|")


def test_classification_metrics_by_hand():
    preds, golds = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert accuracy(preds, golds) == 0.5
    # a: tp1 fp1 fn0 -> 2/3; b: tp1 fp0 fn2 -> 2/4; c: tp0 fp1 -> 0
    assert macro_f1(preds, golds) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert majority_baseline(["x", "x", "y"], ["x", "y"]) == 0.5


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a", "choices": ["b", "c"], "label": 1}\n\n'
                 '{"context": "a", "label": 0}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl:3: missing field 'choices'"):
        read_jsonl(f, "mc")
    f.write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(TaskError, match=r"t\.jsonl:2: not valid JSON"):
        read_jsonl(f, "classify")
    f.write_text("\n\n")
    with pytest.raises(TaskError, match=r"t\.jsonl: no examples"):
        read_jsonl(f, "generate")
    f.write_text('{"context": "a", "choices": ["b", "c"], "label": 2}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl:1: label 2 is outside"):
        read_jsonl(f, "mc")


def test_cli_text_and_mc_json_and_metrics(tmp_path, capsys):
    model = tiny()
    run = save_run(tmp_path, model)
    text = tmp_path / "held.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 5)
    out = tmp_path / "res.json"
    main(["--checkpoint", str(run), "--text", str(text), "--json", str(out), "--no-progress",
          "--context", "16", "--stride", "8", "--precision", "fp32"])  # vs an fp32 oracle
    res = json.loads(out.read_text())
    ids = list(text.read_bytes())
    assert res["perplexity"] == pytest.approx(perplexity(model, ids, 16, 8), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(math.log2(res["perplexity"]), rel=1e-6)
    assert "perplexity" in capsys.readouterr().out
    mc = tmp_path / "mc.jsonl"
    write_jsonl(mc, [{"context": "import ", "choices": ["os", "xx"], "label": 0}] * 3)
    main(["--checkpoint", str(run), "--task", str(mc), "--task-type", "mc", "--no-progress"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["eval", "eval"] and "accuracy" in rows[1]


def test_cli_generate_scores_with_sacrebleu(tmp_path):
    pytest.importorskip("sacrebleu")
    run = save_run(tmp_path, tiny())
    task = tmp_path / "gen.jsonl"
    write_jsonl(task, [{"source": "def ", "reference": "f(x):"}, {"source": "x", "reference": "y"}])
    out = tmp_path / "g.json"
    main(["--checkpoint", str(run), "--task", str(task), "--task-type", "generate",
          "--max-new-tokens", "4", "--json", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert {"bleu", "chrf", "bleu_signature"} <= set(res) and res["examples"] == 2


def test_bad_checkpoints_are_named(tmp_path):
    run = save_run(tmp_path, tiny())
    manifest = next((run / "checkpoints").iterdir()) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["config"]["model"]["n_embd"] = 64  # weights of another shape than the config says
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not fit"):
        load(run)
    data["config"]["model"]["num_experts"] = 8  # a config this GPT does not know
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"manifest\.json: its model config.*num_experts"):
        load(run)
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["--checkpoint", str(tmp_path), "--no-progress"])


def test_empty_text_is_an_error(tmp_path):
    run = save_run(tmp_path, tiny())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no text to score"):
        main(["--checkpoint", str(run), "--text", str(empty), "--no-progress"])
