"""Triton layer_norm, forward and backward: the ops fastlm::layer_norm_fwd_triton and
fastlm::layer_norm_bwd_triton (same schemas and semantics as the C++ fastlm::layer_norm_fwd/_bwd).

    y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps),   var biased (/ C)

x (..., C) is viewed as N contiguous rows of C features. Loads are converted to float32 at once
and every statistic is float32; y and dx are stored in x's dtype. weight and bias are converted to
float32 by the launcher (they may be float32 while x is bf16/fp16: mixed precision).

Layout of this file, which later row-wise kernels copy: kernels (shapes in comments) -> launchers
registered with torch.library.custom_op -> fastlm.ops.autograd.register_layer_norm, which attaches the
fake kernels and the autograd formula shared with the C++ backend.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.kernels import utils


# ---------------------------------------------------------------------------------------------
# Kernels
@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,     # (N, C) x's dtype
    w_ptr,     # (C,) float32
    b_ptr,     # (C,) float32; not read when HAS_BIAS is False
    y_ptr,     # (N, C) x's dtype
    mean_ptr,  # (N,) float32
    rstd_ptr,  # (N,) float32
    C,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,       # columns per step, a power of two
    ROW_IN_BLOCK: tl.constexpr,  # the whole row fits in one block (C <= BLOCK_C)
):
    # One program per row. int64 before multiplying: N * C may exceed 2**31 elements.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * C
    y_row = y_ptr + row * C
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)

    if ROW_IN_BLOCK:
        # The whole row fits in registers: read x once, then two exact passes over registers
        # (mean, then the variance of the centred values, which cancels less than E[x^2] - mean^2).
        mask = cols < C
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)  # padding lanes must not add (0 - mean)^2
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
        y = xc * rstd * tl.load(w_ptr + cols, mask=mask)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Rows longer than a block: three sweeps over column blocks (mean, variance, output). The
        # second and third reads of the row hit L2. Sums go into a (BLOCK_C,) float32 accumulator
        # reduced once at the end: one cross-lane reduction per sweep, and each lane adds only
        # C / BLOCK_C terms, which rounds less than one running scalar would.
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            acc += tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / C

        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)

        for start in range(0, C, BLOCK_C):
            mask = start + cols < C
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * tl.load(w_ptr + start + cols, mask=mask)
            if HAS_BIAS:
                y += tl.load(b_ptr + start + cols, mask=mask)
            tl.store(y_row + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,       # (N, C) x's dtype
    x_ptr,        # (N, C) x's dtype
    w_ptr,        # (C,) float32
    mean_ptr,     # (N,) float32
    rstd_ptr,     # (N,) float32
    dx_ptr,       # (N, C) x's dtype
    dw_part_ptr,  # (P, C) float32: row p = program p's sum of dy * xhat over its rows
    db_part_ptr,  # (P, C) float32: row p = program p's sum of dy; not touched unless HAS_BIAS
    N,
    C,
    rows_per_program,
    HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROW_IN_BLOCK: tl.constexpr,
):
    # With xhat = (x - mean) * rstd and g = dy * w, the gradients are
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))    (means over the row's C features)
    #   dw = sum over rows of dy * xhat,   db = sum over rows of dy.
    # Program p handles the rows_per_program rows from p * rows_per_program (the last program may
    # run past N: those rows are masked off) and writes its own float32 partial sums of dw and db;
    # the launcher adds the partial rows. No atomics, so the result is deterministic.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    dw_part = dw_part_ptr + pid.to(tl.int64) * C
    db_part = db_part_ptr + pid.to(tl.int64) * C

    if ROW_IN_BLOCK:
        # Row, weight and both partial sums stay in registers across all this program's rows.
        mask = cols < C
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            offset = row.to(tl.int64) * C
            valid = row < N  # the last program's group may run past N
            # cols < C, or nothing past N. Not `mask & valid`: the interpreter of triton 3.8+
            # rejects a block mask and'ed with a scalar; this compiles to the same registers.
            row_mask = cols < tl.where(valid, C, 0)
            x = tl.load(x_ptr + offset + cols, mask=row_mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=row_mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row, mask=valid, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=valid, other=0.0)
            xhat = tl.where(row_mask, (x - mean) * rstd, 0.0)
            g = dy * w  # zero wherever row_mask is off, since dy is loaded as 0 there
            mean_g = tl.sum(g, axis=0) / C
            mean_gx = tl.sum(g * xhat, axis=0) / C
            dx = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
            dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        # Every program writes its whole partial row, so the launcher need not zero them.
        tl.store(dw_part + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(db_part + cols, db_acc, mask=mask)
    else:
        # Rows longer than a block: per row, one sweep for the two means and one for dx. The
        # partial rows live in memory (zeroed by the launcher) and are read, added to and written
        # back per block. Only this program touches its partial row, and the load and the store of
        # an element use the same (BLOCK_C,) layout, so the same thread does both: no barrier.
        for i in range(0, rows_per_program):
            row = pid * rows_per_program + i
            offset = row.to(tl.int64) * C
            valid = row < N
            C_row = tl.where(valid, C, 0)  # masks the whole row past N (see above)
            mean = tl.load(mean_ptr + row, mask=valid, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=valid, other=0.0)

            g_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            gx_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for start in range(0, C, BLOCK_C):
                mask = start + cols < C_row
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g_acc += dy * w
                gx_acc += dy * w * xhat
            mean_g = tl.sum(g_acc, axis=0) / C
            mean_gx = tl.sum(gx_acc, axis=0) / C

            for start in range(0, C, BLOCK_C):
                mask = start + cols < C_row
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0)
                xhat = (x - mean) * rstd
                dx = rstd * (dy * w - mean_g - xhat * mean_gx)
                tl.store(dx_ptr + offset + start + cols, dx.to(dx_ptr.dtype.element_ty),
                         mask=mask)
                dw_old = tl.load(dw_part + start + cols, mask=mask)
                tl.store(dw_part + start + cols, dw_old + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db_old = tl.load(db_part + start + cols, mask=mask)
                    tl.store(db_part + start + cols, db_old + dy, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops. custom_op rather than triton_op: under
# TRITON_INTERPRET=1 (CPU CI) triton_op breaks torch.compile, custom_op works everywhere.
@torch.library.custom_op("fastlm::layer_norm_fwd_triton", mutates_args=())
def layer_norm_fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., C), weight (C,), bias (C,) or None -> y (..., C) in x's dtype, mean and rstd
    (...,) float32."""
    utils.check_rows("layer_norm_fwd_triton", x, weight, bias)
    C = x.shape[-1]
    x2 = utils.as_rows(x)  # (N, C)
    N = x2.shape[0]
    w = weight.to(torch.float32).contiguous()  # (C,)
    b = w if bias is None else bias.to(torch.float32).contiguous()  # (C,); w is a placeholder
    # Outputs in their final shapes (contiguous, so the kernel's flat row * C indexing holds).
    y = utils.empty_output(x.shape, x.dtype, x.device)
    mean = utils.empty_output(x.shape[:-1], torch.float32, x.device)
    rstd = utils.empty_output(x.shape[:-1], torch.float32, x.device)
    if N == 0:
        return y, mean, rstd
    blocks = utils.row_blocks(C)
    with utils.on_device(x.device):
        _layer_norm_fwd_kernel[(N,)](
            x2, w, b, y, mean, rstd, C, eps,
            HAS_BIAS=bias is not None, BLOCK_C=blocks.block_c, ROW_IN_BLOCK=blocks.row_in_block,
            num_warps=blocks.num_warps,
        )
    return y, mean, rstd


