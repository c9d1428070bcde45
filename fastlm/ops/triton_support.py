"""Whether the Triton backend can run here, and why not.

Read by the dispatcher (to choose or refuse the triton backend) and by every Triton launcher in
fastlm.kernels (to refuse a call with the same reason). It imports no other fastlm module, so the
kernels can use it without an import circle through fastlm.ops.native.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def import_error() -> str | None:
    """Why triton cannot be imported, or None. Cached: importing triton costs a second."""
    try:
        import triton  # noqa: F401  (optional: only useful on a GPU or under the interpreter)
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run on tensors of `device`, else why not."""
    error = import_error()
    if error is not None:
        return error
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton kernels run on CPU tensors only under the interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (tests do)")
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels need a CUDA device, got {device}"
    return None
