"""Tiny random-weight models and checkpoints shared by the generation, server and export tests."""
from __future__ import annotations

from pathlib import Path

import torch

from fastlm import checkpoint
from fastlm.config import ModelConfig
from fastlm.models.gpt import GPT
from fastlm.train.optim import AdamW


def tiny_config(arch: str = "gpt2", vocab_size: int = 256, block_size: int = 64,
                **over) -> ModelConfig:
    kw = {"preset": "", "arch": arch, "vocab_size": vocab_size, "block_size": block_size,
          "n_layer": 2, "n_head": 4, "n_embd": 32}
    if arch == "llama":
        kw.update(n_kv_head=2, bias=False, tie_embeddings=False, mlp_hidden=64)
    kw.update(over)
    return ModelConfig(**kw)


def tiny_model(arch: str = "gpt2", seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(arch, **over)).eval()
    with torch.no_grad():  # larger than init's 0.02 so the logits are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def save_checkpoint(run_dir: Path, model: GPT) -> Path:
    """A real fastlm checkpoint of `model` (byte vocabulary: the byte tokenizer applies)."""
    from dataclasses import asdict
    opt = AdamW(model.parameters(), lr=1e-3)
    return checkpoint.save(run_dir, 1, model, opt, {"step": 1},
                           {"model": asdict(model.config)})
