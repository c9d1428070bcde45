"""Triton adamw_step: the in-place op fastlm::adamw_step_triton (same schema and semantics as the
C++ fastlm::adamw_step): one AdamW update of every (param, grad, exp_avg, exp_avg_sq) quadruple,
torch.optim.AdamW's formula with amsgrad and maximize off:

    p <- p * (1 - lr * wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)

One launch per tensor, each element read and written once, math in float32. The CUDA backend's
multi-tensor kernel (csrc/adamw_step) updates many tensors per launch; this one is the portable
Triton version (and the one tested under the interpreter).
"""
import math

import torch
import triton
import triton.language as tl

from fastlm import opdefs
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
    n, decay, one_minus_b1, beta2, one_minus_b2, step_size, inv_sqrt_bc2, eps,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    m = m + one_minus_b1 * (g - m)
    v = beta2 * v + one_minus_b2 * g * g
    p = p * decay - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)
    tl.store(p_ptr + offs, _to_storage(p, p_ptr), mask=mask)
    tl.store(m_ptr + offs, _to_storage(m, m_ptr), mask=mask)
    tl.store(v_ptr + offs, _to_storage(v, v_ptr), mask=mask)


def _check(params, grads, exp_avgs, exp_avg_sqs) -> None:
    op = "adamw_step_triton"
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError(f"fastlm::{op}: params, grads, exp_avgs and exp_avg_sqs must have equal "
                         "lengths")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        reason = utils.native.triton_unavailable_reason(p.device)
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


@torch.library.custom_op("fastlm::adamw_step_triton",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def adamw_step_triton(params: list[torch.Tensor], grads: list[torch.Tensor],
                      exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: float,
                      lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    _check(params, grads, exp_avgs, exp_avg_sqs)
    if step < 1:
        raise ValueError(f"fastlm::adamw_step_triton: step counts from 1, got {step}")
    # Per-step constants in double on the host, passed as float32 (as the C++ kernels do).
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    consts = (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1,
              1.0 / math.sqrt(bc2), eps)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        n = p.numel()
        if n == 0:
            continue
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, g.contiguous(), m, v, n, *consts, BLOCK=BLOCK)


opdefs.register_adamw_step("fastlm::adamw_step_triton")
