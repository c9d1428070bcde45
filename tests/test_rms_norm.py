"""rms_norm: every backend against the float32 reference, forward and backward.

Same grid and rules as test_layer_norm.py (the exemplar): backend x dtype x awkward shape on
every device present, poisoned outputs, opcheck, torch.compile(fullgraph=True).
"""
import pytest
import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.ops import reference
from tests.utils import (compare_with_reference, forward_backward, fp32_copies, lowp_copies, randn,
                         require_backend)

OP = "rms_norm"
BACKENDS = ["torch", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 7), (3, 1023), (17, 1025), (2, 3, 768), (5, 4097), (2, 16384), (0, 64)]
EPS = 1e-6


def make_inputs(shape, dtype, device, weight_dtype=torch.float32):
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True, scale=2.0, shift=0.5)
    w = randn(shape[-1], dtype=weight_dtype, device=device, requires_grad=True, scale=0.1,
              shift=1.0)
    return [x, w]


def check_backend(backend, dtype, inputs):
    ours = forward_backward(lambda x, w: ops.rms_norm(x, w, EPS, backend=backend), inputs)
    ref = forward_backward(lambda x, w: reference.rms_norm(x, w, EPS), fp32_copies(inputs))
    lowp = None
    if dtype != torch.float32:  # PyTorch's own error at this precision sets the bar
        lowp = forward_backward(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
                                lowp_copies(inputs, dtype))
    compare_with_reference(f"{OP}[{backend}]", dtype, ours, ref, lowp)
    return ours


@pytest.mark.gpu_subset
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(device, backend, dtype, shape):
    require_backend(OP, backend, device)
    out, (dx, dw) = check_backend(backend, dtype, make_inputs(shape, dtype, device))
    assert out.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == torch.float32  # the parameter's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_in_input_dtype(device, backend, dtype):
    require_backend(OP, backend, device)
    _, (_, dw) = check_backend(backend, dtype, make_inputs((13, 513), dtype, device,
                                                           weight_dtype=dtype))
    assert dw.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(device, backend):
    require_backend(OP, backend, device)
    x = randn(96, 40, device=device).t().requires_grad_(True)  # (40, 96), strided
    w = randn(96, device=device, requires_grad=True, shift=1.0)
    check_backend(backend, torch.float32, [x, w])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_deterministic(device, backend):
    require_backend(OP, backend, device)
    inputs = make_inputs((67, 300), torch.float32, device)
    fn = lambda x, w: ops.rms_norm(x, w, EPS, backend=backend)  # noqa: E731
    first, second = forward_backward(fn, inputs), forward_backward(fn, inputs)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(device, backend):
    require_backend(OP, backend, device)
    fwd, bwd = ops.native_op(OP, backend, "fwd"), ops.native_op(OP, backend, "bwd")
    x, w = make_inputs((5, 33), torch.float32, device)
    torch.library.opcheck(fwd, (x, w, EPS))
    _, rstd = fwd(x, w, EPS)
    torch.library.opcheck(bwd, (randn(5, 33, device=device), x.detach(), w.detach(), rstd))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    inputs = make_inputs((9, 130), torch.float32, device)
    fn = torch.compile(lambda x, w: ops.rms_norm(x, w, EPS, backend=backend), fullgraph=True)
    ours = forward_backward(fn, inputs)
    ref = forward_backward(lambda x, w: reference.rms_norm(x, w, EPS), fp32_copies(inputs))
    compare_with_reference(f"{OP}[{backend}, compiled]", torch.float32, ours, ref)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bad_input_is_a_clear_error(backend):
    require_backend(OP, backend, torch.device("cpu"))
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        ops.rms_norm(x, torch.randn(8, 1), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        ops.rms_norm(x.int(), w, backend=backend)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        ops.rms_norm(x, w.to("meta"), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_native_op_rejects_bad_arguments(backend):
    """The raw ops check what the public function would: no crash, no out-of-bounds read."""
    require_backend(OP, backend, torch.device("cpu"))
    fwd, bwd = ops.native_op(OP, backend, "fwd"), ops.native_op(OP, backend, "bwd")
    with pytest.raises((RuntimeError, ValueError), match="non-empty last"):
        fwd(torch.randn(3, 0), torch.randn(0), EPS)
    x, w, dy = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    with pytest.raises((RuntimeError, ValueError), match="rstd"):  # 4 statistics for 3 rows
        bwd(dy, x, w, torch.zeros(4))
