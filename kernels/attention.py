"""Triton flash attention, forward and backward: the ops fastlm::attention_fwd_triton and
fastlm::attention_bwd_triton (same schemas and semantics as the C++ fastlm::attention_fwd/_bwd).

    out = softmax(scale * q k^T + mask) v,   lse = logsumexp(scale * q k^T + mask) per query

q (B, H, Tq, D), k and v (B, H_kv, Tk, D) with H % H_kv == 0 (grouped-query / multi-query
attention: query head h reads key/value head h // (H / H_kv)). The mask keeps key j for query i
when j <= i + Tk - Tq (causal, queries aligned bottom-right) and j > i + Tk - Tq - window (a
sliding window, when window > 0). A query that sees no key gets out 0 and lse -inf.

Online softmax (FlashAttention-2): the forward walks the key blocks once with a running max and
sum, in base 2 (scores premultiplied by scale * log2(e)), and saves only lse (B, H, Tq) float32.
The backward recomputes the probabilities block by block from q, k and lse, in two kernels that
need no atomics: one per key block (dk, dv, summed over the query heads that share the key/value
head in registers) and one per query block (dq). Head dims are padded to a power of two >= 16
with masks; sequence tails are masked.

Dots run in the input dtype with float32 accumulation on a GPU (bf16/fp16 tensor cores, fp32
inputs with input_precision="ieee": tf32 would miss the float32 tolerance). Under
TRITON_INTERPRET=1 every load is converted to float32 first (the interpreter computes bf16 on raw
bits otherwise) and a single small block config runs.
"""
import math

import torch
import triton
import triton.language as tl

from fastlm.ops import autograd as opdefs
from fastlm.ops import triton_support
from fastlm.kernels import utils

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
LOG2E_C = tl.constexpr(LOG2E)  # the same, as kernel constants
LN2_C = tl.constexpr(LN2)


# ---------------------------------------------------------------------------------------------
# Block configs, per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) -> the padded head dims it
# may run at, (lowest, highest), with 16-bit inputs and with float32 inputs (None: never). The
# ranges are measured, not modelled: head dims at which the config compiles for both sm_80 and
# sm_90 (Triton 3.6) without spilling registers, read from the ahead-of-time table
# (bench/results/aot/triton.md); the CI run of that check (`python -m fastlm.bench.aot_check
# --ci`) compiles every config these ranges keep and fails if one spills. What they encode:
# 16-bit dots run on tensor cores with float32 accumulators of (BLOCK_M or BLOCK_N) x head dim
# in registers, so big tiles stop at head dim 64-128 and 256 needs 8 warps or small tiles;
# float32 dots take the ieee FMA path, whose operands live in registers too, so float32 gets
# tiles of at most 32 x 32 scores (every 64 x 64 config spilled at head dim 64 and above, up to
# 40 KB a thread). ptxas is not monotone in the head dim: a few small configs spill 8-20 bytes
# at head dim 16 or 32 and not above, hence a lowest head dim too.
# Before timing, the autotuner also drops configs whose shared memory (shared_memory_need)
# exceeds the GPU's. Interpreter: one config (no timing), 16 x 16 blocks so that small test
# shapes (T = 17, 128) cross several blocks and their tails.
_HEAD_DIMS = {
    "fwd": {
        (128, 64, 4, 3): ((16, 64), None), (128, 64, 8, 3): ((16, 128), None),
        (128, 128, 8, 3): ((16, 64), None), (64, 64, 4, 3): ((16, 128), None),
        (128, 32, 4, 4): ((16, 128), None), (64, 128, 4, 3): ((16, 128), None),
        (64, 64, 8, 2): ((16, 256), None), (64, 32, 8, 2): ((16, 256), None),
        (32, 32, 4, 1): ((16, 256), None),
        (16, 16, 4, 1): (None, (16, 256)), (16, 16, 8, 1): (None, (16, 256)),
        (32, 16, 8, 1): (None, (16, 256))},
    "dkdv": {
        (64, 64, 4, 3): ((16, 32), None), (128, 64, 8, 2): ((16, 32), None),
        (64, 32, 4, 3): ((16, 64), None), (32, 64, 8, 2): ((16, 128), None),
        (64, 32, 8, 2): ((16, 128), None), (32, 32, 8, 2): ((16, 128), None),
        (32, 32, 4, 2): ((16, 128), None), (16, 32, 4, 2): ((16, 256), None),
        (16, 16, 8, 1): (None, (16, 128)), (32, 16, 4, 1): (None, (32, 256))},
    "dq": {
        (128, 64, 8, 2): ((16, 64), None), (64, 64, 4, 3): ((16, 64), None),
        (64, 64, 8, 2): ((64, 256), None), (64, 32, 4, 3): ((16, 128), None),
        (32, 64, 4, 3): ((16, 256), None), (32, 32, 4, 2): ((16, 256), None),
        (32, 32, 4, 1): ((16, 256), None),
        (16, 16, 4, 1): (None, (16, 256)), (16, 16, 8, 1): (None, (16, 256)),
        (32, 16, 8, 1): (None, (16, 128)), (32, 32, 8, 1): (None, (16, 128))},
}


