"""attention: every backend against the float32 reference, forward and dq/dk/dv.

Grid: backend x dtype x (B, H, H_kv, Tq, Tk, D) x causal, with one-token sequences, primes (17),
a block multiple (128), long sequences past 1000 (C++ only: the Triton interpreter is slow, so
its part stays at T <= 128), grouped- and multi-query heads, head dims 32/64/128 and padded ones
(48, 80), decoding shapes (Tq < Tk, queries aligned bottom-right) and sliding windows.

float32 backends: within 1e-4 of the reference (the attention/matmul tolerance; long
reductions over T keys and D features in a different order). bf16/fp16: error at most 2x that of
PyTorch's own attention computed in that dtype (FlashAttention's rule; tests/utils).
"""
import math

import pytest
import torch

import fastlm.ops as ops
from fastlm.ops import reference
from tests.utils import (compare_with_reference, float32_tolerance, forward_backward, fp32_copies,
                         lowp_copies, mismatch_report, randn, require_backend)

OP = "attention"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32 = float32_tolerance(OP)  # attention's float32 row (tests/utils.py, with its reason)

# (B, H, H_kv, Tq, Tk, D)
CPU_SHAPES = [(1, 1, 1, 1, 1, 32), (2, 4, 2, 17, 17, 64), (1, 4, 1, 128, 128, 128),
              (1, 2, 2, 1025, 1025, 64), (1, 2, 1, 1000, 1000, 128), (2, 3, 3, 33, 33, 80)]
TRITON_SHAPES = [(1, 1, 1, 1, 1, 32), (2, 4, 2, 17, 17, 64), (1, 2, 1, 128, 128, 32),
                 (1, 2, 2, 33, 33, 48)]
# Decoding and windows: (B, H, H_kv, Tq, Tk, D, causal, window)
MASK_CASES = [(1, 2, 1, 5, 77, 64, True, None), (2, 2, 2, 1, 40, 32, True, None),
              (1, 2, 2, 40, 40, 32, True, 7), (1, 2, 1, 40, 40, 32, False, 7),
              (1, 2, 2, 9, 50, 32, True, 16), (1, 2, 2, 50, 50, 64, False, None)]
LONG_WINDOW = (1, 2, 1, 1100, 1100, 64, True, 256)


def make_inputs(shape, dtype, device):
    B, H, Hkv, Tq, Tk, D = shape
    return [randn(B, H, Tq, D, dtype=dtype, device=device, requires_grad=True),
            randn(B, Hkv, Tk, D, dtype=dtype, device=device, requires_grad=True),
            randn(B, Hkv, Tk, D, dtype=dtype, device=device, requires_grad=True)]


