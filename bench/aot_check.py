"""Ahead-of-time resource check of the Triton kernels: compile them for a GPU architecture
without a GPU (triton.compile with a GPUTarget) and read what each configuration needs.

For every attention autotune config, dtype and padded head dim: shared memory (the compiled
kernel's metadata), registers and spilled bytes per thread (ptxas -v on the kernel's PTX, the
ptxas Triton ships), against each architecture's limit. This is the check that would have caught
configs that cannot launch on an A100 or H100 (issue 23, item 4) before any GPU ran them, and it
checks kernels.attention.shared_memory_need, the estimate the autotuner prunes configs with.

    python -m bench.aot_check                # table as markdown (bench/results/aot-attention.md)
    python -m bench.aot_check --json out.json

Run it with TRITON_INTERPRET unset: under the interpreter the kernels cannot be compiled (tests
call it in a subprocess without the variable).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget

# Shared memory one block may use (opt-in maximum), bytes: A100 (sm_80) and H100 (sm_90).
ARCHS = {80: 163 * 1024, 90: 227 * 1024}
TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ATTENTION_KERNELS = ("fwd", "dkdv", "dq")
HEAD_DIMS = (16, 32, 64, 128, 256)  # BLOCK_D: head dims padded to a power of two >= 16


class Resources(NamedTuple):
    shared: int     # bytes of shared memory per block
    registers: int  # per thread
    spill: int      # bytes spilled per thread (stores)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) per thread from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


@contextlib.contextmanager
def _no_cubin():
    """Stop triton.compile at PTX: shared memory is known by then (metadata), and ptxas, which
    takes minutes on the spilling fp32 kernels, runs only where registers are asked for."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.aot_check compiles kernels: unset TRITON_INTERPRET")
    from triton.backends.nvidia.compiler import CUDABackend

    make_cubin = CUDABackend.make_cubin
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    try:
        yield
    finally:
        CUDABackend.make_cubin = make_cubin


def compile_attention(kernel: str, dtype: str, block_d: int, config: triton.Config,
                      arch: int, usage: bool = True) -> Resources:
    """Compile one attention kernel (fwd, dkdv or dq) for sm_<arch> as the launcher would call
    it on a GPU (causal, no window, head dim = BLOCK_D); usage=False skips ptxas (registers and
    spills read as -1)."""
    from fastlm.kernels import attention

    fn = {"fwd": attention._attention_fwd_kernel, "dkdv": attention._attention_bwd_dkdv_kernel,
          "dq": attention._attention_bwd_dq_kernel}[kernel].fn
    ty = TRITON_DTYPES[dtype]
    fp32 = dtype == "float32"
    signature, constexprs = {}, {
        "CAUSAL": True, "HAS_WINDOW": False, "TO_F32": fp32,
        "PRECISION": "ieee" if fp32 else "tf32", "BLOCK_D": block_d, **config.kwargs}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in ("lse_ptr", "delta_ptr") else f"*{ty}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # Pointers 16-byte aligned and D a multiple of 16, as torch allocations and common head
    # dims give: the specialisation a real launch gets.
    aligned = [(i,) for i, n in enumerate(fn.arg_names) if n.endswith("_ptr") or n == "D"]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs={k: [["tt.divisibility", 16]] for k in aligned})
    with _no_cubin():
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps,
                                           "num_stages": config.num_stages})
    regs, spill = _ptxas_usage(compiled.asm["ptx"], arch) if usage else (-1, -1)
    return Resources(compiled.metadata.shared, regs, spill)


def _elsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def check_survivors(block_d: int = 256, dtypes=("float32", "bfloat16")) -> list[dict]:
    """For each arch, kernel and dtype at head dim block_d (the largest, where shared memory is
    tightest): the config the pruner keeps with the least estimated need, compiled. Each row:
    its compiled shared memory, the estimate and the arch's limit (shared <= estimate <= limit
    is what the pruner relies on)."""
    from fastlm.kernels import attention

    rows = []
    for arch, limit in ARCHS.items():
        for kernel in ATTENTION_KERNELS:
            configs = attention._configs("fwd" if kernel == "fwd" else "bwd", interpret=False)
            for dtype in dtypes:
                kept = attention.fitting_configs(kernel, configs, block_d, _elsize(dtype), limit)
                config = min(kept, key=lambda c: attention.shared_memory_need(
                    kernel, c, block_d, _elsize(dtype)))
                res = compile_attention(kernel, dtype, block_d, config, arch, usage=False)
                rows.append({"arch": arch, "kernel": kernel, "dtype": dtype,
                             "config": str(config), "shared": res.shared, "limit": limit,
                             "estimate": attention.shared_memory_need(
                                 kernel, config, block_d, _elsize(dtype))})
    return rows


def cross_entropy_fused_ptx(dtype: str, block_v: int, num_warps: int, arch: int) -> str:
    """PTX of the fused in-place cross-entropy kernel (loss, then gradient over the logits)."""
    from fastlm.kernels import cross_entropy

    fn = cross_entropy._ce_fwd_grad_kernel
    signature = {"x_ptr": f"*{TRITON_DTYPES[dtype]}", "t_ptr": "*i64", "loss_ptr": "*fp32",
                 "scale_ptr": "*fp32", "V": "i32", "ignore_index": "i64",
                 "label_smoothing": "fp32", "z_loss": "fp32", "HAS_SMOOTHING": "constexpr",
                 "BLOCK_V": "constexpr"}
    src = triton.compiler.ASTSource(fn=fn, signature=signature,
                                    constexprs={"HAS_SMOOTHING": False, "BLOCK_V": block_v})
    with _no_cubin():
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def attention_table(archs=tuple(ARCHS), dtypes=("float32", "bfloat16"), head_dims=HEAD_DIMS,
                    usage: bool = True) -> list[dict]:
    """One row per (arch, kernel, dtype, BLOCK_D, config): compiled resources, the estimate the
    pruner uses, and whether it fits the arch. fp16 compiles like bf16 (same sizes)."""
    from fastlm.kernels import attention

    rows = []
    for arch in archs:
        for kernel in ATTENTION_KERNELS:
            for config in attention._configs("fwd" if kernel == "fwd" else "bwd",
                                             interpret=False):
                for dtype in dtypes:
                    for block_d in head_dims:
                        res = compile_attention(kernel, dtype, block_d, config, arch, usage)
                        rows.append(dict(
                            arch=f"sm_{arch}", kernel=kernel, dtype=dtype, block_d=block_d,
                            block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"],
                            num_warps=config.num_warps, num_stages=config.num_stages,
                            **res._asdict(), fits=res.shared <= ARCHS[arch],
                            estimate=attention.shared_memory_need(
                                kernel, config, block_d, _elsize(dtype))))
                        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| arch | kernel | dtype | BLOCK_D | M x N, warps, stages | shared KB | estimate KB "
            "| fits | regs | spill B |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['block_d']} | {r['block_m']} x "
        f"{r['block_n']}, {r['num_warps']}, {r['num_stages']} | {r['shared'] / 1024:.0f} | "
        f"{r['estimate'] / 1024:.0f} | {'yes' if r['fits'] else 'NO'} | {r['registers']} | "
        f"{r['spill']} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--no-usage", action="store_true", help="skip ptxas (registers, spills)")
    args = parser.parse_args()
    rows = attention_table(usage=not args.no_usage)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
