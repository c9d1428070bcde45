"""Triton adamw_step: the in-place op fastlm::adamw_step_triton (same schema and semantics as the
C++ fastlm::adamw_step): one AdamW update of every (param, grad, exp_avg, exp_avg_sq) quadruple,
torch.optim.AdamW's formula with amsgrad and maximize off:

    p <- p * (1 - lr * wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)

One launch per tensor, each element read and written once, math in float32. The CUDA backend's
multi-tensor kernel (csrc/adamw_step) updates many tensors per launch; this one is the portable
Triton version (and the one tested under the interpreter).

Variants, as ops of the same names as the C++ ones (+ _triton):
  adamw_step_master      float32 master weights: p in the formula is the master copy, which is
                         updated; the parameter receives it rounded to its dtype.
  adamw_step_capturable  step (one tensor per parameter) and lr are device tensors: the per-step
                         constants are computed from them by torch ops on the device, in double,
                         into a (n_tensors, 7) table the kernel reads. No host sync.
"""
import math

import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.ops import triton_support
from fastlm.kernels import utils

BLOCK = 1024


@triton.jit
def _to_storage(x, ptr):
    """float32 x -> ptr's element dtype, rounding to nearest even. For bfloat16 the rounding is
    done on the bits first: the interpreter's float32 -> bfloat16 cast truncates, and an
    optimizer's per-step truncation drifts (25 steps lose ~25 ulps); on a GPU this is exact."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _adamw_kernel(
    p_ptr,  # (n,) param dtype, updated in place
    g_ptr,  # (n,) param dtype
    m_ptr,  # (n,) state dtype (float32 or the param's), updated in place
    v_ptr,  # (n,) state dtype, updated in place
    w_ptr,  # (n,) float32 master weights, updated in place (read only when HAS_MASTER)
    c_ptr,  # (7,) float32 constants in the order of the scalars below (read when CONSTS_IN_PTR)
    n, decay, one_minus_b1, beta2, one_minus_b2, step_size, inv_sqrt_bc2, eps,
    HAS_MASTER: tl.constexpr,
    CONSTS_IN_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if CONSTS_IN_PTR:  # capturable: this step's constants were computed on the device
        decay = tl.load(c_ptr)
        one_minus_b1 = tl.load(c_ptr + 1)
        beta2 = tl.load(c_ptr + 2)
        one_minus_b2 = tl.load(c_ptr + 3)
        step_size = tl.load(c_ptr + 4)
        inv_sqrt_bc2 = tl.load(c_ptr + 5)
        eps = tl.load(c_ptr + 6)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_MASTER:
        p = tl.load(w_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    m = m + one_minus_b1 * (g - m)
    v = beta2 * v + one_minus_b2 * g * g
    p = p * decay - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    if HAS_MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, _to_storage(p, p_ptr), mask=mask)
    tl.store(m_ptr + offs, _to_storage(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _to_storage(v, v_ptr), mask=mask)


def _check(params, grads, exp_avgs, exp_avg_sqs) -> None:
    op = "adamw_step_triton"
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(f"fastlm::{op}: params, grads, exp_avgs and exp_avg_sqs must have equal "
                         "lengths")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        reason = triton_support.unavailable_reason(p.device)
        if reason is not None:
            raise RuntimeError(f"fastlm::{op}: {reason}")
        if p.dtype not in utils.KERNEL_DTYPES or g.dtype != p.dtype:
            raise TypeError(f"fastlm::{op}: params[{i}] must be float32, bfloat16 or float16 and "
                            f"its grad the same dtype, got {p.dtype} and {g.dtype}")
        for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape or t.device != p.device:
                raise ValueError(f"fastlm::{op}: the {name} of params[{i}] must match its shape "
                                 f"{tuple(p.shape)} and device {p.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
        if m.dtype != v.dtype or m.dtype not in (torch.float32, p.dtype):
            raise TypeError(f"fastlm::{op}: the states of params[{i}] must both be float32 or "
                            f"{p.dtype}, got {m.dtype} and {v.dtype}")
        for name, t in (("params", p), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if not t.is_contiguous():
                raise ValueError(f"fastlm::{op}: {name}[{i}] must be contiguous (it is updated "
                                 "in place)")


def _check_master(params, exp_avgs, master_params) -> None:
    if len(master_params) != len(params):
        raise ValueError("fastlm::adamw_step_triton: master_params must have one tensor per "
                         f"parameter, got {len(master_params)} for {len(params)}")
    for i, (p, m, w) in enumerate(zip(params, exp_avgs, master_params)):
        if (w.dtype != torch.float32 or w.shape != p.shape or w.device != p.device
                or not w.is_contiguous() or m.dtype != torch.float32):
            raise ValueError(f"fastlm::adamw_step_triton: master_params[{i}] must be a contiguous "
                             f"float32 tensor of shape {tuple(p.shape)} on {p.device}, with "
                             f"float32 states; got {w.dtype} {tuple(w.shape)} on {w.device} and "
                             f"states in {m.dtype}")


def _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts) -> None:
    """consts: a tuple of 7 floats for every tensor, or a (n_tensors, 7) float32 device table."""
    table = isinstance(consts, torch.Tensor)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        n = p.numel()
        if n == 0:
            continue
        w = master_params[i] if master_params else p  # p: a placeholder the kernel never reads
        c_ptr = consts[i] if table else p
        scalars = (1.0,) * 7 if table else consts
        with utils.on_device(p.device):
            _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, g.contiguous(), m, v, w, c_ptr, n, *scalars,
                                                    HAS_MASTER=bool(master_params),
                                                    CONSTS_IN_PTR=table, BLOCK=BLOCK)


def _host_consts(step, lr, beta1, beta2, eps, weight_decay) -> tuple:
    """Per-step constants in double on the host, passed as float32 (as the C++ kernels do)."""
    if step < 1:
        raise ValueError(f"fastlm::adamw_step_triton: step counts from 1, got {step}")
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    return (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1,
            1.0 / math.sqrt(bc2), eps)


def _device_consts(steps, lr, beta1, beta2, eps, weight_decay) -> torch.Tensor:
    """The same constants from device tensors, by torch ops in double: (n_tensors, 7) float32."""
    s = torch.stack([t.reshape(()) for t in steps]).double()  # (n,)
    lr = lr.reshape(()).double().expand_as(s)
    cols = [1.0 - lr * weight_decay, torch.full_like(s, 1.0 - beta1), torch.full_like(s, beta2),
            torch.full_like(s, 1.0 - beta2), lr / (1.0 - torch.pow(beta1, s)),
            1.0 / torch.sqrt(1.0 - torch.pow(beta2, s)), torch.full_like(s, eps)]
    return torch.stack(cols, dim=1).float()  # (n, 7)


@torch.library.custom_op("fastlm::adamw_step_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def adamw_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                      exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: float,
                      lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    consts = _host_consts(step, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, [], consts)


@torch.library.custom_op("fastlm::adamw_step_master_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params"))
def adamw_step_master_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                             exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                             master_params: list[torch.Tensor], step: float, lr: float,
                             beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    _check_master(params, exp_avgs, master_params)
    consts = _host_consts(step, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts)


@torch.library.custom_op("fastlm::adamw_step_capturable_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params"))
def adamw_step_capturable_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                                 master_params: list[torch.Tensor], steps: list[torch.Tensor],
                                 lr: torch.Tensor, beta1: float, beta2: float, eps: float,
                                 weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if master_params:
        _check_master(params, exp_avgs, master_params)
    if len(steps) != len(params):
        raise ValueError("fastlm::adamw_step_capturable_triton: steps must hold one tensor per "
                         f"parameter, got {len(steps)} for {len(params)}")
    if not params:
        return
    device = params[0].device
    for name, t in [("lr", lr)] + [(f"steps[{i}]", s) for i, s in enumerate(steps)]:
        if t.numel() != 1 or t.device != device:
            raise ValueError(f"fastlm::adamw_step_capturable_triton: {name} must be one value on "
                             f"the parameters' device {device}, got shape {tuple(t.shape)} on "
                             f"{t.device}")
    consts = _device_consts(steps, lr, beta1, beta2, eps, weight_decay)
    _launch(params, grads, exp_avgs, exp_avg_sqs, master_params, consts)


opdefs.register_adamw_step("fastlm::adamw_step_triton", "fastlm::adamw_step_master_triton",
                           "fastlm::adamw_step_capturable_triton")
