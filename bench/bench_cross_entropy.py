"""cross_entropy benchmark: fastlm's backends against F.cross_entropy eager, its torch.compile and
Liger-Kernel's fused cross-entropy.

    python -m fastlm.bench --ops cross_entropy [--sizes small|medium|large] [--dtypes ...]

Bytes counted per mode (the fewest an ideal kernel moves): fwd reads the logits once; bwd reads
them and writes their gradient; full is fwd + bwd (a fused kernel could do it in 2 passes, not 3).
The targets and per-row statistics are negligible.

Mode "step" (run with full) compares inplace_backward=True with the normal path in time and peak
memory: each provider runs in a fresh child process; a step makes the logits from a stored
tensor (a copy standing for the output head, the same for every provider), computes the loss and
the gradient w.r.t. the logits. Peak memory is what the step adds above the inputs (VmHWM on
CPU, max_memory_allocated on a GPU): the logits plus, except in place, their gradient buffer.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from fastlm.bench import utils

import fastlm.ops as ops

OP = "cross_entropy"
# (tokens, vocab): GPT-2's vocabulary at growing batch sizes, then Llama-3's. 50257 (odd: most
# rows start off a 16-byte boundary) beside nanoGPT's padded 50304 shows what the misaligned rows
# cost the kernels, whose row split is meant to make it nothing.
SHAPES = {
    "small": [(1024, 50257)],
    "medium": [(4096, 50257)],
    "large": [(8192, 50257), (8192, 50304), (4096, 128256)],
}


def make_case(shape, dtype, device) -> utils.Case:
    rows, vocab = shape

    def make():
        logits = torch.randn(rows, vocab, device=device, dtype=dtype).requires_grad_(True)
        target = torch.randint(0, vocab, (rows,), device=device)
        target[::10] = -100  # some padding, as in real batches
        return [logits, target]

    n = rows * vocab * torch.finfo(dtype).bits // 8
    return utils.Case(shape, dtype, make, {"fwd": n, "bwd": 2 * n, "full": 3 * n})


def providers(device: torch.device) -> list[utils.Provider]:
    def eager(x, t):
        return F.cross_entropy(x.float(), t)

    out = [utils.Provider("torch", eager), utils.Provider("torch-compile", utils.compiled(eager))]
    out += utils.fastlm_providers(
        OP, device, lambda backend: lambda x, t: ops.cross_entropy(x, t, backend=backend))
    out.append(utils.liger_provider(device, _liger))
    return out


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return liger_cross_entropy


# ---------------------------------------------------------------------------------------------
# inplace_backward=True against the normal path: time and peak memory of a training step's loss
STEP_PROVIDERS = ("torch", "fastlm-cpu", "fastlm-cpu-inplace", "fastlm-cuda",
                  "fastlm-cuda-inplace", "fastlm-triton", "fastlm-triton-inplace")

_CHILD = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    import fastlm.ops as ops
    from fastlm.bench.utils import time_steps_and_peak
    provider, device, N, V, dtype, runs = sys.argv[1:7]
    N, V, runs = int(N), int(V), int(runs)
    device, dtype = torch.device(device), getattr(torch, dtype)
    torch.set_num_threads(int(sys.argv[7]))
    backend = provider.removeprefix("fastlm-").removesuffix("-inplace")
    inplace = provider.endswith("-inplace")
    if provider == "torch":
        loss_fn = lambda x, t: F.cross_entropy(x.float(), t)
    else:
        loss_fn = lambda x, t: ops.cross_entropy(x, t, backend=backend, inplace_backward=inplace)
    g = torch.Generator().manual_seed(0)
    src = torch.randn(N, V, generator=g).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[::10] = -100
    def step():
        logits = src * 1.0  # the output head's result: a non-leaf (N, V)
        (grad,) = torch.autograd.grad(loss_fn(logits, t), [logits])
        if device.type == "cuda":
            torch.cuda.synchronize()
    step()  # warm-up
    print(json.dumps(time_steps_and_peak(step, runs, device)))
""")


def _step_skip_reason(provider: str, device: torch.device) -> str | None:
    if provider == "torch":
        return None
    backend = provider.removeprefix("fastlm-").removesuffix("-inplace")
    if backend == "triton" and device.type == "cpu":
        return "the Triton interpreter is a correctness tool, not timed"
    return ops.unavailable_reason(OP, backend, device)


