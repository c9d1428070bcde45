"""Prepacked Linear weights for inference on CPU: oneDNN's blocked layout, packed once.

    from fastlm.models.packed_linear import pack_linears, unpack_linears
    n = pack_linears(model)   # every CPU float32/bfloat16 nn.Linear of model; returns how many
    ...                       # no_grad forwards now run the packed matmul
    unpack_linears(model)     # back to plain F.linear, the packed copies freed

Why: a decode step multiplies one token per row by every weight matrix, so it is bound by how
fast the weights stream from memory. F.linear on a row-major (out, in) weight gives that badly
on this machine: MKL's fp32 GEMM and the per-call weight reorder of bf16 matmuls leave most of
the bandwidth unused. Measured on the 2-core AMD EPYC (gpt2-124m's 48 block matrices plus the
head, with biases, one pass, 1 thread, process time): F.linear -> packed, float32 batch 1
30.6 -> 16.0 ms, batch 8 63.2 -> 23.7 ms; bfloat16 batch 1 18.4 -> 9.5 ms, batch 8 21.8 ->
13.4 ms. A prompt's prefill (hundreds of rows) is ~2x faster too. This is the prepacking torch.compile's CPU
backend does when it freezes weights (torch.ops.mkldnn._linear_pointwise), done here without
compiling.

Decode steps of up to SMALL_ROWS rows skip the packed copy: fastlm's small-rows kernel
(torch.ops.fastlm.small_rows_linear, csrc/small_rows_linear) streams the row-major weight once
for all rows, float32 or bfloat16, at close to the memory's speed on every core.

Cost and rules: the packed copy is a second copy of every packed weight (memory x2 for the
matrices). The packed path runs only when it computes exactly what F.linear would: no autograd
needed (grad mode off or nothing requires grad), x in the weight's dtype on the CPU, and the
weight unchanged since packing (its version counter and storage are checked on every call; a
changed weight is repacked on the next call, so training between generations stays correct).
Anything else falls through to F.linear. pack_linears checks once per dtype that the private
op exists and agrees with F.linear on a small product, and packs nothing otherwise.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)
_probe: dict[torch.dtype, str | None] = {}  # dtype -> None (works) or why not


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when packed matmuls work for dtype on this CPU, else why not (cached)."""
    if dtype not in _DTYPES:
        return f"{dtype} is not packed (only float32 and bfloat16)"
    if dtype not in _probe:
        _probe[dtype] = _check(dtype)
    return _probe[dtype]


def _check(dtype: torch.dtype) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(37, 19, generator=g).to(dtype)  # (out, in): odd sizes on purpose
        b = torch.randn(37, generator=g).to(dtype)
        x = torch.randn(3, 5, 19, generator=g).to(dtype)  # (B, T, in)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(
            w, 1), b, "none", [], "")
        want = F.linear(x.float(), w.float(), b.float())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=tol, atol=tol):
            return "torch.ops.mkldnn._linear_pointwise disagrees with F.linear here"
    except (RuntimeError, AttributeError) as exc:
        return f"torch.ops.mkldnn linear ops unusable: {exc}"
    return None


class _Packed:
    __slots__ = ("ptr", "version", "weight")

    def __init__(self, w: torch.Tensor):
        # The batch-size hint only picks oneDNN's blocking; any row count works afterwards.
        # Hint 1 is the slow one: gpt2-124m's matrices at 1 / 8 rows, fp32, took 20.1 / 33.8 ms
        # packed for 1 and 14.9-15.7 / 21.3-24.0 ms for any hint from 4 to 64 (16 picked).
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
        self.version, self.ptr = w._version, w.data_ptr()


# Up to this many rows of x (one decode step of up to 4 sequences) go to fastlm's own
# small-rows kernel on the row-major weight: one pass over W streams it at ~20 GB/s on 2 cores,
# oneDNN's packed product 11-16 GB/s (gpt2-124m's matrices, Zen 3 EPYC). Beyond, W would be
# read once per 4 rows, and oneDNN's blocked GEMM wins.
SMALL_ROWS = 4


@functools.cache
def _small_rows_op():
    """torch.ops.fastlm.small_rows_linear, or None where fastlm._C lacks it (not built)."""
    from fastlm.ops import native  # loads fastlm._C

    if native.NATIVE_ERROR is not None or not hasattr(torch.ops.fastlm, "small_rows_linear"):
        return None
    return torch.ops.fastlm.small_rows_linear


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (x.dtype != w.dtype or x.device.type != "cpu" or w.device.type != "cpu"
            or torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
        return F.linear(x, w, self.bias)
    bias = None if self.bias is None else self.bias.detach()
    rows = x.numel() // max(1, x.shape[-1])
    if (rows <= SMALL_ROWS and x.shape[-1] == w.shape[1] and w.dtype in _DTYPES
            and (bias is None or bias.dtype == w.dtype)):
        small = _small_rows_op()
        if small is not None:  # reads w itself: nothing to repack when it changes
            y = small(x.reshape(rows, w.shape[1]), w.detach(), bias)
            return y.reshape(*x.shape[:-1], w.shape[0])
    packed = self._fastlm_packed
    if packed is None or packed.version != w._version or packed.ptr != w.data_ptr():
        if unavailable_reason(w.dtype) is not None:  # no oneDNN packing for this dtype here
            return F.linear(x, w, self.bias)
        packed = self._fastlm_packed = _Packed(w)  # trained or moved since packing
    return torch.ops.mkldnn._linear_pointwise(x, packed.weight, bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Pack every nn.Linear of model whose weight is a CPU float32/bfloat16 tensor (idempotent);
    returns the number packed. Linears of other dtypes or devices are left alone. Where oneDNN
    cannot pack a dtype on this CPU (bfloat16 without AVX-512/AVX-NE-CONVERT), its Linears
    still get the small-rows kernel for decode steps and F.linear for the rest."""
    n = 0
    small_rows = _small_rows_op() is not None
    for m in model.modules():
        if not isinstance(m, nn.Linear) or m.weight.device.type != "cpu":
            continue
        if m.weight.dtype not in _DTYPES:
            continue
        packable = unavailable_reason(m.weight.dtype) is None
        if not packable and not small_rows:
            continue
        if m.bias is not None and m.bias.dtype != m.weight.dtype:
            continue
        m._fastlm_packed = _Packed(m.weight) if packable else None
        m.forward = types.MethodType(_forward, m)  # instance attribute: the class is untouched
        n += 1
    return n


def unpack_linears(model: nn.Module) -> int:
    """Undo pack_linears: plain F.linear again, packed copies freed; returns how many."""
    n = 0
    for m in model.modules():
        if "_fastlm_packed" in m.__dict__:
            del m._fastlm_packed, m.forward
            n += 1
    return n


def is_packed(module: nn.Module) -> bool:
    return "_fastlm_packed" in module.__dict__
