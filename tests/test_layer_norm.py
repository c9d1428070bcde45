"""layer_norm: every backend against the float32 reference, forward and backward.

The exemplar kernel test: later ops copy this file. The grid is backend x dtype x shape on every
device present, with awkward shapes (one row, one feature, primes, 1023/1025 around a block,
3-D inputs, very wide rows, no rows), fresh random non-zero-mean inputs, and outputs poisoned by
conftest so an unwritten element fails.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.ops import reference
from tests.utils import (compare_with_reference, forward_backward, fp32_copies, lowp_copies, randn,
                         require_backend)

OP = "layer_norm"
BACKENDS = ["torch", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 7), (3, 1023), (17, 1025), (2, 3, 768), (5, 4097), (2, 16384), (0, 64)]
EPS = 1e-5


def make_inputs(shape, dtype, device, bias=True, weight_dtype=torch.float32):
    C = shape[-1]
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True, scale=2.0, shift=0.5)
    w = randn(C, dtype=weight_dtype, device=device, requires_grad=True, scale=0.1, shift=1.0)
    b = randn(C, dtype=weight_dtype, device=device, requires_grad=True, scale=0.1) if bias else None
    return [x, w, b]


def check_backend(backend, dtype, inputs):
    ours = forward_backward(lambda x, w, b: ops.layer_norm(x, w, b, EPS, backend=backend), inputs)
    ref = forward_backward(lambda x, w, b: reference.layer_norm(x, w, b, EPS), fp32_copies(inputs))
    lowp = None
    if dtype != torch.float32:  # PyTorch's own error at this precision sets the bar
        lowp = forward_backward(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
                                lowp_copies(inputs, dtype))
    compare_with_reference(f"{OP}[{backend}]", dtype, ours, ref, lowp)
    return ours


@pytest.mark.gpu_subset
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(device, backend, dtype, shape):
    require_backend(OP, backend, device)
    if backend == "torch" and shape[-1] == 1:
        pytest.skip("torch's own kernel leaves x - mean ~1e-7 for one feature, which rstd "
                    "(1/sqrt(eps) = 316) amplifies past the tolerance; fastlm's are exact here")
    ours = check_backend(backend, dtype, make_inputs(shape, dtype, device))
    out, (dx, dw, db) = ours
    assert out.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == torch.float32 and db.dtype == torch.float32  # the parameters' dtype


@pytest.mark.parametrize("shape", [(1, 7), (17, 1025), (2, 3, 768)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(device, backend, shape):
    require_backend(OP, backend, device)
    check_backend(backend, torch.float32, make_inputs(shape, torch.float32, device, bias=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_in_input_dtype(device, backend, dtype):
    """Parameters stored in bf16/fp16 (pure low-precision training): grads come back in it."""
    require_backend(OP, backend, device)
    inputs = make_inputs((13, 513), dtype, device, weight_dtype=dtype)
    _, (_, dw, db) = check_backend(backend, dtype, inputs)
    assert dw.dtype == dtype and db.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(device, backend):
    require_backend(OP, backend, device)
    x = randn(96, 40, device=device).t().requires_grad_(True)  # (40, 96), strided
    w = randn(96, device=device, requires_grad=True, shift=1.0)
    b = randn(96, device=device, requires_grad=True)
    assert not x.is_contiguous()
    check_backend(backend, torch.float32, [x, w, b])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_deterministic(device, backend):
    """Weight gradients are summed in a fixed order: two runs agree bit for bit."""
    require_backend(OP, backend, device)
    inputs = make_inputs((67, 300), torch.float32, device)
    fn = lambda x, w, b: ops.layer_norm(x, w, b, EPS, backend=backend)  # noqa: E731
    first, second = forward_backward(fn, inputs), forward_backward(fn, inputs)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(device, backend):
    """Schema, fake kernel, autograd registration and AOT dispatch of the native op."""
    require_backend(OP, backend, device)
    fwd = ops.native_op(OP, backend, "fwd")
    bwd = ops.native_op(OP, backend, "bwd")
    x, w, b = make_inputs((5, 33), torch.float32, device)
    torch.library.opcheck(fwd, (x, w, b, EPS))
    torch.library.opcheck(fwd, (x, w, None, EPS))
    _, mean, rstd = fwd(x, w, b, EPS)
    dy = randn(5, 33, device=device)
    torch.library.opcheck(bwd, (dy, x.detach(), w.detach(), mean, rstd, True))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    inputs = make_inputs((9, 130), torch.float32, device)
    fn = torch.compile(lambda x, w, b: ops.layer_norm(x, w, b, EPS, backend=backend),
                       fullgraph=True)
    ours = forward_backward(fn, inputs)
    ref = forward_backward(lambda x, w, b: reference.layer_norm(x, w, b, EPS), fp32_copies(inputs))
    compare_with_reference(f"{OP}[{backend}, compiled]", torch.float32, ours, ref)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bad_input_is_a_clear_error(backend):
    require_backend(OP, backend, torch.device("cpu"))
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        ops.layer_norm(x, torch.randn(7), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        ops.layer_norm(x.long(), w, backend=backend)
    with pytest.raises(TypeError, match="float64"):
        ops.layer_norm(x.double(), w.double(), backend=backend)
    with pytest.raises(ValueError, match="non-empty last"):
        ops.layer_norm(torch.randn(4, 0), torch.randn(0), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_native_op_rejects_bad_arguments(backend):
    """The raw ops check what the public function would: no crash, no out-of-bounds read."""
    require_backend(OP, backend, torch.device("cpu"))
    fwd, bwd = ops.native_op(OP, backend, "fwd"), ops.native_op(OP, backend, "bwd")
    with pytest.raises((RuntimeError, ValueError), match="non-empty last"):
        fwd(torch.randn(3, 0), torch.randn(0), None, EPS)
    x, w, dy = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    with pytest.raises((RuntimeError, ValueError), match="rstd"):  # 4 statistics for 3 rows
        bwd(dy, x, w, torch.zeros(3), torch.zeros(4), True)
