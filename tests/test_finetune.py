"""fastlm.finetune and its parts: the SFT loss mask, the chat template, LoRA (frozen base, merge),
the classifier's pooling, early stopping, and the CLI end to end with fastlm.eval.

Tiny random-init models; the end-to-end runs train for a few dozen steps on a task a 2-layer
model separates at once, so the whole file stays within a few seconds per test.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from fastlm import checkpoint
from fastlm.chat.template import IGNORE, SPECIAL_TOKENS, encode_chat, sft_example
from fastlm.models.classifier import Classifier
from fastlm.config import ConfigError, ModelConfig
from fastlm.eval.core import main as eval_main
from fastlm.finetune.loop import main, parse_args
from fastlm.finetune.lora import LoRALinear, add_lora, merge_lora
from fastlm.models.gpt import GPT
from fastlm.train.optim import AdamW
from fastlm.restore import load
from fastlm.eval.tasks import write_jsonl
from fastlm.tokenizer import Tokenizer


def tiny(arch="gpt2", vocab=256) -> GPT:
    cfg = ModelConfig(preset="", arch=arch, vocab_size=vocab, block_size=32, n_layer=2,
                      n_head=2, n_embd=32, mlp_hidden=64 if arch == "llama" else 0)
    return GPT(cfg)


def save_base(tmp_path, model=None) -> str:
    model = model or tiny()
    run = tmp_path / "base"
    checkpoint.save(run, 1, model, AdamW(model.parameters()), {"step": 1},
                    {"model": dict(vars(model.config))})
    return str(run)


def chat_tok() -> Tokenizer:
    return Tokenizer.byte(SPECIAL_TOKENS)


def test_sft_loss_only_on_response_prompt_gets_no_gradient():
    tok = chat_tok()
    model = tiny(vocab=tok.vocab_size)
    x, y = sft_example(tok, [{"role": "user", "content": "hi there"},
                             {"role": "assistant", "content": "ok"}], max_len=32)
    x, y = torch.tensor([x]), torch.tensor([y])
    # The final hidden state (B, T, C) is what the head (or the fused head + loss) reads: the
    # loss's gradient with respect to it must be exactly zero at every untrained position.
    hidden = []

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
        hidden.append(out)

    model.norm_f.register_forward_hook(keep)
    _, loss = model(x, y)  # the training path
    loss.backward()
    grad = hidden[0].grad[0]  # (T, C)
    trained = y[0] != IGNORE
    assert trained.sum() == 3  # "o", "k", <|end|>
    assert (grad[~trained] == 0).all()
    assert (grad[trained].abs().sum(-1) > 0).all()
    with torch.no_grad():
        logits, _ = model(x)
    by_hand = F.cross_entropy(logits[0, trained], y[0, trained])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_chat_template_user_text_cannot_forge_special_tokens():
    tok = chat_tok()
    ids, trained = encode_chat(tok, [{"role": "user", "content": "<|end|>"}],
                               add_generation_prompt=True)
    specials = set(tok.special_tokens.values())
    assert ids[0] == tok.special_tokens["<|user|>"]
    assert not specials & set(ids[1:-2])  # the user's "<|end|>" stayed plain bytes
    assert ids[-1] == tok.special_tokens["<|assistant|>"] and not any(trained)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_leaves_base_untouched_and_merge_equals_adapted(arch):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (2, 12))
    base_out, _ = model(x)
    names = add_lora(model, rank=4, alpha=8.0)
    assert len(names) == 4 * 2 and all(isinstance(model.get_submodule(n), LoRALinear)
                                       for n in names)
    torch.testing.assert_close(model(x)[0], base_out)  # B starts at 0: adapted == base
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        _, loss = model(x, torch.roll(x, 1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapted, _ = model(x)
    assert not torch.allclose(adapted, base_out)
    for k, v in model.state_dict().items():  # base weights bit-identical until the merge
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base.", ".")]), k
    merge_lora(model)
    assert set(model.state_dict()) == set(before)  # a plain GPT again
    torch.testing.assert_close(model(x)[0], adapted, rtol=1e-4, atol=1e-5)


def test_classifier_pools_last_real_token_and_ignores_padding():
    gpt = tiny().eval()
    clf = Classifier(gpt, 3).eval()
    seq = torch.randint(1, 256, (1, 7))
    padded = torch.cat([seq, torch.zeros(1, 5, dtype=torch.long)], 1)
    a, _ = clf(seq)
    b, _ = clf(padded, lengths=torch.tensor([7]))
    torch.testing.assert_close(a, b)
    # the hook sees the same final hidden state GPT's head turns into logits
    h = clf.hidden(seq)
    torch.testing.assert_close(gpt.lm_head(h), gpt(seq)[0])


def write_classify(path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = ["alpha", "beta"][i % 2]
        ch = "a" if label == "alpha" else "z"
        k = int(torch.randint(3, 12, (), generator=g))
        rows.append({"text": f"{ch * k} {i}", "label": label})
    write_jsonl(path, rows)


def test_classify_finetune_then_eval(tmp_path):
    base = save_base(tmp_path)
    data, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_classify(data, 64)
    write_classify(test, 20, seed=1)
    out = tmp_path / "clf"
    main(["--checkpoint", base, "--task", "classify", "--data", str(data), "--out", str(out),
          "--train.max_steps=40", "--eval.interval=20", "--train.batch_size=8",
          "--train.progress=false", "--optim.lr=3e-3"])
    r = load(out)
    assert r.meta.task == "classify" and r.meta.labels == ["alpha", "beta"]
    res_path = tmp_path / "res.json"
    eval_main(["--checkpoint", str(out), "--task", str(test), "--task-type", "classify",
               "--json", str(res_path), "--no-progress"])
    res = json.loads(res_path.read_text())
    assert res["accuracy"] >= 0.9 and 0 <= res["macro_f1"] <= 1
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["best"]["step"] > 0 and summary["best_checkpoint"].endswith(
        f"step_{summary['best']['step']:06d}")


def test_sft_lora_finetune_merges_to_plain_checkpoint(tmp_path):
    base = save_base(tmp_path)
    before = load(base).model.state_dict()
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": f"say {w}", "response": w} for w in ["yes", "no"] * 8]
                + [{"messages": [{"role": "system", "content": "terse"},
                                 {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]}])
    out = tmp_path / "sft"
    main(["--checkpoint", base, "--task", "sft", "--data", str(data), "--out", str(out),
          "--lora.rank=4", "--train.max_steps=20", "--eval.interval=10",
          "--train.progress=false", "--optim.lr=1e-2"])
    r = load(out)
    assert r.meta.task == "sft" and r.model.config.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert not any("lora" in k for k in r.model.state_dict())
    # old embedding rows still those of the base (LoRA froze them), new rows appended
    torch.testing.assert_close(r.model.wte.weight[:256], before["wte.weight"])
    gen = tmp_path / "gen.jsonl"
    write_jsonl(gen, [{"source": "say yes", "reference": "yes"}])
    eval_main(["--checkpoint", str(out), "--task", str(gen), "--task-type", "generate",
               "--max-new-tokens", "5", "--no-progress"])


def test_finetune_uses_the_configured_optimizer(tmp_path):
    base = save_base(tmp_path)
    data = tmp_path / "train.jsonl"
    write_classify(data, 16)
    out = tmp_path / "sgd"
    main(["--checkpoint", base, "--task", "classify", "--data", str(data), "--out", str(out),
          "--train.max_steps=4", "--eval.interval=2", "--optim.name=sgd", "--optim.momentum=0.9",
          "--optim.lr=0.5", "--train.progress=false"])
    opt = checkpoint.load(out).optimizer_state()
    assert opt["param_groups"][0]["momentum"] == 0.9 and "momentum_buffer" in opt["state"][0]
    # precision=auto (the default) is saved as what ran, not as "auto"
    assert checkpoint.load(out).manifest["config"]["train"]["precision"] in ("fp32", "bf16")


def test_max_seconds_stops_finetuning(tmp_path):
    base = save_base(tmp_path)
    data = tmp_path / "train.jsonl"
    write_classify(data, 16)
    out = tmp_path / "timed"
    main(["--checkpoint", base, "--task", "classify", "--data", str(data), "--out", str(out),
          "--train.max_steps=1000", "--eval.interval=500", "--train.max_seconds=0.001",
          "--train.progress=false"])
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 1 and not summary["stopped_early"]
    assert summary["best"]["step"] in (0, 1)  # the stop was validated like a last step


def test_early_stopping_on_patience(tmp_path):
    base = save_base(tmp_path)
    data = tmp_path / "train.jsonl"
    write_classify(data, 16)
    out = tmp_path / "es"
    main(["--checkpoint", base, "--task", "classify", "--data", str(data), "--out", str(out),
          "--train.max_steps=100", "--eval.interval=2", "--finetune.patience=2",
          "--finetune.min_delta=10", "--optim.lr=1e-9", "--train.progress=false"])
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["best"]["step"] == 0


def test_bad_inputs_name_file_and_line(tmp_path):
    base = save_base(tmp_path)
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_classify(data, 8)
    write_jsonl(val, [{"text": "aaa", "label": "alpha"}, {"text": "q", "label": "gamma"}])
    common = ["--checkpoint", base, "--task", "classify", "--out", str(tmp_path / "o"),
              "--train.progress=false"]
    with pytest.raises(SystemExit, match=r"val\.jsonl:2: label 'gamma' was not seen"):
        main(common + ["--data", str(data), "--val", str(val)])
    val.write_text('{"text": "aaa", "label": "alpha"}\n{"label": "beta"}\n')
    with pytest.raises(SystemExit, match=r"val\.jsonl:2: missing field 'text'"):
        main(common + ["--data", str(data), "--val", str(val)])
    with pytest.raises(SystemExit, match="model's shape comes from the checkpoint"):
        main(common + ["--data", str(data), "--model.n_layer=3"])
    with pytest.raises(ConfigError, match="lora.rank"):
        parse_args(common + ["--data", str(data), "--lora.rank=-1"])
    clf_run = tmp_path / "clf"
    main(common[:4] + ["--out", str(clf_run), "--data", str(data), "--train.max_steps=2",
                       "--train.progress=false"])
    with pytest.raises(SystemExit, match="a classify fine-tune; start from a language-model"):
        main(["--checkpoint", str(clf_run), "--task", "sft", "--data", str(data),
              "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="is a classifier"):
        eval_main(["--checkpoint", str(clf_run), "--no-progress"])


def test_sft_from_a_bpe_checkpoint_keeps_its_tokenizer(tmp_path):
    tok = Tokenizer.train(iter(["def add(a, b):\n    return a + b\n"] * 20), vocab_size=270,
                          pattern="gpt4", special_tokens=["<|endoftext|>"])
    base = save_base(tmp_path, tiny(vocab=272))  # 2 spare ids: the embedding must grow by 2
    ckpt_dir = checkpoint.latest(base)
    tok.save(ckpt_dir / "tokenizer.json")  # as fastlm.train stores a run's tokenizer
    assert load(base).tokenizer == tok
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"prompt": "add", "response": "a + b"}] * 4)
    out = tmp_path / "sft"
    main(["--checkpoint", base, "--task", "sft", "--data", str(data), "--out", str(out),
          "--train.max_steps=2", "--train.progress=false"])
    r = load(out)
    assert r.model.config.vocab_size == 270 + len(SPECIAL_TOKENS)
    assert r.tokenizer.tokens[:270] == tok.tokens  # the BPE vocabulary is kept, specials appended
    assert r.tokenizer.encode_ordinary("return a + b") == tok.encode_ordinary("return a + b")


def test_demo_line_kinds_are_labelled_by_where_the_line_is():
    import random

    from fastlm.eval.demo_tasks import _line_kinds
    source = ('def area(radius):\n    """Compute the area of a circle of this radius.\n\n'
              '    The radius is in metres and the result in square metres.\n    """\n'
              '    # multiply by pi, the ratio of circumference to diameter\n'
              '    return 3.14159 * radius * radius\n')
    rows = _line_kinds(source, random.Random(0), per_kind=5)
    got = {r["text"]: r["label"] for r in rows}
    assert got == {"The radius is in metres and the result in square metres.": "docstring",
                   "multiply by pi, the ratio of circumference to diameter": "comment",
                   "return 3.14159 * radius * radius": "code"}


def test_classifier_refuses_a_backbone_without_a_final_hidden_state():
    from fastlm import models
    from fastlm.models.classifier import Classifier
    from fastlm.config import model_preset
    with pytest.raises(ValueError, match="model.arch=lstm has no final norm"):
        Classifier(models.build(model_preset("tiny-lstm")), 2)
