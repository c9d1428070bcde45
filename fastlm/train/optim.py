"""AdamW whose update runs through fastlm.ops.adamw_step, the weight-decay parameter groups, and
build_optimizer (AdamW or torch SGD with momentum/Nesterov, chosen by name).

The per-parameter state uses torch.optim.AdamW's keys and layout ("step" as a float32 scalar
tensor, "exp_avg", "exp_avg_sq" shaped like the parameter), so state dicts load both ways
between this optimizer and torch's. Master weights add one key, "master_param", which torch's
AdamW ignores.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from fastlm import ops
from fastlm.config import OptimConfig
from fastlm.models.base import param_groups

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), one fastlm.ops.adamw_step call
    per parameter group and device (and step count, in case parameters joined late).

    master_weights: bf16/fp16 parameters get a float32 master copy (state["master_param"]) and
    float32 moments; the update is applied to the master copy and the parameter receives it
    rounded, so updates smaller than the parameter's precision accumulate instead of vanishing.
    The master copy is the truth: a parameter changed outside the optimizer (say, a model
    checkpoint loaded without the optimizer's) is overwritten at the next step. float32
    parameters are unaffected.

    capturable: state["step"] lives on the parameter's device and the step and lr are read by
    the kernel there, so step() never synchronises with the host and can be captured in a CUDA
    graph (lr may then be a tensor on that device, updated in place by a scheduler). On the CPU
    the same path runs and gives the same parameters as the host path.

    Both are properties of this optimizer, kept when a state dict is loaded: loading fills in
    what the saved state lacks (a master copy from the parameter, step moved to where it lives).
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, master_weights: bool = False,
                 capturable: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay}")
        if isinstance(lr, torch.Tensor) and not capturable:
            raise ValueError("AdamW: a tensor lr needs capturable=True (the host path reads a "
                             "float; pass float(lr) otherwise)")
        self.master_weights = bool(master_weights)
        self.capturable = bool(capturable)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    def __getstate__(self):  # pickling keeps the two flags (torch's keeps only its own keys)
        return {**super().__getstate__(), "master_weights": self.master_weights,
                "capturable": self.capturable}

    def __setstate__(self, state):
        super().__setstate__(state)  # load_state_dict calls this too, without the flags
        self.__dict__.setdefault("master_weights", False)
        self.__dict__.setdefault("capturable", False)

    def _uses_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in _LOW_PRECISION

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        master = self._uses_master(p)
        state_dtype = torch.float32 if master else p.dtype
        state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if self.capturable
                         else torch.tensor(0.0))
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype,
                                            memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype,
                                               memory_format=torch.contiguous_format)
        if master:
            state["master_param"] = p.detach().float().contiguous()

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
            active = [p for p in group["params"] if p.grad is not None]
            for p in active:
                if p.grad.is_sparse:
                    raise RuntimeError("fastlm AdamW does not support sparse gradients")
                if not self.state[p]:
                    self._init_state(p, self.state[p])
            steps = _advance_host_steps([self.state[p]["step"] for p in active],
                                        self.capturable)
            # (device, step or None when capturable, master weights?) -> lists for one call
            buckets: dict[tuple, tuple[list, ...]] = defaultdict(lambda: ([], [], [], [], [], []))
            for p, step in zip(active, steps):
                state = self.state[p]
                lists = buckets[(p.device, step, self._uses_master(p))]
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                           state.get("master_param"), state["step"])
                for lst, t in zip(lists, tensors):
                    lst.append(t if t is None else _local(t))
            beta1, beta2 = group["betas"]
            hyper = {"beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            for (device, step, master), (params, grads, m, v, w, steps) in buckets.items():
                masters = w if master else None
                if self.capturable:
                    torch._foreach_add_(steps, 1)  # on the device: no sync
                    lr = group["lr"]
                    if isinstance(lr, torch.Tensor) and lr.device != device:
                        lr = lr.to(device)
                    ops.adamw_step(params, grads, m, v, steps, lr=lr, master_params=masters,
                                   **hyper)
                else:
                    ops.adamw_step(params, grads, m, v, step, lr=float(group["lr"]),
                                   master_params=masters, **hyper)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading, then this optimizer's own layout: torch casts every state tensor to
        its parameter's dtype (which would round float32 master weights and moments to bf16)
        and puts "step" where the saved group's capturable flag says. Float32 states are taken
        again from the given dict, a missing master copy is made from the parameter, and "step"
        goes to the parameter's device (capturable) or the CPU. A saved master copy is kept only
        if it is float32 and rounds to the parameter (else the parameter is the truth)."""
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            if p not in self.state:
                continue
            state, saved = self.state[p], state_dict["state"].get(pid, {})
            if self._uses_master(p):
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in saved:
                        state[key] = saved[key].to(device=p.device, dtype=torch.float32,
                                                   copy=True).contiguous()
                source = saved.get("master_param")
                if not _is_master_of(source, p):  # absent, or stale (it went through torch's
                    source = p.detach()           # AdamW, which keeps the key but not its values)
                state["master_param"] = source.to(device=p.device, dtype=torch.float32,
                                                  copy=True).contiguous()
            else:
                state.pop("master_param", None)
            if "step" in state:
                state["step"] = state["step"].to(  # a copy: steps are incremented in place
                    device=p.device if self.capturable else "cpu", dtype=torch.float32, copy=True)


def _advance_host_steps(steps: list[torch.Tensor], capturable: bool) -> list[int | None]:
    """Adds 1 to every host-side step count and returns the new counts: one foreach add and one
    stacked read for the whole group, not a `+= 1` and an `.item()` per parameter (AdamW.step
    of the 4-layer shakespeare_char_cpu GPT: 1.53 -> 1.16 ms at one thread). Capturable counts
    stay untouched here (the device adds them): None each."""
    if capturable or not steps:
        return [None] * len(steps)
    torch._foreach_add_(steps, 1)
    return [int(s) for s in torch.stack(steps).tolist()]


def _is_master_of(master: torch.Tensor | None, p: torch.Tensor) -> bool:
    return (master is not None and master.dtype == torch.float32 and master.shape == p.shape
            and torch.equal(master.to(device=p.device, dtype=p.dtype), p.detach()))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this process holds of an FSDP2 (DTensor) tensor; the update is elementwise,
    so each rank updates its shard in place. Plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer cfg.name ("adamw" or "sgd") over the model's weight-decay groups, with the
    hyperparameters of cfg (the config's [optim] section; lr is the peak, a schedule sets it
    per step).

    SGD is torch.optim.SGD (its weight decay is L2, added to the gradient); Nesterov needs a
    momentum > 0."""
    groups = (model.param_groups(cfg.weight_decay) if hasattr(model, "param_groups")
              else param_groups(model, cfg.weight_decay))  # a LanguageModel may group its own
    if cfg.name == "adamw":
        return AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"optimizer must be adamw or sgd, got {cfg.name!r}")
