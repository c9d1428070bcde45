"""linear_cross_entropy benchmark: time and peak memory of the output head + loss, fastlm's chunked
backends against the materialised path (F.linear then F.cross_entropy, eager and compiled) and
Liger-Kernel's fused linear cross-entropy.

    python -m fastlm.bench --ops linear_cross_entropy [--sizes small|medium|large]

Each provider runs in a fresh child process, so its peak memory is its own: on CPU the peak
resident set size (VmHWM, reset via /proc/self/clear_refs) above what the process held once the
inputs existed; on a GPU torch.cuda.max_memory_allocated above the inputs. Both count everything
the step allocates: logits or chunks, gradients, the float32 dweight. Mode is always "full"
(forward + backward, which is what training runs). The issue's target case is "large".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from fastlm.bench import utils

OP = "linear_cross_entropy"
# (tokens N, hidden D, vocab V)
SHAPES = {
    "small": [(2048, 768, 50304)],
    "medium": [(4096, 768, 50304)],
    "large": [(8192, 768, 50304)],
}
PROVIDERS = ("torch", "torch-compile", "fastlm-cpu", "fastlm-triton", "liger")

_CHILD = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    import fastlm.ops as ops
    from fastlm.bench.utils import time_steps_and_peak
    provider, device, N, D, V, dtype, runs = sys.argv[1:8]
    N, D, V, runs = int(N), int(D), int(V), int(runs)
    device, dtype = torch.device(device), getattr(torch, dtype)
    def materialised(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)
    if provider == "torch":
        fn = materialised
    elif provider == "torch-compile":
        fn = torch.compile(materialised, dynamic=False)
    elif provider == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        fn = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)
    else:
        backend = provider.removeprefix("fastlm-")
        fn = lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend=backend)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[::10] = -100
    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    step()  # warm-up (compilation, allocator); its grads stay allocated like a real step's
    h.grad = w.grad = None
    print(json.dumps(time_steps_and_peak(step, runs, device)))
""")


def _skip_reason(provider: str, device: torch.device) -> str | None:
    import fastlm.ops as ops

    if provider == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
        return None if device.type == "cuda" else "Liger-Kernel runs on GPUs only"
    if provider.startswith("fastlm-"):
        backend = provider.removeprefix("fastlm-")
        if backend == "triton" and device.type == "cpu":
            return "the Triton interpreter is a correctness tool, not timed"
        return ops.unavailable_reason(OP, backend, device)
    return None


def measure(provider: str, device: torch.device, shape, dtype: torch.dtype, runs: int) -> dict:
    N, D, V = shape
    env = dict(os.environ, FASTLM_QUIET="1")
    cmd = [sys.executable, "-c", _CHILD, provider, str(device), str(N), str(D), str(V),
           str(dtype).removeprefix("torch."), str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    device = torch.device(args.device)
    env = utils.environment(device)
    runs = 3 if device.type == "cpu" else 20
    rows = []
    for shape in SHAPES[args.sizes]:
        N, D, V = shape
        for dtype in args.dtypes:
            base = {"op": OP, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                    "mode": "full", "materialised_logits_bytes": N * V * 4}
            group = []
            for p in PROVIDERS:
                row = {**base, "provider": p}
                reason = _skip_reason(p, device)
                if reason is None:
                    try:
                        row.update(measure(p, device, shape, dtype, runs))
                        # 3 GEMMs of 2 N D V flops each: the arithmetic roofline of this op.
                        row["tflop_per_s"] = 6 * N * D * V / (row["median_ms"] * 1e-3) / 1e12
                    except Exception as exc:  # a peer failing on this shape is reported
                        reason = f"{type(exc).__name__}: {exc}"[:200]
                if reason is not None:
                    row["skipped"] = reason
                group.append({**row, **env})
            torch_row = next((r for r in group if r["provider"] == "torch" and "median_ms" in r), None)
            for r in group:
                if torch_row and "median_ms" in r:
                    r["speedup_vs_torch"] = torch_row["median_ms"] / r["median_ms"]
                    # a peak under one page (tiny shapes) reads as 0 bytes
                    r["peak_mem_vs_torch"] = (r["peak_mem_bytes"] / torch_row["peak_mem_bytes"]
                                              if torch_row["peak_mem_bytes"] else None)
            rows += group
    for r in rows:
        if "median_ms" in r:
            print(f"{r['provider']:>14} {r['shape']} {r['dtype']}: {r['median_ms']:.0f} ms, "
                  f"peak {r['peak_mem_bytes'] / 2**20:.0f} MiB"
                  + (f", {r['speedup_vs_torch']:.2f}x time, {r['peak_mem_vs_torch']:.3f}x memory "
                     "vs torch" if r.get("peak_mem_vs_torch") else ""), file=sys.stderr)
    return rows
