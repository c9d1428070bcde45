"""The one build pip runs.

Builds two native modules:
  fastlm._C    torch extension: every op schema (csrc/registration.cpp), the C++ CPU kernels
               (csrc/<op>/<op>_cpu.cpp) and, when a CUDA torch and nvcc exist, the CUDA kernels
               (csrc/<op>/<op>_cuda.cu + their torch glue csrc/<op>/<op>_cuda_glue.cpp).
  fastlm._bpe  the tokenizer core (csrc/bpe/), plain pybind11, no torch.
Sources are found by glob: adding a kernel needs no edit here.

Environment:
  FASTLM_CUDA=0|1   force the CUDA build off / on (on fails loudly if it cannot be built)
  FASTLM_NATIVE=1   add -march=native (local builds only; never for wheels)
  MAX_JOBS=N        bound parallel compiles (read by torch's ninja build)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only by a broken install
    sys.exit("fastlm: building needs torch installed first: `pip install torch` then "
             "`pip install --no-build-isolation -e .` (build isolation would pull another torch)")

try:
    import pybind11
except ImportError:  # pragma: no cover
    sys.exit("fastlm: building needs pybind11: `pip install pybind11` (or use build isolation)")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")  # includes are written "common/checks.h"


def rel(pattern):
    """Sorted repo-relative paths matching a glob (setuptools wants relative source paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cuda_decision():
    """(build_cuda, reason): CUDA kernels need a CUDA build of torch and nvcc."""
    flag = os.environ.get("FASTLM_CUDA")
    if flag == "0":
        return False, "FASTLM_CUDA=0"
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        missing.append("nvcc / CUDA_HOME not found")
    if flag == "1" and missing:
        sys.exit("fastlm: FASTLM_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing, "; ".join(missing)


def cxx_flags():
    flags = ["-O3", "-g0", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("FASTLM_NATIVE") == "1":
        flags.append("-march=native")
    return flags


# at::parallel_for is a header template whose OpenMP pragmas gcc drops without -fopenmp (every CPU
# kernel then ran on one thread). Compile-only on purpose: the GOMP_* symbols then resolve to the
# OpenMP runtime torch itself loads, so there is one thread pool and torch.set_num_threads holds.
OPENMP = ["-fopenmp"]


def torch_extension():
    build_cuda, reason = cuda_decision()
    sources = rel("csrc/registration.cpp") + rel("csrc/common/*.cpp") + rel("csrc/*/*_cpu.cpp")
    if not build_cuda:
        print(f"fastlm: building CPU kernels only (CUDA skipped: {reason})", flush=True)
        return CppExtension("fastlm._C", sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": cxx_flags() + OPENMP})
    sources += rel("csrc/*/*_cuda.cu") + rel("csrc/*/*_cuda_glue.cpp")
    print(f"fastlm: building CPU and CUDA kernels (CUDA {torch.version.cuda})", flush=True)
    return CUDAExtension(
        "fastlm._C",
        sources,
        include_dirs=[CSRC],
        define_macros=[("FASTLM_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags() + OPENMP,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )


def bpe_extension():
    from setuptools import Extension

    sources = [p for p in rel("csrc/bpe/*.cpp") if not p.endswith("_test.cpp")]
    if not sources:
        return None
    return Extension(
        "fastlm._bpe",
        sources,
        include_dirs=[pybind11.get_include(), CSRC],
        language="c++",
        extra_compile_args=cxx_flags() + ["-fvisibility=hidden", "-pthread"],
        extra_link_args=["-pthread"],
    )


ext_modules = [e for e in (torch_extension(), bpe_extension()) if e is not None]

setup(
    # kernels/ and bench/ live at the top level of the repo but install inside the package.
    packages=find_packages(include=["fastlm", "fastlm.*"]) + ["fastlm.kernels", "fastlm.bench"],
    package_dir={"fastlm.kernels": "kernels", "fastlm.bench": "bench"},
    package_data={"fastlm": ["configs/*.toml", "recipes/*.toml", "web/*.html"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
