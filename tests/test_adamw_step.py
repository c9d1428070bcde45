"""adamw_step: every backend against torch.optim.AdamW's fused step and the float32 reference over
many steps, in every parameter dtype, with float32 or same-dtype states, many tensors of awkward
sizes per call; fastlm.train.optim.AdamW against torch.optim.AdamW on a small model; opcheck and
torch.compile of the in-place op.
"""
import copy

import pytest
import torch

import fastlm.ops as ops
from fastlm.ops import reference
from tests.utils import require_backend

OP = "adamw_step"
BACKENDS = ["torch", "cpu", "cuda", "triton"]
SIZES = [1, 7, 1023, 1025, 40_000]  # odd sizes and one spanning several CPU pieces (32K)
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
STEPS = 25


def make_state(dtype, state_dtype, device):
    params = [torch.randn(n, device=device).to(dtype) for n in SIZES]
    params.append(torch.randn(17, 33, device=device).to(dtype))  # a matrix
    m = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    v = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    return params, m, v


def run_steps(backend, params, m, v, device, steps=STEPS):
    gen = torch.Generator(device="cpu").manual_seed(1)
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
                 for p in params]
        if backend == "reference":
            reference.adamw_step(params, grads, m, v, step, **HYPER)
        else:
            ops.adamw_step(params, grads, m, v, step, **HYPER, backend=backend)


@pytest.mark.gpu_subset
@pytest.mark.parametrize("state_dtype", ["float32", "param"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_over_many_steps(device, backend, dtype, state_dtype):
    require_backend(OP, backend, device)
    sdt = torch.float32 if state_dtype == "float32" else dtype
    if backend == "torch" and sdt != dtype:
        pytest.skip("torch's fused AdamW needs states in the parameter's dtype")
    ours = make_state(dtype, sdt, device)
    ref = copy.deepcopy(ours)
    run_steps(backend, *ours, device)
    run_steps("reference", *ref, device)
    # float32: the same float32 math, only rounding of the per-step constants differs. bf16/fp16
    # parameters: both round to the storage dtype every step; allow a couple of its ulps.
    tol = 1e-5 if dtype == torch.float32 and sdt == torch.float32 else 3 * torch.finfo(dtype).eps
    for kind, a_list, r_list in zip(("param", "exp_avg", "exp_avg_sq"), ours, ref):
        for i, (a, r) in enumerate(zip(a_list, r_list)):
            assert a.dtype == r.dtype
            torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol,
                                       msg=lambda s: f"{backend} {kind}[{i}] ({a.shape}): {s}")


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_optim_adamw_matches_torch(device, backend, monkeypatch):
    """fastlm.train.optim.AdamW with this backend against torch.optim.AdamW (fused where available),
    50 steps on a small MLP with decayed and undecayed groups: same parameters."""
    require_backend(OP, backend, device)
    from fastlm.train.optim import AdamW

    monkeypatch.setenv("FASTLM_BACKEND", f"adamw_step={backend}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 5)).to(device)
    twin = copy.deepcopy(model)

    def groups(m):
        return [{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},
                {"params": [m[0].bias, m[2].bias], "weight_decay": 0.0}]

    ours = AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    theirs = torch.optim.AdamW(groups(twin), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(50):
        x = torch.randn(32, 13, device=device)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(device, backend):
    require_backend(OP, backend, device)
    op = ops.native_op(OP, backend, "")
    params, m, v = make_state(torch.float32, torch.float32, device)
    grads = [torch.randn_like(p) for p in params]
    torch.library.opcheck(op, (params, grads, m, v, 3.0, 1e-3, 0.9, 0.999, 1e-8, 0.01))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    ours = make_state(torch.float32, torch.float32, device)
    ref = copy.deepcopy(ours)
    grads = [torch.randn_like(p) for p in ours[0]]

    @torch.compile(fullgraph=True)
    def step(params, m, v):
        ops.adamw_step(params, grads, m, v, 2, **HYPER, backend=backend)

    step(*ours)
    reference.adamw_step(ref[0], grads, ref[1], ref[2], 2, **HYPER)
    for a, r in zip(ours[0] + ours[1] + ours[2], ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bad_input_is_a_clear_error(backend):
    require_backend(OP, backend, torch.device("cpu"))
    p = [torch.randn(4)]
    with pytest.raises(ValueError, match="equal lengths"):
        ops.adamw_step(p, [], [torch.zeros(4)], [torch.zeros(4)], 1, **HYPER, backend=backend)
    with pytest.raises(ValueError, match="step counts from 1"):
        ops.adamw_step(p, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], 0, **HYPER,
                       backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        ops.adamw_step(p, [torch.randn(5)], [torch.zeros(4)], [torch.zeros(4)], 1, **HYPER,
                       backend=backend)
    with pytest.raises(TypeError, match="float64"):
        ops.adamw_step([p[0].double()], [torch.randn(4).double()], [torch.zeros(4).double()],
                       [torch.zeros(4).double()], 1, **HYPER, backend=backend)


# ---------------------------------------------------------------------------------------------
# float32 master weights and the capturable form (step and lr as device tensors)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "cuda", "triton"])
def test_master_weights_match_reference(device, backend, dtype):
    """Master weights: the float32 master copies follow the float32 reference run on them, and
    the parameters are those masters rounded to their dtype."""
    require_backend(OP, backend, device)
    params, m, v = make_state(dtype, torch.float32, device)
    masters = [p.float() for p in params]
    ref_params, ref_masters, ref_m, ref_v = (copy.deepcopy(x) for x in (params, masters, m, v))
    gen = torch.Generator(device="cpu").manual_seed(1)
    for step in range(1, STEPS + 1):
        grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype) for p in params]
        ops.adamw_step(params, grads, m, v, step, **HYPER, backend=backend, master_params=masters)
        reference.adamw_step(ref_params, grads, ref_m, ref_v, step, **HYPER,
                             master_params=ref_masters)
    for i, (p, w, rw) in enumerate(zip(params, masters, ref_masters)):
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-5,
                                   msg=lambda s, i=i: f"{backend} master[{i}]: {s}")
        assert torch.equal(p, w.to(dtype)), f"{backend}: params[{i}] is not its master rounded"
    for a, r in zip(m + v, ref_m + ref_v):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("master", [False, True], ids=["plain", "master"])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "cuda", "triton"])
