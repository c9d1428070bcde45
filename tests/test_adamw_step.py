"""adamw_step: every backend against torch.optim.AdamW's fused step and the float32 reference over
many steps, in every parameter dtype, with float32 or same-dtype states, many tensors of awkward
sizes per call; fastlm.optim.AdamW against torch.optim.AdamW on a small model; opcheck and
torch.compile of the in-place op.
"""
import copy

import pytest
import torch

import fastlm.ops as ops
from fastlm import reference
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
    """fastlm.optim.AdamW with this backend against torch.optim.AdamW (fused where available),
    50 steps on a small MLP with decayed and undecayed groups: same parameters."""
    require_backend(OP, backend, device)
    from fastlm.optim import AdamW

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
    op = ops._native(OP, backend, "")
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