def naive_lowp(q, k, v, causal, scale, window):
    """PyTorch's plain attention computed in the inputs' own dtype (no upcast): the error bar
    for bf16/fp16 kernels. The same math as reference.attention otherwise."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    Tq, Tk = q.shape[-2], k.shape[-2]
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def check_backend(backend, dtype, inputs, causal, scale=None, window=None):
    ours = forward_backward(
        lambda q, k, v: ops.attention(q, k, v, causal, scale, window, backend=backend), inputs)
    ref = forward_backward(lambda q, k, v: reference.attention(q, k, v, causal, scale, window),
                           fp32_copies(inputs))
    name = f"{OP}[{backend}, causal={causal}, window={window}]"
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1])
    if dtype == torch.float32:
        for what, a, r in [("out", ours[0], ref[0])] + [
                (f"d{n}", g, rg) for n, g, rg in zip("qkv", ours[1], ref[1])]:
            ok = torch.allclose(a, r, rtol=FP32.rtol, atol=FP32.atol)
            assert ok, mismatch_report(a, r, f"{name} {what}")
        return
    lowp = forward_backward(lambda q, k, v: naive_lowp(q, k, v, causal, scale, window),
                            lowp_copies(inputs, dtype))
    compare_with_reference(name, dtype, ours, ref, lowp)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_reference(dtype, shape, causal):
    require_backend(OP, "cpu", torch.device("cpu"))
    check_backend("cpu", dtype, make_inputs(shape, dtype, "cpu"), causal)


@pytest.mark.gpu_subset
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_matches_reference(device, dtype, shape, causal):
    require_backend(OP, "triton", device)
    check_backend("triton", dtype, make_inputs(shape, dtype, device), causal)


@pytest.mark.gpu_subset
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float16(device, backend):
    require_backend(OP, backend, device)
    check_backend(backend, torch.float16, make_inputs((1, 2, 1, 40, 40, 64), torch.float16,
                                                      device), True)


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_and_window(device, backend, case):
    """Tq < Tk (KV-cache decoding: the queries are the last Tq positions) and sliding windows."""
    require_backend(OP, backend, device)
    *shape, causal, window = case
    check_backend(backend, torch.float32, make_inputs(shape, torch.float32, device), causal,
                  window=window)


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_lowp_decode_and_window(dtype, case):
    """bf16/fp16 heads go through a per-task float32 scratch of Tq query rows and Tk key rows:
    decoding (Tq < Tk), windows and grouped heads (dk, dv summed over the group) in those
    dtypes too."""
    require_backend(OP, "cpu", torch.device("cpu"))
    *shape, causal, window = case
    check_backend("cpu", dtype, make_inputs(shape, dtype, "cpu"), causal, window=window)


def test_cpu_long_window():
    require_backend(OP, "cpu", torch.device("cpu"))
    *shape, causal, window = LONG_WINDOW
    for dtype in (torch.float32, torch.bfloat16):
        check_backend("cpu", dtype, make_inputs(shape, dtype, "cpu"), causal, window=window)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_scale_argument(device, backend):
    require_backend(OP, backend, device)
    check_backend(backend, torch.float32, make_inputs((1, 2, 2, 20, 20, 32), torch.float32,
                                                      device), True, scale=0.37)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_inputs(device, backend):
    """(B, T, H, D) projections transposed to (B, H, T, D), as a model produces them."""
    require_backend(OP, backend, device)
    q, k, v = (randn(2, 19, 4, 32, device=device).transpose(1, 2).requires_grad_(True)
               for _ in range(3))
    assert not q.is_contiguous()
    check_backend(backend, torch.float32, [q, k, v], True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(device, backend):
    """Schema, fake kernel, autograd registration and AOT dispatch of the native ops."""
    require_backend(OP, backend, device)
    fwd, bwd = ops.native_op(OP, backend, "fwd"), ops.native_op(OP, backend, "bwd")
    q, k, v = make_inputs((1, 4, 2, 9, 9, 32), torch.float32, device)
    for causal, window in ((True, 0), (False, 4)):
        torch.library.opcheck(fwd, (q, k, v, causal, 0.2, window))
    out, lse = (t.detach() for t in fwd(q, k, v, True, 0.2, 0))  # no double backward
    dout = randn(*out.shape, device=device)
    torch.library.opcheck(bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.2, 0))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    inputs = make_inputs((1, 4, 2, 17, 17, 32), torch.float32, device)
    fn = torch.compile(lambda q, k, v: ops.attention(q, k, v, True, backend=backend),
                       fullgraph=True)
    ours = forward_backward(fn, inputs)
    ref = forward_backward(lambda q, k, v: reference.attention(q, k, v, True),
                           fp32_copies(inputs))
    for a, r in zip([ours[0], *ours[1]], [ref[0], *ref[1]]):
        assert torch.allclose(a, r, rtol=FP32.rtol, atol=FP32.atol), mismatch_report(a, r, OP)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lse_is_saved_logsumexp(device, backend):
    """The forward's second output is the natural-log log-sum-exp of the scaled, masked scores
    (all the backward keeps besides the inputs and out)."""
    require_backend(OP, backend, device)
    q, k, v = (t.detach() for t in make_inputs((1, 2, 1, 12, 20, 32), torch.float32, device))
    _, lse = ops.native_op(OP, backend, "fwd")(q, k, v, True, 0.3, 0)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) * 0.3
    allowed = torch.arange(20)[None, :] <= torch.arange(12)[:, None] + 8
    expected = scores.masked_fill(~allowed.to(device), float("-inf")).logsumexp(-1)
    assert torch.allclose(lse, expected, rtol=1e-5, atol=1e-5), mismatch_report(lse, expected,
                                                                                 "lse")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bad_input_is_a_clear_error(backend):
    require_backend(OP, backend, torch.device("cpu"))
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.attention(q, k, k, backend=backend)
    with pytest.raises(ValueError, match=r"must be \(B, H, T, D\)"):
        ops.attention(q[0], q[0], q[0], backend=backend)
    with pytest.raises(TypeError, match="float64"):
        ops.attention(q.double(), q.double(), q.double(), backend=backend)
    with pytest.raises(TypeError, match="one dtype"):
        ops.attention(q, q.half(), q.half(), backend=backend)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.attention(q, q, q, window=0, backend=backend)


GRID_AXIS_1_MAX = 65_535  # CUDA's limit on grid axes 1 and 2 (axis 0 holds 2**31 - 1)


def test_triton_grid_puts_batch_heads_on_axis_0(device):
    """B * H past 65,535 (here 140,000 query and 70,000 key/value heads) must go on grid axis 0:
    on axis 1 the launch fails. Only the launcher's grids are computed (expanded inputs, nothing
    launched)."""
    require_backend(OP, "triton", device)
    from fastlm.kernels import attention as kernels

    B, H, H_kv, T, D = 35_000, 4, 2, 100, 32
    q = torch.zeros((), device=device).expand(B, H, T, D)
    kv = torch.zeros((), device=device).expand(B, H_kv, T, D)
    launch = kernels._Launch("attention_fwd_triton", q, kv, kv, True, 0.1, 0)
    for grid, heads, block in ((launch.grid_q(), B * H, "BLOCK_M"),
                               (launch.grid_kv(), B * H_kv, "BLOCK_N")):
        dims = grid({block: 16})
        assert dims[0] == heads and all(d <= GRID_AXIS_1_MAX for d in dims[1:]), dims


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_triton_launches_more_than_65535_heads():
    """The launch itself with B * H = 65,537 (one token each: small)."""
    check_backend("triton", torch.float32, make_inputs((65_537, 1, 1, 1, 1, 16), torch.float32,
                                                       torch.device("cuda")), True)


# Views out of one fused projection, as the models make them: (B, H, H_kv, T, D), with one
# token, primes, a tile-crossing T (> 64 rows) and head dims that are no multiple of the vector
# width (33: a scalar column tail; 48 and 80: 32-column blocks plus a 16-wide one).
FUSED_SHAPES = [(1, 1, 1, 1, 32), (2, 4, 2, 17, 33), (1, 3, 3, 67, 48), (2, 2, 1, 130, 80),
                (3, 4, 4, 64, 32)]


def fused_qkv_views(shape, dtype):
    """q, k, v as (B, H, T, D) views of one (B, T, H + 2 H_kv, D) tensor (the leaf): no copies,
    strides (T (H + 2 H_kv) D, D, (H + 2 H_kv) D, 1)."""
    B, H, Hkv, T, D = shape
    qkv = randn(B, T, H + 2 * Hkv, D, dtype=dtype, requires_grad=True)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
    return qkv, [t.transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_fused_qkv_views(dtype, shape, causal):
    """The C++ kernel reads q, k, v at their strides (float32: in place) and matches the
    reference forward and backward; the gradient reaching the fused tensor is checked too."""
    require_backend(OP, "cpu", torch.device("cpu"))
    _, H, Hkv, T, _ = shape
    qkv, (q, k, v) = fused_qkv_views(shape, dtype)
    assert q.stride(-1) == 1 and (T == 1 or not q.is_contiguous())
    out = ops.attention(q, k, v, causal, backend="cpu")
    dy = randn(*out.shape).to(dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, dy)
    ref_qkv = qkv.detach().float().requires_grad_(True)
    rq, rk, rv = (t.transpose(1, 2) for t in ref_qkv.split([H, Hkv, Hkv], dim=2))
    ref = reference.attention(rq, rk, rv, causal)
    (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, dy.float())
    name = f"{OP}[cpu, fused qkv {shape}, causal={causal}]"
    if dtype == torch.float32:
        for what, a, r in (("out", out, ref), ("dqkv", dqkv, ref_dqkv)):
            assert torch.allclose(a, r, rtol=FP32.rtol, atol=FP32.atol), mismatch_report(
                a, r, f"{name} {what}")
        return
    lq, lk, lv = (t.detach().to(dtype).requires_grad_(True) for t in (rq, rk, rv))
    ours = (out.detach(), [g.transpose(1, 2) for g in dqkv.split([H, Hkv, Hkv], dim=2)])
    theirs = (ref.detach(), [g.transpose(1, 2) for g in ref_dqkv.split([H, Hkv, Hkv], dim=2)])
    lout = naive_lowp(lq, lk, lv, causal, None, None)
    lowp = (lout.detach(), list(torch.autograd.grad(lout, [lq, lk, lv], dy)))
    compare_with_reference(name, dtype, ours, theirs, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_unit_feature_stride_not_required(dtype):
    """A view whose last dim is strided (here D is the slow axis) is still right: the glue
    makes it contiguous instead of reading it in place."""
    require_backend(OP, "cpu", torch.device("cpu"))
    q, k, v = (randn(2, 3, 24, 37).to(dtype).transpose(-1, -2).requires_grad_(True)
               for _ in range(3))
    assert q.stride(-1) != 1
    check_backend("cpu", dtype, [q, k, v], True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_views_are_not_copied(dtype):
    """q/k/v views and the transposed output gradient go into the C++ kernels without a copy
    (bf16/fp16 heads are widened per task, never as whole float32 tensors), and out, dq, dk,
    dv come back laid out (B, T, H, D) in the inputs' dtype, so the model's
    y.transpose(1, 2).reshape(B, T, C) and the backward of its views copy nothing either."""
    require_backend(OP, "cpu", torch.device("cpu"))
    B, H, T, D = 2, 4, 20, 32
    qkv, (q, k, v) = fused_qkv_views((B, H, H, T, D), dtype)
    dy = randn(B, T, H * D).to(dtype)
    with torch.profiler.profile() as prof:
        out = ops.attention(q, k, v, True, backend="cpu")
        y = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C): a view, no copy
        (dqkv,) = torch.autograd.grad(y, qkv, dy)
    copies = [e.key for e in prof.key_averages() if e.key in (
        "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")]
    assert y._base is not None, "out is not laid out (B, T, H, D): the reshape copied"
    # the one copy left: the split's backward concatenates dq, dk, dv into dqkv
    assert not {"aten::clone", "aten::contiguous", "aten::_to_copy"} & set(copies), copies
    assert dqkv.shape == qkv.shape
