"""Loading of the C++ backends (fastlm._C) and the reason each one is missing.

fastlm imports without any native code: if fastlm._C was not built (or fails to load), the cpu and
cuda backends are reported unavailable with the reason, once, and everything falls back to the
torch and reference backends. The Triton backend's availability is fastlm.ops.triton_support's;
its kernels (fastlm.kernels) are imported on first use by fastlm.ops.api.native_op, since
importing triton costs a second and is only useful on a GPU or under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from fastlm.ops import autograd as opdefs
from fastlm.ops import triton_support

try:
    from fastlm import _C  # noqa: F401  (loading it registers torch.ops.fastlm.*)
except ImportError as exc:  # not built, or built against another torch
    NATIVE_ERROR: str | None = (
        f"fastlm._C could not be loaded ({exc}); build it with "
        "`pip install --no-build-isolation -e .`"
    )
    if os.environ.get("FASTLM_QUIET") != "1":  # once: this module body runs once per process
        warnings.warn(f"fastlm: cpu/cuda backends unavailable: {NATIVE_ERROR}", stacklevel=2)
else:
    NATIVE_ERROR = None
    opdefs.register_layer_norm("fastlm::layer_norm_fwd", "fastlm::layer_norm_bwd")
    opdefs.register_rms_norm("fastlm::rms_norm_fwd", "fastlm::rms_norm_bwd")
    opdefs.register_cross_entropy("fastlm::cross_entropy_fwd", "fastlm::cross_entropy_bwd")
    opdefs.register_linear_cross_entropy("fastlm::linear_cross_entropy_fwd")
    opdefs.register_adamw_step("fastlm::adamw_step")
    opdefs.register_attention("fastlm::attention_fwd", "fastlm::attention_bwd",
                              heads_inner=True)
    opdefs.register_small_rows_linear("fastlm::small_rows_linear")


@functools.cache
def built_devices() -> tuple[str, ...]:
    """Device types fastlm._C has kernels for: ("cpu",) or ("cpu", "cuda"); () if not built."""
    if NATIVE_ERROR is not None:
        return ()
    return tuple(torch.ops.fastlm.build_info().split(","))


def cpu_unavailable_reason(device: torch.device) -> str | None:
    if NATIVE_ERROR is not None:
        return NATIVE_ERROR
    if device.type != "cpu":
        return f"the C++ CPU kernels take CPU tensors, got a tensor on {device}"
    return None


def cuda_unavailable_reason(device: torch.device) -> str | None:
    if NATIVE_ERROR is not None:
        return NATIVE_ERROR
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, got a tensor on {device}"
    if "cuda" not in built_devices():
        return ("fastlm._C was built without CUDA (CPU torch or no nvcc at build time); "
                "rebuild on the GPU machine with `pip install --no-build-isolation -e .`")
    return None


def set_poison_outputs(enabled: bool) -> None:
    """Test switch: fill every native output with NaN before its kernel writes it."""
    if triton_support.import_error() is None:
        from fastlm.kernels import utils as triton_utils  # the Triton launchers' allocator

        triton_utils.POISON_OUTPUTS = enabled
    if NATIVE_ERROR is None:
        torch.ops.fastlm.set_poison_outputs(enabled)