def test_capturable_matches_host_path(device, backend, master):
    """step and lr as device tensors give the host path's result: bit for bit on the C++ CPU
    kernel (the same constants, computed from the same doubles), within float32 rounding of
    the per-step constants elsewhere. Parameters join at different steps (per-tensor steps)."""
    require_backend(OP, backend, device)
    dtype = torch.bfloat16 if master else torch.float32
    if backend == "torch" and not master:
        pytest.skip("covered with master weights (torch's fused step with tensor lr)")
    host = make_state(dtype, torch.float32, device)
    host_masters = [p.float() for p in host[0]] if master else None
    dev = copy.deepcopy(host)
    dev_masters = copy.deepcopy(host_masters)
    lr = torch.tensor(HYPER["lr"], dtype=torch.float64, device=device)
    hyper = {k: v for k, v in HYPER.items() if k != "lr"}
    offsets = [0, 3, 0, 1, 0, 2]  # tensor i joins at step 1 + offsets[i]
    steps = [torch.zeros((), device=device) for _ in host[0]]
    gen = torch.Generator(device="cpu").manual_seed(1)
    for k in range(1, 11):
        idx = [i for i, off in enumerate(offsets) if k > off]
        grads = {i: torch.randn(host[0][i].shape, generator=gen).to(device=device, dtype=dtype)
                 for i in idx}
        def pick(lst, idx=idx):
            return None if lst is None else [lst[i] for i in idx]

        for i in idx:  # host path: one call per distinct step count
            ops.adamw_step([host[0][i]], [grads[i]], [host[1][i]], [host[2][i]], k - offsets[i],
                           **HYPER, backend=backend,
                           master_params=None if host_masters is None else [host_masters[i]])
        torch._foreach_add_(pick(steps), 1)
        ops.adamw_step(pick(dev[0]), [grads[i] for i in idx], pick(dev[1]), pick(dev[2]),
                       pick(steps), lr, **hyper, backend=backend, master_params=pick(dev_masters))
    exact = backend == "cpu"
    pairs = list(zip(host[0] + host[1] + host[2], dev[0] + dev[1] + dev[2]))
    if master:
        pairs += list(zip(host_masters, dev_masters))
    for a, b in pairs:
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            tol = 1e-6 if a.dtype == torch.float32 else 2 * torch.finfo(a.dtype).eps
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_master_and_capturable_opcheck(device, backend):
    require_backend(OP, backend, device)
    params, m, v = make_state(torch.bfloat16, torch.float32, device)
    grads = [torch.randn_like(p) for p in params]
    masters = [p.float() for p in params]
    hyper = (0.9, 0.999, 1e-8, 0.01)
    torch.library.opcheck(ops.native_op(OP, backend, "master"),
                          (params, grads, m, v, masters, 3.0, 1e-3, *hyper))
    steps = [torch.full((), 3.0, device=device) for _ in params]
    lr = torch.tensor(1e-3, dtype=torch.float64, device=device)
    torch.library.opcheck(ops.native_op(OP, backend, "capturable"),
                          (params, grads, m, v, masters, steps, lr, *hyper))
    torch.library.opcheck(ops.native_op(OP, backend, "capturable"),
                          (params, grads, m, v, [], steps, lr, *hyper))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_master_and_capturable_bad_input(backend):
    require_backend(OP, backend, torch.device("cpu"))
    p, g = [torch.randn(4, dtype=torch.bfloat16)], [torch.randn(4, dtype=torch.bfloat16)]
    m, v = [torch.zeros(4)], [torch.zeros(4)]
    with pytest.raises(ValueError, match="one tensor per parameter"):
        ops.adamw_step(p, g, m, v, 1, **HYPER, backend=backend, master_params=[])
    with pytest.raises((ValueError, RuntimeError), match="master_params\\[0\\] must be"):
        ops.adamw_step(p, g, m, v, 1, **HYPER, backend=backend,
                       master_params=[torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="one per parameter"):
        ops.adamw_step(p, g, m, v, [], **HYPER, backend=backend)
    with pytest.raises(TypeError, match="lr is a tensor but step is an int"):
        ops.adamw_step(p, g, m, v, 1, **{**HYPER, "lr": torch.tensor(1e-3)}, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_master_capturable_torch_compile_fullgraph(device, backend):
    """The capturable op with master weights traces whole under torch.compile."""
    require_backend(OP, backend, device)
    params, m, v = make_state(torch.bfloat16, torch.float32, device)
    masters = [p.float() for p in params]
    grads = [torch.randn_like(p) for p in params]
    steps = [torch.full((), 2.0, device=device) for _ in params]
    lr = torch.tensor(HYPER["lr"], dtype=torch.float64, device=device)
    hyper = {k: v for k, v in HYPER.items() if k != "lr"}
    ref = copy.deepcopy((params, m, v, masters))

    @torch.compile(fullgraph=True)
    def step(params, m, v, masters):
        ops.adamw_step(params, grads, m, v, steps, lr, **hyper, backend=backend,
                       master_params=masters)

    step(params, m, v, masters)
    reference.adamw_step(ref[0], grads, ref[1], ref[2], steps, lr, **hyper, master_params=ref[3])
    for a, r in zip(masters + m + v, ref[3] + ref[1] + ref[2]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    for p, w in zip(params, masters):
        assert torch.equal(p, w.to(p.dtype))


# ---------------------------------------------------------------------------------------------
# Triton multi-tensor launches: one per (parameter dtype, state dtype) group, not per tensor
MIXED = [(0, torch.float32), (1, torch.bfloat16), (1023, torch.float16), (0, torch.bfloat16),
         (1025, torch.float32), (7919, torch.bfloat16), (3, torch.float16), (2053, torch.float32),
         (1024, torch.bfloat16), (0, torch.float16)]  # primes, block edges, empty tensors


class CountingKernel:
    """Stands in for a Triton kernel, counting its launches (kernel[grid](...) calls)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("variant", ["plain", "master", "capturable"])
def test_triton_multi_tensor_one_launch_per_dtype_group(variant, monkeypatch):
    """Many tensors of awkward sizes and three dtypes in one call, several steps: the same
    result as the reference, with one kernel launch per dtype group (3) per step."""
    require_backend(OP, "triton", torch.device("cpu"))
    from fastlm.kernels import adamw_step as kernels

    counter = CountingKernel(kernels._adamw_kernel)
    monkeypatch.setattr(kernels, "_adamw_kernel", counter)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dt) for n, dt in MIXED]
    m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    masters = [p.float() for p in params] if variant == "master" else None
    ours = (params, m, v, masters)
    ref = copy.deepcopy(ours)
    steps = 3
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        s = [torch.tensor(float(step)) for _ in params] if variant == "capturable" else step
        lr = torch.tensor(HYPER["lr"]) if variant == "capturable" else HYPER["lr"]
        ops.adamw_step(ours[0], grads, ours[1], ours[2], s, lr,
                       **{k: v for k, v in HYPER.items() if k != "lr"}, backend="triton",
                       master_params=ours[3])
        reference.adamw_step(ref[0], grads, ref[1], ref[2], step, **HYPER, master_params=ref[3])
    assert counter.launches == 3 * steps
    for kind, a_list, r_list in zip(("param", "exp_avg", "exp_avg_sq", "master"), ours, ref):
        for i, (a, r) in enumerate(zip(a_list or [], r_list or [])):
            tol = 1e-5 if a.dtype == torch.float32 else 3 * torch.finfo(a.dtype).eps
            torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol,
                                       msg=lambda s, i=i, kind=kind: f"{kind}[{i}]: {s}")
