"""cross_entropy: every backend against the float32 reference, loss and gradient, for every
reduction, with ignored rows everywhere, label smoothing and z-loss.

Grid: backend x dtype x shape x reduction on every device present. Vocab sizes are awkward
(primes, 1023/1025 around a block, 32003, GPT-2's 50257); under the Triton interpreter only the
small ones run (it executes every program in Python). A quarter of the targets are ignore_index,
and the upstream gradient is random (a scalar for "mean"/"sum"), so each reduction's gradient is
checked, not just "mean" with dy = 1. Outputs are poisoned by conftest.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlm.ops as ops
from fastlm.ops import reference
from tests.utils import (compare_with_reference, forward_backward, fp32_copies, lowp_copies, randn,
                         require_backend)

OP = "cross_entropy"
BACKENDS = ["torch", "cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [(1, 7), (19, 1025), (8, 4099), (5, 32003), (3, 50257), (0, 17)]
INTERPRETER_MAX_V = 5000  # the Triton interpreter runs every program in Python: keep rows short


def skip_slow(backend, device, V):
    if backend == "triton" and device.type == "cpu" and V > INTERPRETER_MAX_V:
        pytest.skip(f"V={V} is too slow for the Triton interpreter (run on a GPU)")


def make_inputs(N, V, dtype, device, ignore_index=-100):
    logits = randn(N, V, dtype=dtype, device=device, requires_grad=True, scale=3.0, shift=0.5)
    target = torch.randint(0, V, (N,), device=device)
    target[torch.rand(N, device=device) < 0.25] = ignore_index
    target[:1] = torch.randint(0, V, (min(N, 1),), device=device)  # "mean" over >= 1 row
    return logits, target


def check_backend(backend, dtype, logits, target, reduction, **kw):
    ours = forward_backward(
        lambda x: ops.cross_entropy(x, target, reduction=reduction, backend=backend, **kw), [logits])
    ref = forward_backward(
        lambda x: reference.cross_entropy(x, target, reduction=reduction, **kw), fp32_copies([logits]))
    lowp = None
    if dtype != torch.float32:  # PyTorch's own error at this precision sets the bar
        lowp = forward_backward(lambda x: F.cross_entropy(x, target, reduction=reduction),
                                lowp_copies([logits], dtype))
    compare_with_reference(f"{OP}[{backend}, {reduction}]", dtype, ours, ref, lowp)
    return ours


@pytest.mark.gpu_subset
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(device, backend, dtype, shape, reduction):
    require_backend(OP, backend, device)
    skip_slow(backend, device, shape[1])
    if shape[0] == 0 and reduction == "mean":
        pytest.skip("mean over no rows is NaN (as in torch): checked in test_mean_of_no_rows")
    logits, target = make_inputs(*shape, dtype, device)
    out, (grad,) = check_backend(backend, dtype, logits, target, reduction)
    assert out.dtype == torch.float32 and grad.dtype == dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "cuda", "triton"])
def test_label_smoothing_and_z_loss(device, backend, reduction):
    """Against torch's label smoothing (and the reference's z-loss term), float32."""
    require_backend(OP, backend, device)
    logits, target = make_inputs(23, 1031, torch.float32, device)
    for kw in ({"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"label_smoothing": 0.2, "z_loss": 1e-4}):
        check_backend(backend, torch.float32, logits, target, reduction, **kw)
    # The reference itself against torch's label smoothing: the definitions agree.
    ours = reference.cross_entropy(logits.detach(), target, reduction=reduction, label_smoothing=0.1)
    theirs = F.cross_entropy(logits.detach(), target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_ignored_rows_get_zero_gradient(device, backend, reduction):
    require_backend(OP, backend, device)
    logits, target = make_inputs(16, 515, torch.float32, device, ignore_index=3)
    target[::2] = 3  # a custom ignore_index that is also a valid class
    out, (grad,) = forward_backward(
        lambda x: ops.cross_entropy(x, target, ignore_index=3, reduction=reduction,
                                    label_smoothing=0.1, z_loss=1e-3, backend=backend), [logits])
    assert torch.equal(grad[::2], torch.zeros_like(grad[::2]))
    assert grad[1::2].abs().sum() > 0
    if reduction == "none":
        assert torch.equal(out[::2], torch.zeros_like(out[::2]))


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda", "triton"])
def test_mean_of_no_rows(device, backend):
    """All rows ignored: "mean" is NaN like torch's, "sum" is 0 with a zero gradient."""
    require_backend(OP, backend, device)
    logits, _ = make_inputs(4, 33, torch.float32, device)
    target = torch.full((4,), -100, device=device)
    assert torch.isnan(ops.cross_entropy(logits, target, backend=backend))
    out, (grad,) = forward_backward(
        lambda x: ops.cross_entropy(x, target, reduction="sum", backend=backend), [logits])
    assert out.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(device, backend):
    require_backend(OP, backend, device)
    fwd, bwd = ops.native_op(OP, backend, "fwd"), ops.native_op(OP, backend, "bwd")
    logits, target = make_inputs(6, 37, torch.float32, device)
    torch.library.opcheck(fwd, (logits, target, -100, 0.1, 1e-3))
    _, lse = fwd(logits, target, -100, 0.1, 1e-3)
    dloss = randn(6, device=device)
    torch.library.opcheck(bwd, (dloss, logits.detach(), target, lse.detach(), -100, 0.1, 1e-3))
    # Transposed logits: the kernels return a contiguous gradient, so must the fake kernel.
    strided = logits.detach().t().contiguous().t()
    torch.library.opcheck(bwd, (dloss, strided, target, lse.detach(), -100, 0.1, 1e-3))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_compile_strided_logits(device, backend):
    """Under torch.compile the gradient of transposed logits has the strides the fake kernel
    claims: .view(-1) of it traces only if the fake is contiguous, as the real gradient is."""
    require_backend(OP, backend, device)
    logits, target = make_inputs(6, 37, torch.float32, device)
    strided = logits.detach().t().contiguous().t()
    _, lse = ops.native_op(OP, backend, "fwd")(strided, target, -100, 0.0, 0.0)
    dloss = randn(6, device=device)
    bwd = ops.native_op(OP, backend, "bwd")
    fn = torch.compile(lambda x: bwd(dloss, x, target, lse, -100, 0.0, 0.0).view(-1),
                       fullgraph=True)
    torch.testing.assert_close(fn(strided), bwd(dloss, strided, target, lse, -100, 0.0, 0.0)
                               .view(-1))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    logits, target = make_inputs(9, 130, torch.float32, device)
    fn = torch.compile(lambda x: ops.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-4,
                                                   backend=backend), fullgraph=True)
    ours = forward_backward(fn, [logits])
    ref = forward_backward(lambda x: reference.cross_entropy(x, target, label_smoothing=0.1,
                                                             z_loss=1e-4), fp32_copies([logits]))
    compare_with_reference(f"{OP}[{backend}, compiled]", torch.float32, ours, ref)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_bad_input_is_a_clear_error(backend):
    require_backend(OP, backend, torch.device("cpu"))
    x, t = torch.randn(4, 8), torch.tensor([1, 2, -100, 7])
    with pytest.raises(ValueError, match="logits must be \\(N, V\\)"):
        ops.cross_entropy(torch.randn(8), t, backend=backend)
    with pytest.raises(ValueError, match="4 entries"):
        ops.cross_entropy(x, t[:3], backend=backend)
    with pytest.raises(TypeError, match="integer class indices"):
        ops.cross_entropy(x, t.float(), backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, t, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing=1.5, backend=backend)
    if backend in ("cpu", "triton"):
        with pytest.raises((ValueError, RuntimeError), match="target\\[3\\] = 8"):
            ops.cross_entropy(x, torch.tensor([1, 2, -100, 8]), backend=backend)
        with pytest.raises(TypeError, match="float64"):
            ops.cross_entropy(x.double(), t, backend=backend)