def step_rows(args) -> list[dict]:
    device = torch.device(args.device)
    env = utils.environment(device)
    runs = 5 if device.type == "cpu" else 20
    threads = getattr(args, "threads", None) or torch.get_num_threads()
    rows = []
    for N, V in SHAPES[args.sizes]:
        for dtype in args.dtypes:
            group = []
            for provider in STEP_PROVIDERS:
                if not utils.wanted(provider):
                    continue
                reason = _step_skip_reason(provider, device)
                if reason is not None and provider.removeprefix("fastlm-").split("-")[0] in (
                        "cuda", "triton") and device.type == "cpu":
                    continue  # GPU backends on a CPU run: nothing to say
                row = {"op": OP, "provider": provider, "shape": [N, V], "mode": "step",
                       "dtype": str(dtype).removeprefix("torch."), "logits_bytes":
                       N * V * torch.finfo(dtype).bits // 8}
                if reason is None:
                    cmd = [sys.executable, "-c", _CHILD, provider, str(device), str(N), str(V),
                           row["dtype"], str(runs), str(threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                         env=dict(os.environ, FASTLM_QUIET="1"))
                    if out.returncode == 0:
                        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                    else:
                        reason = (out.stderr.strip().splitlines() or ["child failed"])[-1][:200]
                if reason is not None:
                    row["skipped"] = reason
                group.append({**row, **env})
            base = next((r for r in group if r["provider"] == "torch" and "median_ms" in r), None)
            for r in group:
                if base and "median_ms" in r:
                    r["speedup_vs_torch"] = base["median_ms"] / r["median_ms"]
                    # a peak under one page (tiny shapes) reads as 0 bytes
                    r["peak_mem_vs_torch"] = (r["peak_mem_bytes"] / base["peak_mem_bytes"]
                                              if base["peak_mem_bytes"] else None)
                if "median_ms" in r:
                    print(f"{r['provider']:>22} {N}x{V} {r['dtype']}: {r['median_ms']:.1f} ms, "
                          f"peak {r['peak_mem_bytes'] / 2**20:.0f} MiB "
                          f"({r['peak_mem_bytes'] / r['logits_bytes']:.2f}x the logits)",
                          file=sys.stderr)
            rows += group
    return rows


# ---------------------------------------------------------------------------------------------
# Vector width of the Triton kernels' global accesses, read from their PTX (no GPU needed)
TRITON_KERNELS = ("_ce_fwd_kernel", "_ce_bwd_kernel", "_ce_fwd_grad_kernel")


def ptx_accesses(kernel: str, dtype: str, V: int, arch: int = 90) -> dict:
    """Compile a Triton cross-entropy kernel for sm_<arch> as a launch with rows of V classes
    would (16-byte aligned tensors; V specialised as Triton does: divisible by 16 or not) and
    count its global accesses in the PTX: {"ld_vector", "ld_scalar", "st_vector", "st_scalar"}
    (static instruction counts; vector = .v2/.v4). Run with TRITON_INTERPRET unset."""
    import triton
    from triton.backends.compiler import GPUTarget

    from fastlm.kernels import cross_entropy

    fn = getattr(cross_entropy, kernel)
    block_v, num_warps = cross_entropy._block_v(V)
    elem = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    types = {"x_ptr": f"*{elem}", "g_ptr": f"*{elem}", "t_ptr": "*i64", "V": "i32",
             "ignore_index": "i64", "label_smoothing": "fp32", "z_loss": "fp32"}
    constexprs = {k: v for k, v in (("HAS_SMOOTHING", False), ("BLOCK_V", block_v))
                  if k in fn.arg_names}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "*fp32")
                 for n in fn.arg_names}
    aligned = [(i,) for i, n in enumerate(fn.arg_names)
               if n.endswith("_ptr") or (n == "V" and V % 16 == 0)]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs={k: [["tt.divisibility", 16]] for k in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": num_warps}).asm["ptx"]
    out = {}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global[.\w]*", ptx)
        vector = sum(1 for f in found if re.search(r"\.v[24]\.", f))
        out[f"{op}_vector"], out[f"{op}_scalar"] = vector, len(found) - vector
    return out


def run(args) -> list[dict]:
    rows = utils.run_grid(OP, args, SHAPES[args.sizes], make_case, providers)
    if "full" in args.modes:
        rows += step_rows(args)
    return rows
