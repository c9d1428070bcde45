"""Launch helpers shared by the Triton kernels: output allocation, input checks, row views and the
block-size / warp / program-count heuristics of row-wise kernels (norms, later softmax-like ops).

The row-wise kernels view x (..., C) as N contiguous rows of C features and give each row (forward)
or each group of rows (backward) to one Triton program. The heuristics below pick how many columns
one program touches per step (BLOCK_C), whether a whole row fits in that block (then the row stays
in registers and x is read once), how many warps share the block, and how many programs a
backward launches so its weight-gradient partial sums fill the GPU without atomics.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton

from fastlm.ops import triton_support

# True when Triton runs kernels on CPU tensors through its interpreter (how CPU CI runs them).
# Triton reads the variable when it is imported, so it must be set before that (tests/conftest.py
# does); reading it once here keeps the heuristics in step with what Triton decided.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Test switch (fastlm.ops.native.set_poison_outputs sets it): fill every output with NaN before a
# kernel writes it, so an element a kernel forgets to write fails the comparison with the reference.
POISON_OUTPUTS = False

# Dtypes the kernels load and store; everything is computed in float32 in between.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Longest row a program keeps whole in registers (x is then read once): 8192 columns on 16 warps
# x 128 registers per thread, the most a 512-thread program may have; wider blocks would spill.
MAX_BLOCK_C = 1024 if INTERPRET else 8192
# Backwards that keep more per column (layer_norm's with its bias gradient, cross-entropy's in
# float32) spill at 8192 columns (ptxas for sm_80/sm_90: bench/results/aot): they keep rows whole
# only up to this many columns and loop beyond.
BWD_MAX_BLOCK_C = min(MAX_BLOCK_C, 4096)
# Longer rows loop over blocks of this many columns. A loop streams, so a block need not hold the
# row: 2048 columns on 8 warps keep the looping backwards at ~64 registers (8192 would spill).
# The interpreter uses small blocks so CPU tests with C = 1025..16384 run the looping path.
LOOP_BLOCK_C = 1024 if INTERPRET else 2048


def _patch_interpreter_index() -> None:
    """Let the interpreter use runtime values as loop bounds (`for i in range(0, n)`) with numpy
    >= 2.4.

    Triton 3.6's interpreter holds every scalar as a shape-(1,) numpy array and converts it with
    int(array), which numpy 2.4 made an error (triton-lang/triton#9171). This redoes that one
    conversion on the single element (harmless with older numpy); the rest is untouched.
    """
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # a Triton whose interpreter is organised differently
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Enter around every launch, with the tensors' device: Triton launches on the current CUDA
    device (its context and stream), so tensors on cuda:1 while cuda:0 is current would go to a
    kernel running on the wrong GPU. CPU tensors (the interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, NaN-filled when POISON_OUTPUTS is set (see above). Use it for every tensor a
    kernel must fully write: outputs and scratch alike."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.numel() > 0:
        out.fill_(float("nan"))
    return out


def partial_rows(P: int, C: int, device: torch.device, zeroed: bool) -> torch.Tensor:
    """(P, C) float32 scratch for a backward's per-program partial sums. zeroed=True for kernels
    that add into it; otherwise the kernel writes every element and the buffer is poisonable."""
    if zeroed:
        return torch.zeros((P, C), dtype=torch.float32, device=device)
    return empty_output((P, C), torch.float32, device)


def check_rows(op: str, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> None:
    """Validate a row-wise op's x (..., C) and its per-feature weight (and bias) of shape (C,).

    Errors name the op and the argument, like the C++ checks in csrc/common/checks.h.
    """
    reason = triton_support.unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"fastlm::{op}: {reason}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"fastlm::{op}: 'x' must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fastlm::{op}: 'x' must have a non-empty last (feature) dimension, "
                         f"got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"fastlm::{op}: '{name}' is on {t.device} but 'x' is on {x.device}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"fastlm::{op}: '{name}' must be float32, bfloat16 or float16, "
                            f"got {t.dtype}")
        if tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"fastlm::{op}: '{name}' must have shape ({x.shape[-1]},) to match "
                             f"x's last dimension, got {tuple(t.shape)}")


def check_row_stats(op: str, x: torch.Tensor, **stats: torch.Tensor) -> None:
    """Validate the per-row statistics a forward saved for its backward: float32, x.shape[:-1]."""
    for name, t in stats.items():
        if t.dtype != torch.float32 or t.shape != x.shape[:-1] or t.device != x.device:
            raise ValueError(f"fastlm::{op}: '{name}' must be the float32 {tuple(x.shape[:-1])} "
                             f"tensor the forward returned (on {x.device}), got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


def as_rows(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(..., C) -> (N, C) contiguous (a view when t already is), optionally cast to dtype: the
    layout the kernels index as row * C + col."""
    if dtype is not None:
        t = t.to(dtype)
    return t.reshape(-1, t.shape[-1]).contiguous()


class RowBlocks(NamedTuple):
    """How a row-wise kernel walks a row of C features."""
    block_c: int        # columns per step, a power of two (tl.arange needs one)
    row_in_block: bool  # C <= max_block_c: the row stays in registers, x is read once
    num_warps: int      # warps of one program


def row_blocks(C: int, max_block_c: int = MAX_BLOCK_C) -> RowBlocks:
    """Block heuristics for rows of C features.

    Rows up to max_block_c (MAX_BLOCK_C; BWD_MAX_BLOCK_C for the heavier backwards): one block
    of C rounded up to a power of two (tl.arange needs one). Longer rows: blocks of
    LOOP_BLOCK_C. Warps: about 8 elements per thread (BLOCK_C / 256 warps), i.e. one 16-byte
    vector load per thread in bf16, from 1 warp (tiny rows) to 16 warps (8192 columns, 16
    elements per thread).
    """
    row_in_block = C <= max_block_c
    block_c = triton.next_power_of_2(C) if row_in_block else LOOP_BLOCK_C
    num_warps = min(16, max(1, block_c // 256))
    return RowBlocks(block_c, row_in_block, num_warps)


class RowGroups(NamedTuple):
    """How a backward splits N rows among its programs: program p takes rows
    [p * rows_per_program, (p + 1) * rows_per_program), the last one masked at N."""
    programs: int
    rows_per_program: int


def row_groups(N: int, device: torch.device, num_warps: int) -> RowGroups:
    """Split N >= 1 rows among the programs of a backward that sums per-feature gradients.

    Each program writes one float32 partial row of the gradient, so the count trades occupancy
    against the size of the partials the final sum reads. On a GPU: 16 warps per SM, since the
    backwards use up to 128 registers per thread and 16 warps x 32 threads x 128 registers is an
    H100 SM's whole register file: every program is resident in the one wave, no tail. Small
    programs get several per SM: C=768 -> 4 warps -> 4 per SM -> 528 programs on 132 SMs, whose
    (528, 768) float32 partials (1.6 MB) are small beside x, dy and dx. The interpreter runs
    programs one after another, so a few suffice to exercise several rows per program.
    """
    if INTERPRET or device.type != "cuda":
        target = 4
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = sms * max(1, 16 // num_warps)
    rows_per_program = triton.cdiv(N, min(N, target))
    return RowGroups(triton.cdiv(N, rows_per_program), rows_per_program)  # no program left empty
