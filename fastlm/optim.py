"""AdamW whose update runs through fastlm.ops.adamw_step, the weight-decay parameter groups, and
build_optimizer (AdamW or torch SGD with momentum/Nesterov, chosen by name).

The per-parameter state uses torch.optim.AdamW's keys and layout ("step" as a float32 scalar
tensor, "exp_avg", "exp_avg_sq" shaped like the parameter), so state dicts load both ways
between this optimizer and torch's.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from fastlm import ops


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), one fastlm.ops.adamw_step call
    per parameter group and device (and step count, in case parameters joined late)."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("fastlm AdamW: amsgrad and maximize are not supported (this "
                                 "parameter group came from a torch.optim.AdamW state dict)")
            # (device, step) -> parallel lists for one adamw_step call
            buckets: dict[tuple, tuple[list, list, list, list]] = defaultdict(
                lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("fastlm AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                lists = buckets[(p.device, int(state["step"].item()))]
                for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(_local(t))
            beta1, beta2 = group["betas"]
            for (_, step), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr=group["lr"],
                               beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"])
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this process holds of an FSDP2 (DTensor) tensor; the update is elementwise,
    so each rank updates its shard in place. Plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices of linear layers decay; norms, biases and embeddings do not.

    Decaying a norm's gain or a bias pulls it towards 0, which only fights the model; embeddings
    are lookup tables whose rows see few updates each. A weight shared between modules (tied
    embedding and output head) is an embedding and appears once.
    """
    no_decay_ids = set()
    for module in model.modules():
        is_norm = isinstance(module, _NO_DECAY_MODULES) or type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or isinstance(module, nn.Embedding) or p.dim() < 2:
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # deduplicates shared parameters
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` ("adamw" or "sgd") over param_groups(model, weight_decay).

    SGD is torch.optim.SGD (its weight decay is L2, added to the gradient); Nesterov needs a
    momentum > 0."""
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"optimizer must be adamw or sgd, got {name!r}")
