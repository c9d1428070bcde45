"""Facts bench/gpu_check.sh records before and after the build, as JSON.

    python bench/gpu_check_env.py --device cuda --json env.json             # before the build
    python bench/gpu_check_env.py --device cuda --backends --json b.json    # after it

Without --backends only torch is imported (fastlm may not be built yet): versions, the GPU's
name and compute capability (what the build compiles for), nvidia-smi's one-line view, and
which of the modules fastlm and its tests import are present (the GPU image has no network, so
a missing one is worth knowing before the first test fails on it). With --backends: per op the
backends available on the device, the one DISPATCH chooses, and why each unavailable native
backend is missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys

import torch

MODULES = ("numpy", "tqdm", "safetensors", "matplotlib", "pytest", "hypothesis", "triton",
           "pybind11", "ninja", "setuptools", "wheel", "pynvml", "liger_kernel")


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": None, "capability": None,
           "modules": {m: importlib.util.find_spec(m) is not None for m in MODULES}}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check_env: torch sees no CUDA GPU (torch "
                             f"{torch.__version__}, CUDA {torch.version.cuda})")
        major, minor = torch.cuda.get_device_capability(device)
        env["device"], env["capability"] = torch.cuda.get_device_name(device), f"{major}.{minor}"
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,"
                 + "clocks.max.sm", "--format=csv,noheader"], check=False, capture_output=True,
                text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"not run: {exc}"
    else:
        env["device"] = cpu_name()
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def backends(device: torch.device) -> dict:
    from fastlm import ops
    from fastlm.ops.dispatch import IMPLEMENTED, select_backend, unavailable_reason
    return {"device": str(device),
            "available": {op: ops.available_backends(op, device) for op in IMPLEMENTED},
            "chosen": {op: select_backend(op, device) for op in IMPLEMENTED},
            "missing": {op: {b: unavailable_reason(op, b, device) for b in IMPLEMENTED[op]
                             if unavailable_reason(op, b, device)} for op in IMPLEMENTED}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", action="store_true", help="import fastlm: backends per op")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    data = backends(device) if a.backends else environment(device)
    print(json.dumps(data, indent=1))
    with open(a.json, "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
