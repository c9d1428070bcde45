"""Compile one recorded launch for sm_<arch> without a GPU and read what it needs.

triton.compile with a GPUTarget stops at PTX (the cubin step is skipped): shared memory is in
the metadata by then. Registers and spill bytes per thread come from `ptxas -v` on that PTX, with
the ptxas Triton ships (the one it would use on the GPU), for sm_80 and sm_90a as Triton does.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

import triton
from fastlm.bench.aot.capture import Launch
from triton.backends.compiler import GPUTarget


class Resources(NamedTuple):
    shared: int     # bytes of shared memory per block
    registers: int  # per thread
    spill: int      # bytes spilled per thread (stores + loads, as ptxas reports them)
    stack: int      # bytes of stack frame per thread


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill bytes, stack frame bytes) per thread from ptxas -v on PTX."""
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
    return parse_ptxas(out)[0][1:4]


_FUNC = re.compile(r"(?:Compiling entry function|Function properties for) '?([^' ]+)'?")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[tuple[str, int, int, int, int]]:
    """Per entry function in `ptxas -v` output: (name, registers, spill bytes, stack bytes,
    static shared bytes). ptxas prints a "Function properties" block (stack, spills) and a
    "Used N registers" line per function; device functions without a "Used" line are skipped."""
    rows, name, stack, spill = [], None, 0, 0
    for line in text.splitlines():
        if m := _FUNC.search(line):
            name = m.group(1)
        elif m := _STACK.search(line):
            stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        elif (m := _USED.search(line)) and name is not None:
            rows.append((name, int(m.group(1)), spill, stack, int(m.group(2) or 0)))
            name, stack, spill = None, 0, 0
    if not rows:
        raise ValueError(f"no 'Used N registers' line in the ptxas output:\n{text[-2000:]}")
    return rows


@contextlib.contextmanager
def _no_cubin():
    """Stop triton.compile at PTX; ptxas runs once, with -v, in ptxas_usage."""
    from triton.backends.nvidia.compiler import CUDABackend

    make_cubin = CUDABackend.make_cubin
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    try:
        yield
    finally:
        CUDABackend.make_cubin = make_cubin


def jit_function(qualname: str):
    module, name = qualname.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    from triton.runtime.autotuner import Autotuner

    return fn.fn if isinstance(fn, Autotuner) else fn


def _thaw(x):
    return [_thaw(v) for v in x] if isinstance(x, tuple) else x


def _source(launch: Launch):
    return triton.compiler.ASTSource(
        fn=jit_function(launch.kernel), signature=dict(launch.signature),
        constexprs={path: value for path, value in launch.constexprs},
        attrs={path: _thaw(attr) for path, attr in launch.attrs})


def cache_key(launch: Launch, arch: int) -> str:
    """What a compile's result depends on: Triton's own key for the source (a hash of the
    kernel's source and of every function and global it uses, with the signature, constants
    and alignment), the backend (arch and ptxas version), triton's version and the options.
    Any edit of a kernel changes it, so a cached result is never read for changed code."""
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    text = "-".join([_source(launch).hash(), backend.hash(), triton.__version__,
                     str(launch.num_warps), str(launch.num_stages)])
    return hashlib.sha256(text.encode()).hexdigest()


def compile_to_ptx(launch: Launch, arch: int):
    """triton.compile of `launch` for sm_<arch>, stopped at PTX: the CompiledKernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("fastlm.bench.aot compiles kernels: unset TRITON_INTERPRET")
    src = _source(launch)
    with _no_cubin():
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps,
                                       "num_stages": launch.num_stages})


def compile_launch(launch: Launch, arch: int, usage: bool = True) -> Resources:
    """Resources of `launch` on sm_<arch>; usage=False skips ptxas (registers, spills -1)."""
    compiled = compile_to_ptx(launch, arch)
    regs, spill, stack = ptxas_usage(compiled.asm["ptx"], arch) if usage else (-1, -1, -1)
    return Resources(compiled.metadata.shared, regs, spill, stack)
