"""LoRA: low-rank adapters on a model's linear layers, and merging them back.

    y = base(x) + (alpha / rank) * dropout(x) @ A^T @ B^T        A: (r, in), B: (out, r)

A starts random (Kaiming-uniform, as in the LoRA paper) and B at zero, so an adapted model starts
equal to its base. add_lora freezes every base parameter: training changes only A and B (and
whatever the caller unfreezes, e.g. a classifier head), so the base weights stay bit-identical
until merge_lora folds W += (alpha / r) B A into them and puts plain nn.Linear modules back,
leaving a model whose state dict is that of the original architecture.

fastlm's own module rather than peft: peft is not installed here and would be a dependency for
~60 lines; fastlm's projections are plain nn.Linear modules named by their role, which is all
LoRA needs. Targets are module-name suffixes: attention "attn.qkv", "attn.proj" and MLP "mlp.up",
"mlp.down" (fastlm.models.gpt).
"""
from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device,
                                               dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device,
                                               dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        update = (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        return self.base(x) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with the update folded into its weight."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
        self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Freeze model and wrap every nn.Linear whose name ends with a target; returns the names.
    ValueError when no module matches (a typo in targets, or another architecture)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"LoRA: no nn.Linear module matches targets {list(targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into its base Linear in place; returns how many were merged."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return len(found)


def lora_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