# ---------------------------------------------------------------------------------------------
# inplace_backward=True: the gradient written over the logits
INPLACE_SHAPES = [(1, 7), (19, 1025), (5, 32003), (3, 50257)]


def inplace_fn(backend, target, reduction, **kw):
    """The loss with inplace_backward=True, of a copy of x (the logits must not be a leaf:
    the copy stands for the output head's result; its backward passes the gradient through)."""
    return lambda x: ops.cross_entropy(x.clone(), target, reduction=reduction, backend=backend,
                                       inplace_backward=True, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", INPLACE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "cuda", "triton"])
def test_inplace_backward_matches(device, backend, dtype, shape, reduction):
    """Loss and gradient with inplace_backward=True against the reference (the tolerance rules)
    and, in float32, against the same backend's normal path."""
    require_backend(OP, backend, device)
    skip_slow(backend, device, shape[1])
    logits, target = make_inputs(*shape, dtype, device)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3} if shape[0] > 1 else {}
    ours = forward_backward(inplace_fn(backend, target, reduction, **kw), [logits])
    ref = forward_backward(lambda x: reference.cross_entropy(x, target, reduction=reduction, **kw),
                           fp32_copies([logits]))
    lowp = None
    if dtype != torch.float32:
        lowp = forward_backward(lambda x: reference.cross_entropy(x, target, reduction=reduction,
                                                                  **kw), lowp_copies([logits], dtype))
        lowp = (lowp[0], [g.to(dtype) for g in lowp[1]])  # torch's bf16 gradient is stored in bf16
    compare_with_reference(f"{OP}[{backend}, {reduction}, inplace]", dtype, ours, ref, lowp)
    assert ours[1][0].dtype == dtype
    if dtype == torch.float32:
        exact = forward_backward(lambda x: reference.cross_entropy(x, target, reduction=reduction,
                                                                   **kw),
                                 [logits.detach().double().requires_grad_()])
        compare_with_reference(f"{OP}[{backend}, {reduction}, inplace vs float64]", dtype, ours,
                               exact)
        if backend == "torch":
            # its normal path is torch's F.cross_entropy + logsumexp: on a Zen 3 EPYC (AVX2)
            # their float32 sums over V = 32003 put its gradient 1.6e-5 from float64's, past
            # the float32 tolerance, while the in-place formula stays within 1e-7 (checked
            # against float64 just above). So torch's own path is no yardstick here.
            return
        normal = forward_backward(lambda x: ops.cross_entropy(x, target, reduction=reduction,
                                                              backend=backend, **kw), [logits])
        compare_with_reference(f"{OP}[{backend}, {reduction}, inplace vs normal]", dtype, ours,
                               normal)


class LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output of at least `numel` elements that does not live in `storage`."""

    def __init__(self, numel, storage_ptr):
        super().__init__()
        self.numel, self.storage_ptr, self.found = numel, storage_ptr, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() != self.storage_ptr):
                self.found.append(f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_inplace_backward_allocates_no_gradient_buffer(device, backend, dtype, reduction):
    """The gradient autograd hands back is the logits' own storage, and forward + backward create
    no other (N, V) tensor; the normal path creates one (its dlogits)."""
    require_backend(OP, backend, device)
    N, V = 12, 1031
    leaf, target = make_inputs(N, V, dtype, device)
    for inplace in (False, True):
        logits = leaf * 1.0  # (N, V), what an output head would return
        ptr = logits.untyped_storage().data_ptr()
        with LargeAllocations(N * V, ptr) as mode:
            loss = ops.cross_entropy(logits, target, reduction=reduction, backend=backend,
                                     inplace_backward=inplace)
            (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
        if inplace:
            assert grad.untyped_storage().data_ptr() == ptr, "the gradient is not in the logits"
            assert not mode.found, f"(N, V) buffers allocated: {mode.found}"
        else:
            assert mode.found, "the normal path should allocate dlogits (the test's premise)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_inplace_backward_lowers_peak_memory_on_gpu(backend):
    device = torch.device("cuda")
    require_backend(OP, backend, device)
    N, V = 2048, 50257
    leaf, target = make_inputs(N, V, torch.bfloat16, device)
    peaks = {}
    for inplace in (False, True):
        logits = leaf.detach() * 1.0
        logits.requires_grad_()
        logits = logits * 1.0  # a non-leaf, as an output head's result
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = ops.cross_entropy(logits, target, backend=backend, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss, logits)
        torch.cuda.synchronize()
        peaks[inplace] = torch.cuda.max_memory_allocated() - start
        del loss, grad, logits
    nbytes = N * V * 2
    assert peaks[True] < 0.1 * nbytes, peaks  # no (N, V) buffer at all
    assert peaks[False] >= nbytes, peaks


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton"])
def test_inplace_backward_refuses_unsafe_use(backend):
    require_backend(OP, backend, torch.device("cpu"))
    leaf, target = make_inputs(4, 33, torch.float32, torch.device("cpu"))

    def ce(x, **kw):
        return ops.cross_entropy(x, target, backend=backend, inplace_backward=True, **kw)

    with pytest.raises(ValueError, match="do not require grad"):
        ce(leaf.detach() * 1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="do not require grad"):
        ce(leaf * 1.0)
    with pytest.raises(ValueError, match="leaf tensor"):
        ce(leaf)
    with pytest.raises(ValueError, match="leaf tensor"):
        ce(leaf.view(4, 33))
    with pytest.raises(ValueError, match="contiguous"):
        ce((leaf * 1.0).t().contiguous().t())
    logits = leaf * 1.0
    loss = ce(logits)
    with pytest.raises(RuntimeError, match="already hold the gradient"):
        ce(logits)
    with pytest.raises(RuntimeError, match="already hold the gradient"):
        ce(logits.view(2, 2, 33).view(4, 33))  # another view of the same storage
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # Another node that saved the logits notices they were overwritten.
    logits = leaf * 1.0
    other = (logits * logits).sum()  # mul saves logits for its backward
    ce(logits).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()
    if backend in ("cpu", "triton"):
        with pytest.raises(TypeError, match="float64"):
            ce(leaf.double() * 1.0)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_inplace_opcheck(device, backend):
    require_backend(OP, backend, device)
    op = ops.native_op(OP, backend, "fwd_inplace")
    logits, target = make_inputs(6, 37, torch.float32, device)
    scale = torch.tensor(0.25, device=device)
    torch.library.opcheck(op, (logits.detach().clone(), target, scale, -100, 0.1, 1e-3))


# Rows whose first columns are -inf (masked special tokens): k = 1 poisons only the first column,
# 33 the first of a CUDA warp's threads, 600 every one of the 512 CUDA threads' first element,
# 2100 whole Triton blocks (1024 columns under the interpreter, 2048 on a GPU for V > 8192).
NEG_INF_PREFIXES = [1, 33, 600, 2100, 9000]


@pytest.mark.parametrize("inplace", [False, True], ids=["normal", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda", "triton"])
def test_neg_inf_logits_give_finite_loss(device, backend, dtype, inplace):
    """A row whose first columns are -inf has a finite loss and gradient (p = 0 there). It was
    NaN: exp(-inf - -inf) in the running max of the CUDA threads and of the Triton blocks."""
    require_backend(OP, backend, device)
    N, V = len(NEG_INF_PREFIXES) + 1, 9001
    logits, target = make_inputs(N, V, dtype, device)
    with torch.no_grad():
        for r, k in enumerate(NEG_INF_PREFIXES):
            logits[r, :k] = float("-inf")
            target[r] = k + (r * 97) % (V - k)  # a finite column
    target[-1] = -100  # an ignored row among them
    fn = inplace_fn(backend, target, "sum") if inplace else (
        lambda x: ops.cross_entropy(x, target, reduction="sum", backend=backend))
    loss, (grad,) = forward_backward(fn, [logits])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (loss, grad)
    ref = forward_backward(lambda x: reference.cross_entropy(x, target, reduction="sum"),
                           fp32_copies([logits]))
    lowp = None
    if dtype != torch.float32:
        lowp = forward_backward(lambda x: F.cross_entropy(x, target, reduction="sum"),
                                lowp_copies([logits], dtype))
    compare_with_reference(f"{OP}[{backend}, -inf rows]", dtype, (loss, [grad]), ref, lowp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_inplace_target_in_every_warp(device, backend, dtype):
    """The fused kernel reads x[target] for the loss, then overwrites the row with its gradient:
    targets in every warp's columns (CUDA: column c is thread c % 512's, warp (c % 512) // 32;
    Triton: warp w holds a contiguous 1/num_warps of each block) catch a warp that writes the
    target's gradient before the loss is read (the loss would then use a gradient value)."""
    require_backend(OP, backend, device)
    N, V = 32, 8000
    logits, _ = make_inputs(N, V, dtype, device)
    cuda_cols = [w * 32 + 5 for w in range(16)]  # one per CUDA warp, first stride
    triton_cols = [w * (V // 16) + 7 for w in range(16)]  # one per 1/16 of the row
    target = torch.tensor(cuda_cols + triton_cols, device=device)
    ours = forward_backward(inplace_fn(backend, target, "none"), [logits])
    ref = forward_backward(lambda x: reference.cross_entropy(x, target, reduction="none"),
                           fp32_copies([logits]))
    lowp = None
    if dtype != torch.float32:
        lowp = forward_backward(lambda x: F.cross_entropy(x, target, reduction="none"),
                                lowp_copies([logits], dtype))
    compare_with_reference(f"{OP}[{backend}, targets in every warp]", dtype, ours, ref, lowp)


# ---------------------------------------------------------------------------------------------
# Rows off 16-byte boundaries. The Triton and CUDA kernels split each row into an unaligned head,
# a body of 16-byte vectors and a tail: an odd V shifts every row's start, a storage offset the
# tensor's. Targets at each row's first and last columns land in the head and the tail.
ALIGN_VS = [1, 7, 37, 50257, 50304]
INTERPRETER_ALIGN_ROWS = 2  # rows of the two large V under the interpreter (~1 s each)


def misaligned(x, offset):
    """x (N, V) copied to a contiguous tensor whose storage starts `offset` elements into its
    buffer (differentiable: the gradient flows back to x)."""
    flat = torch.cat([x.new_zeros(offset), x.reshape(-1)])
    return flat[offset:].view(x.shape)


@pytest.mark.parametrize("inplace", [False, True], ids=["normal", "inplace"])
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("V", ALIGN_VS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_misaligned_rows(device, backend, dtype, V, offset, inplace):
    require_backend(OP, backend, device)
    big = V > INTERPRETER_MAX_V and backend == "triton" and device.type == "cpu"
    if big and (offset == 3 or dtype == torch.float16):
        pytest.skip("the interpreter runs the large V once per offset kind and 16-bit size")
    N = INTERPRETER_ALIGN_ROWS if big else 9
    logits, target = make_inputs(N, V, dtype, device)
    target[0], target[-1] = 0, V - 1  # row 0's head, the last row's tail
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}

    def ours_fn(x):
        x = misaligned(x, offset)
        assert x.is_contiguous() and x.storage_offset() == offset
        return ops.cross_entropy(x, target, reduction="none", backend=backend,
                                 inplace_backward=inplace, **kw)

    ours = forward_backward(ours_fn, [logits])
    ref = forward_backward(lambda x: reference.cross_entropy(x, target, reduction="none", **kw),
                           fp32_copies([logits]))
    lowp = None
    if dtype != torch.float32:
        lowp = forward_backward(lambda x: reference.cross_entropy(x, target, reduction="none",
                                                                  **kw), lowp_copies([logits], dtype))
        lowp = (lowp[0], [g.to(dtype) for g in lowp[1]])  # the kernels store dtype gradients
    compare_with_reference(f"{OP}[{backend}, V={V}, offset {offset}]", dtype, ours, ref, lowp)


def test_triton_kernels_use_vector_accesses_for_odd_vocab():
    """Compiled for sm_90 (no GPU needed), each Triton kernel reads and writes the logits of
    GPT-2's odd V = 50257 with 16-byte vectors, exactly as it does for V = 50304 (a multiple of
    16). Before the row split (kernels/cross_entropy.py) an odd V had no vector access at all:
    bf16 fwd 0 vector / 10 scalar loads, fused fwd+grad 0 / 19 loads and 0 / 9 stores."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import json; from bench.bench_cross_entropy import TRITON_KERNELS, ptx_accesses; "
            "print(json.dumps({f'{k} {d} {V}': ptx_accesses(k, d, V) for k in TRITON_KERNELS "
            "for d in ('bfloat16', 'float32') for V in (50257, 50304)}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    for key, c in counts.items():
        kernel, dtype, V = key.split()
        assert c["ld_vector"] >= 1, (key, c)
        if kernel != "_ce_fwd_kernel":  # the backwards write the gradient row
            assert c["st_vector"] >= 1, (key, c)
        if V == "50257":
            assert c == counts[f"{kernel} {dtype} 50304"], (key, c)


def test_cuda_kernels_compile_to_vector_accesses(tmp_path):
    """nvcc (no GPU needed) compiles every CUDA cross-entropy kernel for sm_90 with 16-byte
    vector loads of the logits, and the backwards with 16-byte stores of the gradient, for every
    V (the row's head and tail are scalar; before, every access was). Skips without nvcc."""
    import os
    import re
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    ptx = tmp_path / "ce.ptx"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", f"-I{csrc}", "--expt-relaxed-constexpr",
                    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-ptx", "-o", str(ptx),
                    os.path.join(csrc, "cross_entropy", "cross_entropy_cuda.cu")],
                   check=True, capture_output=True, timeout=300)
    entries = re.split(r"\n\.(?:visible )?\.?entry ", ptx.read_text())[1:]
    kernels = {e.split("(")[0]: e for e in entries if "ce_" in e.split("(")[0]}
    assert len(kernels) == 9, list(kernels)  # fwd, bwd, in place x float, bf16, half
    for name, body in kernels.items():
        assert re.search(r"ld\.global(\.nc)?\.v4\.", body), f"{name}: no 16-byte loads"
        if "bwd" in name or "inplace" in name:
            assert re.search(r"st\.global\.v4\.", body), f"{name}: no 16-byte stores"
