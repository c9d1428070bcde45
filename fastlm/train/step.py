"""The training step, one for every trainer: fastlm.train, fastlm.finetune, fastlm.compare's
calibration, fastlm.profile and the training benchmark.

One optimizer step = `accum` micro-batches, each forward under autocast (precision_context) and
backward with its loss divided by accum, so the gradients are those of one accum-times bigger
batch; then the fp16 gradient scaler unscales, the global gradient norm is taken and clipped
(grad_clip; 0 = measure only), the optimizer steps and the gradients are cleared.

A step whose loss or gradient norm is NaN/inf is skipped: no update, gradients cleared, and the
result says so (the caller counts and reports). Under fp16 an inf gradient is how the scaler
finds its scale (it skips that update itself and halves the scale), so there only a non-finite
loss counts as bad.

Under DDP the gradients are all-reduced on the last micro-batch only (no_sync before it); FSDP2
reduces every micro-batch (it has no no_sync) and returns the norm as a DTensor, made whole here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastlm.precision import resolve_precision
from fastlm.train import distributed

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: autocast off


def precision_context(precision: str, device: torch.device):
    """Autocast for train.precision bf16/fp16; a no-op context for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@dataclass
class StepResult:
    loss: torch.Tensor  # () float32 on the device: mean over micro-batches (and processes)
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    finite: bool  # False: a bad (NaN/inf) step, whose update was skipped


class TrainStep:
    """train_step(micro_loss, lr) runs one optimizer step and returns its StepResult.

    micro_loss(i) runs the forward of micro-batch i (0..accum-1), called under autocast (and
    DDP's no_sync but for the last), and returns its mean loss: fetching the batch inside it
    keeps one micro-batch in memory at a time, and a recurrent model carries its state there.
    `model` is the module micro_loss calls (DDP, FSDP2 or compiled alike); gradients are clipped
    over its trainable parameters (frozen ones have none). precision "auto" is resolved here
    (fastlm.precision): .precision is the choice, .precision_reason why."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, precision: str = "fp32", grad_clip: float = 0.0,
                 accum: int = 1, dist: distributed.DistInfo | None = None):
        # an unknown precision fails here, not mid-step
        precision, self.precision_reason = resolve_precision(precision, device)
        self.model, self.optimizer, self.device = model, optimizer, device
        self.precision, self.grad_clip, self.accum = precision, grad_clip, accum
        self.dist = dist or distributed.DistInfo()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self):
        """This step's precision context, for evaluations that should match it."""
        return precision_context(self.precision, self.device)

    def __call__(self, micro_loss: Callable[[int], torch.Tensor],
                 lr: float | None = None) -> StepResult:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        scaler, accum = self.scaler, self.accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            defer_sync = micro < accum - 1 and hasattr(self.model, "no_sync")  # DDP only
            with self.model.no_sync() if defer_sync else contextlib.nullcontext():
                with self.autocast():
                    loss = micro_loss(micro)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
            grad_norm = grad_norm.full_tensor()
        distributed.all_reduce_mean(loss_sum, self.dist)
        if scaler.is_enabled():  # fp16: an inf gradient is the scaler's business (see above)
            finite = bool(torch.isfinite(loss_sum))
        else:
            finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if finite or scaler.is_enabled():
            scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum, grad_norm, finite)
