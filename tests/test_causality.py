"""Causality of every registered architecture (issue 12, item 4).

For each model.arch in fastlm.models.available() (so an architecture added later is tested
without editing this file), built from its tiny-<arch> preset when one exists, else from a small
generic config:

  objective "causal": changing the tokens after position t never changes the logits at positions
                      0 .. t (float32, bit for bit), while it does change later ones (so the
                      check is not vacuous: the model reads its input at all);
  objective "masked": the output at t does depend on tokens after t (a bidirectional encoder
                      that accidentally masked the future would pass a causal test).
"""
from __future__ import annotations

import pytest
import torch

from fastlm import models
from fastlm.config import ModelConfig, list_presets, model_preset

T = 24  # sequence length of the probes: short, and not a power of two


def small_config(arch: str) -> ModelConfig:
    """The arch's tiny-<arch> preset if shipped, else a small config every family accepts."""
    if f"tiny-{arch}" in list_presets():
        cfg = model_preset(f"tiny-{arch}")
    else:
        cfg = ModelConfig(preset="", arch=arch, vocab_size=256, block_size=64, n_layer=2,
                          n_head=2, n_embd=32)
    cfg.dropout = 0.0
    cfg.block_size = max(cfg.block_size, T)
    cfg.validate()
    return cfg


def build(arch: str) -> models.LanguageModel:
    torch.manual_seed(0)
    model = models.build(small_config(arch)).float().eval()
    with torch.no_grad():  # larger than the init's scale, so outputs are far from uniform and
        for p in model.parameters():  # a dependence shows up well above rounding
            p.add_(torch.randn_like(p) * 0.1)
    return model


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(idx)[0]  # (B, T, V): forward without targets returns the logits
    assert logits is not None and logits.shape[:2] == idx.shape, (
        f"{type(model).__name__}: forward(idx) must return (B, T, V) logits, got "
        f"{None if logits is None else tuple(logits.shape)}")
    return logits.float()


def change_after(idx: torch.Tensor, t: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """idx with every token after position t replaced by a different one."""
    out = idx.clone()
    shift = torch.randint(1, vocab, out[:, t + 1:].shape, generator=gen)
    out[:, t + 1:] = (out[:, t + 1:] + shift) % vocab  # never the same token
    return out


@pytest.mark.parametrize("arch", models.available())
def test_causality(arch):
    model = build(arch)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (2, T), generator=gen)
    base = logits_of(model, idx)
    assert torch.isfinite(base).all()
    if model.objective == "causal":
        for t in (0, 1, T // 2 - 1, T - 2):
            changed = logits_of(model, change_after(idx, t, vocab, gen))
            torch.testing.assert_close(
                changed[:, :t + 1], base[:, :t + 1], rtol=0, atol=0,
                msg=lambda m, t=t: f"{arch}: logits at positions <= {t} changed when only "
                                   f"tokens after {t} did (the model sees the future)\n{m}")
            # The next position reads the changed token (it is its input): a model that
            # ignored its input would pass the check above for nothing.
            assert (changed[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4, (
                f"{arch}: logits at {t + 1} did not change with the token at {t + 1}")
    elif model.objective == "masked":
        for t in (0, T // 2 - 1, T - 2):
            changed = logits_of(model, change_after(idx, t, vocab, gen))
            diff = (changed[:, t] - base[:, t]).abs().max().item()
            assert diff > 1e-4, (f"{arch}: a masked (bidirectional) model's output at {t} "
                                 f"did not change with the tokens after it (max diff {diff})")
    else:
        pytest.fail(f"{arch}: objective {model.objective!r} is neither 'causal' nor 'masked'")