@torch.library.custom_op("fastlm::layer_norm_bwd_triton", mutates_args=())
def layer_norm_bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x (..., C), weight (C,), mean and rstd (...,) float32 from the forward -> dx (..., C)
    in x's dtype, dweight (C,) and dbias (C,) in weight's dtype (dbias is empty (0,) when
    has_bias is False). dweight and dbias are summed in float32."""
    op = "layer_norm_bwd_triton"
    utils.check_rows(op, x, weight)
    if dy.shape != x.shape:
        raise ValueError(f"fastlm::{op}: 'dy' must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    utils.check_row_stats(op, x, mean=mean, rstd=rstd)
    C = x.shape[-1]
    x2 = utils.as_rows(x)  # (N, C)
    dy2 = utils.as_rows(dy, x.dtype)  # (N, C); autograd may hand a strided or expanded dy
    N = x2.shape[0]
    w = weight.to(torch.float32).contiguous()  # (C,)
    dx = utils.empty_output(x.shape, x.dtype, x.device)
    no_bias = weight.new_empty(0)
    if N == 0:  # no launch; the gradients are sums over no rows
        dw = torch.zeros(C, dtype=weight.dtype, device=x.device)
        return dx, dw, torch.zeros_like(dw) if has_bias else no_bias
    blocks = utils.row_blocks(C, utils.BWD_MAX_BLOCK_C)
    P, rows_per_program = utils.row_groups(N, x.device, blocks.num_warps)
    # The register path writes each partial row whole; the multi-block path adds into its rows.
    zeroed = not blocks.row_in_block
    dw_part = utils.partial_rows(P, C, x.device, zeroed)  # (P, C) float32
    db_part = utils.partial_rows(P, C, x.device, zeroed) if has_bias else dw_part  # placeholder
    with utils.on_device(x.device):
        _layer_norm_bwd_kernel[(P,)](
            dy2, x2, w, mean.contiguous(), rstd.contiguous(), dx, dw_part, db_part, N, C,
            rows_per_program,
            HAS_BIAS=has_bias, BLOCK_C=blocks.block_c, ROW_IN_BLOCK=blocks.row_in_block,
            num_warps=blocks.num_warps,
        )
    # Fixed-order float32 sums of the partial rows, then weight's dtype.
    dw = dw_part.sum(dim=0).to(weight.dtype)  # (C,)
    return dx, dw, db_part.sum(dim=0).to(weight.dtype) if has_bias else no_bias

opdefs.register_layer_norm("fastlm::layer_norm_fwd_triton", "fastlm::layer_norm_bwd_triton")
