"""Resources of every CUDA kernel: each csrc/*/*_cuda.cu compiled by nvcc for sm_80 and sm_90
with `-Xptxas -v` and the flags the build uses, one row per kernel instantiation (every
template instantiation is its own entry function). The kernels launch with no dynamic shared
memory, so ptxas's static figure is the whole of it."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

from fastlm.bench.aot.compile import parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The flags CMakeLists.txt and setup.py's CUDAExtension compile the kernels with.
FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "--expt-relaxed-constexpr"]


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*_cuda.cu")))


def nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def nvcc_version() -> str:
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True,
                         check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    # Anonymous-namespace kernels: drop the namespace and the argument list, keep the template
    return [n.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
            for n in out]


def compile_source(path: str, arch: int) -> list[dict]:
    """nvcc -Xptxas -v one source for sm_<arch>: one row per kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([nvcc(), "-c", f"-arch=sm_{arch}", "-Xptxas", "-v", *FLAGS,
                               "-I", os.path.join(ROOT, "csrc"), "-o",
                               os.path.join(tmp, "k.o"), path],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path} for sm_{arch}:\n{proc.stderr[-3000:]}")
    rows = parse_ptxas(proc.stderr)
    names = demangle([r[0] for r in rows])
    return [dict(arch=f"sm_{arch}", source=os.path.relpath(path, ROOT), kernel=name,
                 registers=regs, spill=spill, stack=stack, shared=smem)
            for name, (_, regs, spill, stack, smem) in zip(names, rows)]


def cache_key(path: str, arch: int) -> str:
    """A hash of what nvcc's output for `path` depends on: its text, every header it may include
    (its folder's and csrc/common's), nvcc's version, the flags and the arch."""
    h = hashlib.sha256(f"{nvcc_version()} {FLAGS} {arch}".encode())
    folders = (os.path.dirname(path), os.path.join(ROOT, "csrc", "common"))
    for name in [path] + sorted(p for d in folders for p in glob.glob(os.path.join(d, "*.*h"))):
        with open(name, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _cached(path: str, arch: int, cache: str | None) -> list[dict]:
    file = os.path.join(cache, f"cuda-{cache_key(path, arch)}.json") if cache else None
    if file and os.path.exists(file):
        with open(file) as f:
            return json.load(f)
    rows = compile_source(path, arch)
    if file:
        with tempfile.NamedTemporaryFile("w", dir=cache, delete=False) as f:
            json.dump(rows, f)
        os.replace(f.name, file)
    return rows


def cuda_table(archs=(80, 90), processes: int = 2, cache: str | None = None) -> list[dict]:
    """Every kernel of every CUDA source for every arch (nvcc runs in parallel processes);
    with `cache`, sources whose cache_key is unchanged are not recompiled."""
    if nvcc() is None:
        raise RuntimeError("nvcc not found: the CUDA part of the check needs the CUDA toolkit")
    if cache:
        os.makedirs(cache, exist_ok=True)
    jobs = [(path, arch) for path in sources() for arch in archs]
    with ThreadPoolExecutor(processes) as pool:
        return [row for rows in pool.map(lambda job: _cached(*job, cache), jobs) for row in rows]
