"""Triton rms_norm, forward and backward: the ops fastlm::rms_norm_fwd_triton and
fastlm::rms_norm_bwd_triton (same schemas and semantics as the C++ fastlm::rms_norm_fwd/_bwd).

    y = x * rstd * weight,   rstd = 1 / sqrt(mean(x^2) + eps)

The structure is layer_norm.py's without the mean and the bias; read that file first. x (..., C)
is viewed as N contiguous rows, loads are converted to float32 at once, statistics are float32,
y and dx are stored in x's dtype, and weight is converted to float32 by the launcher.
"""
import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.kernels import utils


# ---------------------------------------------------------------------------------------------
# Kernels
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,     # (N, C) x's dtype
    w_ptr,     # (C,) float32
    y_ptr,     # (N, C) x's dtype
    rstd_ptr,  # (N,) float32
    C,
    eps,
    BLOCK_C: tl.constexpr,       # columns per step, a power of two
    ROW_IN_BLOCK: tl.constexpr,  # the whole row fits in one block (C <= BLOCK_C)
):
    # One program per row. int64 before multiplying: N * C may exceed 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * C
    y_row = y_ptr + row * C
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

    if ROW_IN_BLOCK:
        # The whole row fits in registers: x is read once. Padding lanes load 0 and add nothing.
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        y = x * rstd * tl.load(w_ptr + cols, mask=mask)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Rows longer than a block: one sweep for the mean square (into a (BLOCK_C,) float32
        # accumulator, reduced once), one for the output; the second read of the row hits L2.
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)

        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd * tl.load(w_ptr + start + cols, mask=mask)
            tl.store(y_row + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,       # (N, C) x's dtype
    x_ptr,        # (N, C) x's dtype
    w_ptr,        # (C,) float32
    rstd_ptr,     # (N,) float32
    dx_ptr,       # (N, C) x's dtype
    dw_part_ptr,  # (P, C) float32: row p = program p's sum of dy * xhat over its rows
    N,
    C,
    rows_per_program,
    BLOCK_C: tl.constexpr,
    ROW_IN_BLOCK: tl.constexpr,
):
    # With xhat = x * rstd and g = dy * w, the gradients are
    #   dx = rstd * (g - xhat * mean(g * xhat))    (mean over the row's C features)
    #   dw = sum over rows of dy * xhat.
    # Program p handles the rows_per_program rows from p * rows_per_program (rows past N are
    # masked off) and writes its own float32 partial sum of dw; the launcher adds the partial
    # rows. No atomics, so the result is deterministic.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    dw_part = dw_part_ptr + pid.to(tl.int64) * C

    if ROW_IN_BLOCK:
        # Row, weight and the partial sum stay in registers across all this program's rows.
        mask = cols < C
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            offset = row.to(tl.int64) * C
            valid = row < N  # the last program's group may run past N
            # cols < C, or nothing past N. Not `mask & valid`: the interpreter of triton 3.8+
            # rejects a block mask and'ed with a scalar; this compiles to the same registers.
            row_mask = cols < tl.where(valid, C, 0)
            x = tl.load(x_ptr + offset + cols, mask=row_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=row_mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=valid, other=0.0)
            xhat = x * rstd  # zero wherever row_mask is off, like g below
            g = dy * w
            mean_gx = tl.sum(g * xhat, axis=0) / C
            dx = rstd * (g - xhat * mean_gx)
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
            dw_acc += dy * xhat
        # Every program writes its whole partial row, so the launcher need not zero them.
        tl.store(dw_part + cols, dw_acc, mask=mask)
    else:
        # Rows longer than a block: per row, one sweep for mean(g * xhat) and one for dx. The
        # partial row lives in memory (zeroed by the launcher) and is read, added to and written
        # back per block. Only this program touches it, and the load and the store of an element
        # use the same (BLOCK_C,) layout, so the same thread does both: no barrier needed.
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            offset = row.to(tl.int64) * C
            valid = row < N
            C_row = tl.where(valid, C, 0)  # masks the whole row past N (see above)
            rstd = tl.load(rstd_ptr + row, mask=valid, other=0.0)

            gx_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for start in range(0, C, BLOCK_C):
                mask = start + cols < C_row
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0)
                gx_acc += dy * w * (x * rstd)
            mean_gx = tl.sum(gx_acc, axis=0) / C

            for start in range(0, C, BLOCK_C):
                mask = start + cols < C_row
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0)
                xhat = x * rstd
                dx = rstd * (dy * w - xhat * mean_gx)
                tl.store(dx_ptr + offset + start + cols, dx.to(dx_ptr.dtype.element_ty),
                         mask=mask)
                dw_old = tl.load(dw_part + start + cols, mask=mask)
                tl.store(dw_part + start + cols, dw_old + dy * xhat, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops (custom_op, not triton_op: see layer_norm.py).
@torch.library.custom_op("fastlm::rms_norm_fwd_triton", mutates_args=())
def rms_norm_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C), weight (C,) -> y (..., C) in x's dtype, rstd (...,) float32."""
    utils.check_rows("rms_norm_fwd_triton", x, weight)
    C = x.shape[-1]
    x2 = utils.as_rows(x)  # (N, C)
    N = x2.shape[0]
    w = weight.to(torch.float32).contiguous()  # (C,)
    y = utils.empty_output(x.shape, x.dtype, x.device)
    rstd = utils.empty_output(x.shape[:-1], torch.float32, x.device)
    if N == 0:
        return y, rstd
    blocks = utils.row_blocks(C)
    with utils.on_device(x.device):
        _rms_norm_fwd_kernel[(N,)](
            x2, w, y, rstd, C, eps,
            BLOCK_C=blocks.block_c, ROW_IN_BLOCK=blocks.row_in_block, num_warps=blocks.num_warps,
        )
    return y, rstd


