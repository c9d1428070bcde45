"""AdamW whose update runs through fastlm.ops.adamw_step, and the weight-decay parameter groups.

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
                    lst.append(t)
            beta1, beta2 = group["betas"]
            for (_, step), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr=group["lr"],
                               beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"])
        return loss


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
