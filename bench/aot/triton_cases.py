"""The launcher calls whose kernel launches the ahead-of-time check compiles.

Each case calls a fastlm Triton launcher (the registered op's Python body) on small CPU
tensors while bench.aot.capture records the launches. The shapes are chosen to reach every
configuration the launcher's own heuristics can pick: for the row-wise kernels one feature count
per power-of-two block up to MAX_BLOCK_C plus one past it (the looping path), each both a
multiple of 16 and not (Triton specialises on 16-divisible sizes); for attention every padded
head dim. Nothing here copies a block size: they come out of the launchers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256)  # every padded head dim the kernels accept


def row_sizes() -> list[int]:
    """Feature counts that reach every block config of kernels.utils.row_blocks: per power of
    two p up to MAX_BLOCK_C, p itself (16-divisible once p >= 16) and p / 2 + 1 (not), then
    the same pair past MAX_BLOCK_C (the looping path)."""
    from fastlm.kernels import utils

    top = utils.MAX_BLOCK_C
    sizes = {1}
    for k in range(1, int(math.log2(top)) + 1):
        p = 2 ** k
        sizes |= {p, p // 2 + 1}
    return sorted(sizes | {top + 16, top + 1}, reverse=True)  # the biggest blocks (most
    # registers) first: a run cut short has compiled the likeliest spills


def _rows(n: int, c: int, dtype) -> torch.Tensor:
    return torch.randn(n, c).to(dtype)


# Row counts for the backwards that split rows among programs: 1 row per program (Triton turns
# the count into a constant) and several (the usual case on a GPU).
BWD_ROWS = (1, 68)


def norm_cases() -> Iterator[Callable[[], None]]:
    from fastlm.kernels import layer_norm, rms_norm

    for dtype in DTYPES:
        for C in row_sizes():
            def ln(C=C, dtype=dtype):
                w = torch.randn(C)
                for bias in (None, torch.randn(C)):
                    x = _rows(4, C, dtype)
                    layer_norm.layer_norm_fwd_triton(x, w, bias, 1e-5)
                    for n in BWD_ROWS:
                        x = _rows(n, C, dtype)
                        stats = torch.zeros(n), torch.ones(n)
                        layer_norm.layer_norm_bwd_triton(x, x, w, *stats, bias is not None)

            def rms(C=C, dtype=dtype):
                w = torch.randn(C)
                rms_norm.rms_norm_fwd_triton(_rows(4, C, dtype), w, 1e-5)
                for n in BWD_ROWS:
                    x = _rows(n, C, dtype)
                    rms_norm.rms_norm_bwd_triton(x, x, w, torch.ones(n))
            yield ln
            yield rms


def cross_entropy_cases() -> Iterator[Callable[[], None]]:
    """cross_entropy's three kernels (linear_cross_entropy launches the fused one)."""
    from fastlm.kernels import cross_entropy as ce

    for dtype in DTYPES:
        for V in row_sizes():
            def case(V=V, dtype=dtype):
                x, t = _rows(4, V, dtype), torch.zeros(4, dtype=torch.long)
                for smoothing in (0.0, 0.1):
                    ce.cross_entropy_fwd_triton(x, t, -100, smoothing, 0.0)
                    ce.cross_entropy_fwd_inplace_triton(x.clone(), t, torch.ones(()), -100,
                                                        smoothing, 0.0)
                ce.cross_entropy_bwd_triton(torch.ones(4), x, t, torch.zeros(4), -100, 0.1, 0.0)
            yield case


def adamw_cases() -> Iterator[Callable[[], None]]:
    """Every param dtype x state dtype (float32 or the param's), with and without master
    weights, constants from the host and from device tensors; lists of 1, 3, 16 and 100 tensors
    (the launcher specialises on the count: its binary search takes log2(count) steps), all
    16-byte aligned or one not (vector accesses or not)."""
    from fastlm.kernels import adamw_step

    def tensors(count, dtype, aligned):
        out = [torch.randn(300).to(dtype) for _ in range(count)]
        if not aligned:  # a view 1 element into its storage: off 16-byte alignment
            out[-1] = torch.randn(301).to(dtype)[1:]
        return out

    for dtype in DTYPES:
        for state in {torch.float32, dtype}:
            for count in (1, 3, 16, 100):
                for aligned in (True, False):
                    def case(dtype=dtype, state=state, count=count, aligned=aligned):
                        p, g = tensors(count, dtype, aligned), tensors(count, dtype, True)
                        m = [torch.zeros(300, dtype=state) for _ in range(count)]
                        v = [torch.zeros(300, dtype=state) for _ in range(count)]
                        # master weights: 16-bit params with float32 states
                        master = [torch.randn(300) for _ in range(count)] \
                            if dtype != state else []
                        adamw_step.adamw_step_triton(p, g, m, v, 1.0, 1e-3, 0.9, 0.95, 1e-8,
                                                     0.1)
                        if master:
                            adamw_step.adamw_step_master_triton(p, g, m, v, master, 1.0, 1e-3,
                                                                0.9, 0.95, 1e-8, 0.1)
                        adamw_step.adamw_step_capturable_triton(
                            p, g, m, v, master, [torch.ones(()) for _ in range(count)],
                            torch.full((), 1e-3), 0.9, 0.95, 1e-8, 0.1)
                    yield case


def attention_cases() -> Iterator[Callable[[], None]]:
    """Forward and backward per dtype and padded head dim: causal with a sliding window and
    grouped-query heads (the variant with the most live values; the others only drop masks),
    head dim = the padded one, sequences long enough for several blocks of every config."""
    from fastlm.kernels import attention

    for dtype in DTYPES:
        for d in ATTENTION_HEAD_DIMS:
            def case(d=d, dtype=dtype):
                q = torch.randn(1, 4, 256, d).to(dtype)
                k, v = (torch.randn(1, 2, 256, d).to(dtype) for _ in range(2))
                out, _ = attention.attention_fwd_triton(q, k, v, True, d ** -0.5, 64)
                attention.attention_bwd_triton(q, q, k, v, out, torch.zeros(1, 4, 256), True,
                                               d ** -0.5, 64)
            yield case


CASES = {"layer_norm+rms_norm": norm_cases, "cross_entropy": cross_entropy_cases,
         "adamw_step": adamw_cases, "attention": attention_cases}
