"""The gated CNN language model (fastlm/models/gcnn.py): shapes, the receptive field, the loss
path, overfitting a batch, generation over the receptive field, and a trainer run that resumes
bit for bit. Causality for every causal architecture is in test_causality.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastlm import checkpoint, models
from fastlm.config import ModelConfig, parse_args
from fastlm.models.gcnn import GatedCNN
from fastlm.train.loop import main

TEXT = ("To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n") * 80  # ~7 KB, repetitive


def config(**over) -> ModelConfig:
    kw = {"preset": "", "arch": "gcnn", "vocab_size": 256, "block_size": 32, "n_layer": 3,
          "n_embd": 24, "conv_kernel": 3}
    kw.update(over)
    return ModelConfig(**kw)


def test_registered_and_tiny_preset_builds():
    assert "gcnn" in models.available()
    cfg = parse_args(["--model.preset=tiny-gcnn"]).model
    model = models.build(cfg)
    assert isinstance(model, GatedCNN) and model.objective == "causal" and not model.recurrent
    assert model.receptive_field == cfg.n_layer * (cfg.conv_kernel - 1) + 1
    assert len(model.checkpoint_units()) == cfg.n_layer


def test_shapes_and_loss_contract():
    model = GatedCNN(config()).eval()
    idx = torch.randint(0, 256, (2, 17))  # T != block_size, odd
    logits, loss = model(idx)
    assert logits.shape == (2, 17, 256) and loss is None
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 256)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    targets = torch.randint(0, 256, (2, 17))
    targets[0, :3] = -100  # ignored positions
    none, loss = model(idx, targets)
    assert none is None and loss.shape == ()
    both, loss2 = model(idx, targets, return_logits=True)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(both[keep], targets[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert loss2 == loss


def test_param_count_and_flops():
    cfg = config(bias=True, tie_embeddings=True)
    model = GatedCNN(cfg)
    C, k, L, V = cfg.n_embd, cfg.conv_kernel, cfg.n_layer, cfg.vocab_size
    per_block = (C * 2 * C * k + 2 * C) + 2 * C  # conv weight + bias, LayerNorm weight + bias
    assert model.num_params() == V * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=True) == L * per_block + 2 * C
    # 6 FLOPs per weight, the tied head counted as a matmul, no dependence on the context.
    assert model.flops_per_token(32) == model.flops_per_token(1024) == 6 * (
        L * per_block + 2 * C + V * C)
    untied = GatedCNN(config(tie_embeddings=False))
    assert untied.num_params() == model.num_params() + V * C


def test_receptive_field_is_exact():
    """Position t depends on tokens t - R + 1 .. t and on none before (R = L (k - 1) + 1)."""
    model = GatedCNN(config()).eval()
    R, T, t = model.receptive_field, 24, 20
    assert R == 7
    idx = torch.randint(0, 256, (1, T))
    base = model(idx)[0][0, t]
    far = idx.clone()
    far[0, :t - R + 1] = (far[0, :t - R + 1] + 1) % 256  # everything out of reach
    torch.testing.assert_close(model(far)[0][0, t], base, rtol=0, atol=0)
    edge = idx.clone()
    edge[0, t - R + 1] = (edge[0, t - R + 1] + 1) % 256  # the oldest token in reach
    assert not torch.allclose(model(edge)[0][0, t], base)


def test_loss_falls_on_an_overfit_batch():
    torch.manual_seed(0)
    model = GatedCNN(config())
    data = torch.tensor(list(TEXT.encode()[:8 * 33])).view(8, 33)
    x, y = data[:, :-1], data[:, 1:]  # (8, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 5.0  # ~ln(256) at init
    assert loss.item() < 1.5


def test_generate_uses_the_receptive_field_only():
    """Sampling from the last R tokens gives the same tokens as sampling from the whole context
    (the base class's window), step for step with the same generator."""
    from fastlm.models.base import LanguageModel
    model = GatedCNN(config(block_size=64)).eval()
    prompt = torch.randint(0, 256, (2, 30))  # longer than R = 7
    fast = model.generate(prompt, 12, temperature=0.9, top_k=20,
                          generator=torch.Generator().manual_seed(3))
    slow = LanguageModel.generate(model, prompt, 12, temperature=0.9, top_k=20,
                                  generator=torch.Generator().manual_seed(3))
    assert fast.shape == (2, 42)
    assert torch.equal(fast, slow)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(prompt, 1, temperature=0)


def test_bad_config_names_the_key():
    from fastlm.config import ConfigError
    with pytest.raises(ConfigError, match="model.conv_kernel"):
        parse_args(["--model.preset=tiny-gcnn", "--model.conv_kernel=0"])


# ---------------------------------------------------------------------------------------------
# Through the trainer
TRAIN = ["--model.preset=tiny-gcnn", "--model.block_size=32", "--train.batch_size=8",
         "--optim.lr=1e-2", "--optim.warmup_steps=5", "--eval.batches=2",
         "--train.log_interval=5", "--train.progress=false", "--eval.interval=10"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_trainer_run_then_resume_is_exact(tmp_path, corpus):
    common = [f"--data={corpus}", *TRAIN, "--sample.tokens=0", "--train.max_steps=20"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight), "--sample.tokens=30"]) == 0
    assert (straight / "sample.txt").read_text().startswith("def ")  # generation ran
    main([*common, "--out", str(split), "--checkpoint.interval=10"])
    shutil.rmtree(split / "checkpoints" / "step_000020")
    resumed = tmp_path / "resumed"
    main([*common, "--out", str(resumed), f"--checkpoint.resume={split}"])
    a, b = checkpoint.load(straight), checkpoint.load(resumed)
    assert a.step == b.step == 20 and a.manifest["config"]["model"]["arch"] == "gcnn"
    wa, wb = (load_file(c.path / "model.safetensors") for c in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    assert a.manifest["metrics"]["val_loss"] == b.manifest["metrics"]["val_loss"] < 5.0