def _configs(kernel: str, interpret: bool = utils.INTERPRET) -> list:
    """The autotune configs of kernel "fwd", "dkdv" or "dq", for every dtype: the pruner keeps
    those whose head-dim range admits the call's dtype and head dim."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in _HEAD_DIMS[kernel]]


def runs_without_spilling(kernel: str, config, block_d: int, elsize: int) -> bool:
    """Whether `config` of `kernel` was measured not to spill registers at padded head dim
    block_d with elsize-byte inputs (see _HEAD_DIMS)."""
    key = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
           config.num_stages)
    dims = _HEAD_DIMS[kernel][key][1 if elsize == 4 else 0]
    return dims is not None and dims[0] <= block_d <= dims[1]


def shared_memory_need(kernel: str, config, block_d: int, elsize: int) -> int:
    """Bytes of shared memory a config of kernel "fwd", "dkdv" or "dq" needs (an upper bound).

    The tiles a kernel streams through its loop (k and v for fwd and dq, q and dO for dkdv) sit
    in shared memory once per pipeline stage (at least 2: num_stages=1 still double-buffers);
    with 16-bit inputs the tiles it holds for its whole life (q and dO, or k and v) are
    tensor-core operands in shared memory too (fp32 takes the ieee FMA path: registers); one
    (BLOCK_M, BLOCK_N) tile (p or ds) is staged for the second dot; 1 KB for reductions.
    Fitted to Triton 3.6's compiled kernels for sm_80 and sm_90, exact for the larger dkdv
    configs and above the rest (the ahead-of-time table, bench/results/aot/triton.md, shows
    both for every config).
    """
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    streamed, held = (m, n) if kernel == "dkdv" else (n, m)
    per_d = max(config.num_stages, 2) * 2 * streamed + (2 * held if elsize == 2 else 0)
    return elsize * (block_d * per_d + m * n) + 1024


def kept_configs(kernel: str, configs: list, block_d: int, elsize: int, limit: int) -> list:
    """The configs that run without spilling registers at this head dim and dtype and whose
    shared memory fits `limit` bytes; a clear error when none does."""
    kept = [c for c in configs if runs_without_spilling(kernel, c, block_d, elsize)
            and shared_memory_need(kernel, c, block_d, elsize) <= limit]
    if not kept:
        raise RuntimeError(
            f"fastlm::attention (triton, {kernel}): no block configuration fits this GPU's "
            f"shared memory and registers for head dim {block_d} (padded) with {elsize}-byte "
            f"inputs (the GPU has {limit // 1024} KB of shared memory per block). Use a "
            "smaller head dim or another backend (backend='torch').")
    return kept


def _prune(kernel: str):
    """early_config_prune for the autotuner of `kernel`: kept_configs for the GPU of q."""
    def prune(configs, named_args, **kwargs):
        q = named_args["q_ptr"]
        if q.device.type != "cuda":  # the interpreter: one config, no shared memory
            return configs
        props = triton.runtime.driver.active.utils.get_device_properties(q.device.index)
        return kept_configs(kernel, configs, kwargs["BLOCK_D"], q.element_size(),
                            props["max_shared_mem"])
    return {"early_config_prune": prune}


# Re-tune per head dim, mask kind, dtype and sequence-length bucket (powers of two), not per T.
_KEY = ["BLOCK_D", "CAUSAL", "HAS_WINDOW", "T_BUCKET"]  # the autotuner adds arg dtypes


@triton.jit
def _visible(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query offs_m sees key offs_n (both inside their sequences)."""
    pos = offs_m + (Tk - Tq)  # each query's position among the keys (bottom-right alignment)
    ok = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_n[None, :] > pos[:, None] - WINDOW)
    return ok


