"""One small case per native kernel, forward and backward, for compute-sanitizer to watch.

    compute-sanitizer --tool memcheck python bench/gpu_check_sanitize.py --device cuda

bench/gpu_check.sh (stage a) runs this under memcheck (out-of-bounds and misaligned accesses)
and racecheck (shared-memory hazards). Each case runs an op through fastlm.ops with one native
backend forced (cuda and triton on a GPU; cpu in the CPU smoke run) at a small awkward shape
(widths that are not a multiple of any block), and checks the result against the float32
reference loosely: the sanitizer's findings are the point, the tests compare precisely. A case
that raises is reported and the others still run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # before triton is imported (the CPU smoke run)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlm import ops
from fastlm.ops import reference

HYPER = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def randn(*shape, device, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def grads_of(fn, inputs):
    out = fn(*inputs)
    loss = out.float().sum() if out.dim() == 0 else (out.float() * torch.linspace(
        -1, 1, out.numel(), device=out.device).view_as(out)).sum()
    return [out.detach().float()] + [g.float() for g in torch.autograd.grad(loss, inputs)]


def cases(device, dtype):
    """name -> (fastlm op taking backend=, reference, inputs)."""
    x = lambda: randn(5, 1031, device=device, dtype=dtype)
    w = lambda: randn(1031, device=device, dtype=dtype)
    t = torch.randint(0, 1031, (5,), device=device)
    hidden, weight = randn(7, 40, device=device, dtype=dtype), randn(1031, 40, device=device,
                                                                     dtype=dtype)
    qkv = [randn(1, 2, 77, 64, device=device, dtype=dtype) for _ in range(3)]
    return {
        "layer_norm": (lambda b: lambda a, c, d: ops.layer_norm(a, c, d, 1e-5, backend=b),
                       lambda a, c, d: reference.layer_norm(a, c, d, 1e-5), [x(), w(), w()]),
        "rms_norm": (lambda b: lambda a, c: ops.rms_norm(a, c, 1e-6, backend=b),
                     lambda a, c: reference.rms_norm(a, c, 1e-6), [x(), w()]),
        "cross_entropy": (lambda b: lambda a: ops.cross_entropy(a, t, backend=b),
                          lambda a: reference.cross_entropy(a, t), [x()]),
        "linear_cross_entropy": (
            lambda b: lambda h, wt: ops.linear_cross_entropy(h, wt, t.repeat(2)[:7], backend=b),
            lambda h, wt: reference.linear_cross_entropy(h, wt, t.repeat(2)[:7]),
            [hidden, weight]),
        "attention": (lambda b: lambda q, k, v: ops.attention(q, k, v, True, backend=b),
                      lambda q, k, v: reference.attention(q, k, v, True), qkv),
    }


def adamw_case(backend, device, dtype) -> float:
    """Three steps of the native AdamW vs the reference: the largest difference."""
    params = [torch.randn(n, device=device).to(dtype) for n in (7, 1025, 40_000)]
    ref = [p.clone() for p in params]
    m, v = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(2)]
    rm, rv = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(2)]
    for step in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        ops.adamw_step(params, grads, m, v, step, **HYPER, backend=backend)
        reference.adamw_step(ref, grads, rm, rv, step, **HYPER)
    return max((p.float() - r.float()).abs().max().item() for p, r in zip(params, ref))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: cuda,triton on a GPU, cpu on a CPU)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    backends = (a.backends or ("cuda,triton" if device.type == "cuda" else "cpu")).split(",")
    failed = ran = 0
    for dtype in [getattr(torch, n) for n in a.dtypes.split(",")]:
        tol = 1e-3 if dtype == torch.float32 else 1e-1
        for name, (fast, ref, inputs) in cases(device, dtype).items():
            for b in backends:
                if b not in ops.available_backends(name, device):
                    continue
                try:
                    ours = grads_of(fast(b), inputs)
                    theirs = grads_of(ref, [i.detach().float().requires_grad_() for i in inputs])
                    err = max(((o - r).abs().max() / r.abs().max().clamp_min(1)).item()
                              for o, r in zip(ours, theirs))
                    ok = err <= tol
                    print(f"case {name}/{b} {dtype}: max relative difference {err:.2e}"
                          f"{'' if ok else ' TOO LARGE'}", flush=True)
                except Exception as exc:  # noqa: BLE001 (reported; the other kernels still run)
                    ok = False
                    print(f"case {name}/{b} {dtype}: FAILED {type(exc).__name__}: {exc}",
                          flush=True)
                failed += not ok
                ran += 1
        for b in backends:
            if b in ops.available_backends("adamw_step", device):
                err = adamw_case(b, device, dtype)
                ok = err <= tol
                print(f"case adamw_step/{b} {dtype}: max difference {err:.2e}"
                      f"{'' if ok else ' TOO LARGE'}", flush=True)
                failed += not ok
                ran += 1
    print(f"{ran} cases, {failed} failed")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