@torch.library.custom_op("fastlm::rms_norm_bwd_triton", mutates_args=())
def rms_norm_bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., C), weight (C,), rstd (...,) float32 from the forward -> dx (..., C) in x's
    dtype, dweight (C,) in weight's dtype, summed in float32."""
    op = "rms_norm_bwd_triton"
    utils.check_rows(op, x, weight)
    if dy.shape != x.shape:
        raise ValueError(f"fastlm::{op}: 'dy' must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    utils.check_row_stats(op, x, rstd=rstd)
    C = x.shape[-1]
    x2 = utils.as_rows(x)  # (N, C)
    dy2 = utils.as_rows(dy, x.dtype)  # (N, C); autograd may hand a strided or expanded dy
    N = x2.shape[0]
    w = weight.to(torch.float32).contiguous()  # (C,)
    dx = utils.empty_output(x.shape, x.dtype, x.device)
    if N == 0:
        return dx, torch.zeros(C, dtype=weight.dtype, device=x.device)  # a sum over no rows
    blocks = utils.row_blocks(C)
    P, rows_per_program = utils.row_groups(N, x.device, blocks.num_warps)
    # The register path writes each partial row whole; the multi-block path adds into its rows.
    dw_part = utils.partial_rows(P, C, x.device, zeroed=not blocks.row_in_block)  # (P, C)
    with utils.on_device(x.device):
        _rms_norm_bwd_kernel[(P,)](
            dy2, x2, w, rstd.contiguous(), dx, dw_part, N, C, rows_per_program,
            BLOCK_C=blocks.block_c, ROW_IN_BLOCK=blocks.row_in_block, num_warps=blocks.num_warps,
        )
    return dx, dw_part.sum(dim=0).to(weight.dtype)  # fixed-order float32 sum of the partials


opdefs.register_rms_norm("fastlm::rms_norm_fwd_triton", "fastlm::rms_norm_bwd_triton")