@triton.jit
def _key_range(start_m, Tq, Tk, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key blocks [lo, hi) that queries [start_m, start_m + BLOCK_M) can see; lo is a multiple of
    BLOCK_N so the blocks stay aligned."""
    lo = 0
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M + Tk - Tq, Tk)
    if HAS_WINDOW:
        lo = tl.maximum(start_m + Tk - Tq - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Forward
@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by=_prune("fwd"))
@triton.jit
def _attention_fwd_kernel(
    q_ptr,    # (B, H, Tq, D) contiguous
    k_ptr,    # (B, H_kv, Tk, D)
    v_ptr,    # (B, H_kv, Tk, D)
    o_ptr,    # (B, H, Tq, D) q's dtype
    lse_ptr,  # (B, H, Tq) float32
    H, N_REP, Tq, Tk, D, WINDOW,
    qk_scale,  # scale * log2(e)
    T_BUCKET,  # an autotune key only
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TO_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # b * H + h; int64: offsets may pass 2**31
    start_m = tl.program_id(1) * BLOCK_M
    bkv = bh // H * (H // N_REP) + bh % H // N_REP  # its key/value head
    q_base = q_ptr + bh * Tq * D
    k_base = k_ptr + bkv * Tk * D
    v_base = v_ptr + bkv * Tk * D
    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = offs_d < D

    q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if TO_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(start_m, Tq, Tk, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        kv_mask = (offs_n[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        if TO_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_visible(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW), s,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key seen yet
        p = tl.exp2(s - m_safe[:, None])  # masked scores -> 0
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_C,
                   float("-inf"))
    row_ok = offs_m < Tq
    tl.store(o_ptr + bh * Tq * D + offs_m[:, None] * D + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * Tq + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dk/dv per key block and dq per query block.
#   P = 2^(s2 - lse2), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
#   dQ = scale * dS K, dK = scale * dS^T Q     (s2, lse2: base-2 scores and log-sum-exp)
@triton.jit
def _attention_bwd_delta_kernel(
    o_ptr,      # (B * H * Tq, D)
    do_ptr,     # (B * H * Tq, D)
    delta_ptr,  # (B * H * Tq,) float32
    N, D,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    tl.store(delta_ptr + rows, tl.sum(o * do.to(tl.float32), axis=1), mask=rows < N)


@triton.autotune(configs=_configs("dkdv"), key=_KEY, prune_configs_by=_prune("dkdv"))
@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # as in the forward; do like q
    lse_ptr, delta_ptr,  # (B, H, Tq) float32
    dk_ptr, dv_ptr,  # (B, H_kv, Tk, D) k's dtype
    H, N_REP, Tq, Tk, D, WINDOW,
    qk_scale, sm_scale,
    T_BUCKET,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TO_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, key/value head): it loops over the N_REP query heads sharing
    # that head and over the query blocks that see the key block, so dk and dv stay in registers.
    bkv = tl.program_id(0).to(tl.int64)  # b * H_kv + hk
    start_n = tl.program_id(1) * BLOCK_N
    H_kv = H // N_REP
    bh0 = bkv // H_kv * H + bkv % H_kv * N_REP  # the group's first query head
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < Tk) & d_ok[None, :]
    k = tl.load(k_ptr + bkv * Tk * D + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask,
                other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptr + bkv * Tk * D + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask,
                other=0.0)
    if TO_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Queries that see some key of this block: position i + Tk - Tq >= start_n (causal) and
    # <= start_n + BLOCK_N - 1 + WINDOW - 1 (window).
    lo = 0
    hi = Tq
    if CAUSAL:
        lo = tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1 - (Tk - Tq), Tq)
    for g in range(0, N_REP):
        bh = bh0 + g
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < Tq) & d_ok[None, :]
            q_off = bh * Tq * D + offs_m[:, None] * D + offs_d[None, :]
            q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
            do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
            if TO_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(lse_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E_C
            delta = tl.load(delta_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            ok = _visible(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW)
            p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out_off = bkv * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("dq"), key=_KEY, prune_configs_by=_prune("dq"))
@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr,  # (B, H, Tq, D) q's dtype
    H, N_REP, Tq, Tk, D, WINDOW,
    qk_scale, sm_scale,
    T_BUCKET,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TO_F32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, query head), walking the key blocks it sees like the forward.
    bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    bkv = bh // H * (H // N_REP) + bh % H // N_REP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (offs_m[:, None] < Tq) & d_ok[None, :]
    q_off = bh * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0)
    if TO_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E_C
    delta = tl.load(delta_ptr + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(start_m, Tq, Tk, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Tk) & d_ok[None, :]
        k = tl.load(k_ptr + bkv * Tk * D + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(v_ptr + bkv * Tk * D + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        if TO_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _visible(offs_m, offs_n, Tq, Tk, WINDOW, CAUSAL, HAS_WINDOW)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + q_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers, registered as torch.library ops (custom_op, not triton_op: see layer_norm.py).
class _Launch:
    """What every kernel of one call shares: shapes, constexprs and autotune keys."""

    def __init__(self, op, q, k, v, causal, scale, window):
        reason = triton_support.unavailable_reason(q.device)
        if reason is not None:
            raise RuntimeError(f"fastlm::{op}: {reason}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"fastlm::{op}: '{name}' must be (B, H, T, D), got "
                                 f"{tuple(t.shape)}")
            if t.dtype not in utils.KERNEL_DTYPES or t.dtype != q.dtype:
                raise TypeError(f"fastlm::{op}: q, k, v must share one of float32, bfloat16, "
                                f"float16, got {q.dtype}, {k.dtype}, {v.dtype}")
            if t.device != q.device:
                raise ValueError(f"fastlm::{op}: '{name}' is on {t.device} but q is on {q.device}")
        B, H, Tq, D = q.shape
        if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 \
                or H % k.shape[1] != 0:
            raise ValueError(f"fastlm::{op}: k and v must be (B, H_kv, Tk, D) with H % H_kv == 0 "
                             f"and q's B and D, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)}")
        self.B, self.H, self.Tq, self.D = B, H, Tq, D
        self.H_kv, self.Tk = k.shape[1], k.shape[2]
        self.n_rep = H // self.H_kv
        self.window = int(window)
        fp32 = q.dtype == torch.float32
        self.common = dict(
            CAUSAL=bool(causal), HAS_WINDOW=self.window > 0,
            TO_F32=utils.INTERPRET or fp32, PRECISION="ieee" if fp32 else "tf32",
            BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs >= 16
        )
        self.keys = (triton.next_power_of_2(max(Tq, self.Tk, 1)),)
        self.qk_scale = float(scale) * LOG2E
        self.scale = float(scale)
        self.empty = B * H * Tq * D == 0

    # Grids: (batch x heads, sequence blocks). Batch x heads goes on axis 0, the one that holds
    # 2**31 - 1 programs; axes 1 and 2 hold 65,535, which B * H passes (e.g. 1024 x 64) long
    # before Tq / BLOCK_M does (2M tokens at the smallest BLOCK_M, 32).
    def grid_q(self):
        return lambda meta: (self.B * self.H, triton.cdiv(self.Tq, meta["BLOCK_M"]))

    def grid_kv(self):
        return lambda meta: (self.B * self.H_kv, triton.cdiv(self.Tk, meta["BLOCK_N"]))


@torch.library.custom_op("fastlm::attention_fwd_triton", mutates_args=())
def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Tq, D), k and v (B, H_kv, Tk, D) -> out (B, H, Tq, D) in q's dtype and lse
    (B, H, Tq) float32. window <= 0: no sliding window."""
    L = _Launch("attention_fwd_triton", q, k, v, causal, scale, window)
    out = utils.empty_output(q.shape, q.dtype, q.device)
    lse = utils.empty_output(q.shape[:-1], torch.float32, q.device)
    if L.empty:
        return out, lse
    with utils.on_device(q.device):
        _attention_fwd_kernel[L.grid_q()](
            q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
            L.H, L.n_rep, L.Tq, L.Tk, L.D, L.window, L.qk_scale, *L.keys, **L.common)
    return out, lse


@torch.library.custom_op("fastlm::attention_bwd_triton", mutates_args=())
def attention_bwd_triton(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                         window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout, out (B, H, Tq, D) and lse (B, H, Tq) from the forward -> dq, dk, dv in the dtypes
    and shapes of q, k, v (dk and dv summed over the query heads sharing a key/value head)."""
    op = "attention_bwd_triton"
    L = _Launch(op, q, k, v, causal, scale, window)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"fastlm::{op}: dout and out must have q's shape {tuple(q.shape)}, got "
                         f"{tuple(dout.shape)} and {tuple(out.shape)}")
    if lse.dtype != torch.float32 or lse.shape != q.shape[:-1]:
        raise ValueError(f"fastlm::{op}: lse must be the float32 {tuple(q.shape[:-1])} tensor "
                         f"the forward returned, got {lse.dtype} {tuple(lse.shape)}")
    dq = utils.empty_output(q.shape, q.dtype, q.device)
    dk = utils.empty_output(k.shape, k.dtype, k.device)
    dv = utils.empty_output(v.shape, v.dtype, v.device)
    if L.empty or L.Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()  # autograd may hand a strided or expanded dout
    lse = lse.contiguous()
    N = L.B * L.H * L.Tq
    delta = utils.empty_output((N,), torch.float32, q.device)
    # delta: 64 rows a program, 32 at head dim 256 (64 x 256 spilled 8 bytes a thread on sm_90)
    rows = 16 if utils.INTERPRET else min(64, 8192 // L.common["BLOCK_D"])
    with utils.on_device(q.device):
        _attention_bwd_delta_kernel[(triton.cdiv(N, rows),)](
            out.contiguous(), dout, delta, N, L.D, BLOCK_D=L.common["BLOCK_D"], BLOCK_M=rows)
        _attention_bwd_dkdv_kernel[L.grid_kv()](
            q, k, v, dout, lse, delta, dk, dv, L.H, L.n_rep, L.Tq, L.Tk, L.D, L.window,
            L.qk_scale, L.scale, *L.keys, **L.common)
        _attention_bwd_dq_kernel[L.grid_q()](
            q, k, v, dout, lse, delta, dq, L.H, L.n_rep, L.Tq, L.Tk, L.D, L.window,
            L.qk_scale, L.scale, *L.keys, **L.common)
    return dq, dk, dv


opdefs.register_attention("fastlm::attention_fwd_triton", "fastlm::attention_bwd_triton")
