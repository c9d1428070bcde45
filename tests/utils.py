"""Tolerances and comparison helpers shared by the kernel tests (README: How an op is verified).

float32 kernels are compared with the float32 reference by rtol/atol (one row per dtype, with
its reason). bf16/fp16 kernels follow FlashAttention's rule: their error against the float32
reference is at most LOWP_FACTOR x PyTorch's own error at that precision on the same inputs (plus
a floor of one unit in the last place of the largest value plus float32's atol, for outputs
PyTorch gets exactly: an error under those is below what the float32 tests accept anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fastlm.ops


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str


TOLERANCES = {
    torch.float32: Tolerance(
        rtol=1e-5, atol=1e-5,
        reason="same math in float32; only the summation order differs (blocked / lane sums "
               "vs torch's), worth a few ulp per reduction"),
    torch.float64: Tolerance(rtol=1e-10, atol=1e-10, reason="reference-vs-reference checks"),
}
# float32 rows of ops whose reductions are long matrix products (T keys x D features, V logits x D):
# a blocked order differs from torch's by more than a norm's few ulp.
OP_FLOAT32_TOLERANCES = {
    "attention": Tolerance(
        rtol=1e-4, atol=1e-4,
        reason="online softmax over key tiles and tiled dot products over D reorder sums of up "
               "to T*D terms (1e-4 for attention/matmul, tf32 off)"),
}
LOWP_FACTOR = 2.0  # bf16/fp16 kernel error <= 2 x torch's own error at that precision


def float32_tolerance(op: str) -> Tolerance:
    """The float32 row for `op`: its own where it has one, else the default."""
    return OP_FLOAT32_TOLERANCES.get(op, TOLERANCES[torch.float32])


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, name: str) -> str:
    """Where and how badly two tensors differ, naming unwritten (NaN) elements explicitly."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan = torch.isnan(a) & ~torch.isnan(e)
    lines = [f"{name}: shape {tuple(a.shape)}, dtype {actual.dtype}"]
    if nan.any():
        lines.append(f"  {int(nan.sum())} NaN elements where the reference is finite "
                     f"(unwritten output? first at {tuple(nan.nonzero()[0].tolist())})")
    diff = (a - e).abs().nan_to_num(float("inf"))
    if diff.numel():
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        lines.append(f"  max |diff| {diff.max().item():.3e} at {idx}: actual {a[idx].item():.6g}, "
                     f"expected {e[idx].item():.6g}")
    return "\n".join(lines)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str,
                 dtype: torch.dtype | None = None) -> None:
    """Tolerance-table comparison (float32/float64 kernels)."""
    tol = TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    ok = torch.allclose(actual.double(), expected.double(), rtol=tol.rtol, atol=tol.atol)
    assert ok, mismatch_report(actual, expected, name) + f"\n  tolerance: {tol}"


def assert_lowp_close(actual: torch.Tensor, reference: torch.Tensor, torch_lowp: torch.Tensor,
                      name: str) -> None:
    """bf16/fp16 rule: max|actual - ref| <= LOWP_FACTOR * max|torch_lowp - ref| + floor."""
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    a, r, t = actual.double(), reference.double(), torch_lowp.double()
    ours = (a - r).abs().nan_to_num(float("inf")).max().item() if a.numel() else 0.0
    theirs = (t - r).abs().max().item() if a.numel() else 0.0
    ulp = torch.finfo(actual.dtype if actual.dtype != torch.float32 else torch_lowp.dtype).eps
    floor = ulp * (r.abs().max().item() if r.numel() else 0.0) + TOLERANCES[torch.float32].atol
    bound = LOWP_FACTOR * theirs + floor
    assert ours <= bound, (mismatch_report(actual, reference, name)
                           + f"\n  error {ours:.3e} > {LOWP_FACTOR} x torch's {theirs:.3e} "
                             f"+ ulp floor {floor:.3e}")


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU reports the instructions of fastlm's AVX512-BF16 paths (the C++
    kernels' use_avx512_bf16(), before its FASTLM_NO_AVX512BF16 switch)."""
    from fastlm.precision import cpu_flags

    return {"avx512f", "avx512bw", "avx512_bf16"} <= (cpu_flags() or set())


def require_backend(op: str, backend: str, device: torch.device) -> None:
    """Skip (with the reason) when a backend cannot run here, failing instead where CI demands
    it: FASTLM_REQUIRE_BACKENDS=cpu,triton (set by .ci/run) turns a silent skip of a backend that
    should have been built into an error."""
    import os

    reason = fastlm.ops.unavailable_reason(op, backend, device)
    if reason is None:
        return
    required = os.environ.get("FASTLM_REQUIRE_BACKENDS", "").split(",")
    if backend in required and device.type == "cpu":
        pytest.fail(f"backend '{backend}' is required here (FASTLM_REQUIRE_BACKENDS) but: {reason}")
    pytest.skip(reason)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0, shift=0.0):
    """Fresh random input (never zeros), created in float32 then cast."""
    t = torch.randn(*shape, device=device) * scale + shift
    return t.to(dtype).requires_grad_(requires_grad)


def forward_backward(fn, inputs: list[torch.Tensor | None], dy_seed: int = 1):
    """Run fn(*inputs) and backpropagate a fixed random dy: (out, [grad of each input that
    requires grad, None for the others]). dy is drawn from its own seed so every backend sees
    the same upstream gradient."""
    out = fn(*inputs)
    gen = torch.Generator(device="cpu").manual_seed(dy_seed)
    dy = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    wants = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wants, dy) if wants and out.numel() else
                 [torch.zeros_like(t) for t in wants])
    return out.detach(), [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None
                          for t in inputs]


def fp32_copies(inputs):
    """Detached float32 copies of the inputs (keeping requires_grad): the reference's inputs."""
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad)
            for t in inputs]


def lowp_copies(inputs, dtype):
    """Copies of the inputs all in `dtype`: what a pure-PyTorch low-precision run would use."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
            for t in inputs]


def compare_with_reference(name, dtype, ours, reference, torch_lowp=None):
    """Compare (out, grads) of a backend with the reference's, by the tolerance rules above.
    torch_lowp: PyTorch's own (out, grads) at `dtype`, needed for bf16/fp16."""
    pairs = [("out", ours[0], reference[0], None if torch_lowp is None else torch_lowp[0])]
    for i, (g, gr) in enumerate(zip(ours[1], reference[1])):
        if gr is not None:
            pairs.append((f"grad[{i}]", g, gr, None if torch_lowp is None else torch_lowp[1][i]))
    for what, a, r, t in pairs:
        label = f"{name} {what}"
        assert a is not None, f"{label}: no gradient computed"
        if dtype in (torch.float32, torch.float64) or a.dtype == torch.float32 and t is None:
            assert_close(a.float(), r.float(), label, dtype=torch.float32)
        else:
            assert_lowp_close(a, r, t, label)
