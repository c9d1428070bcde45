"""precision=auto: bf16 where the hardware computes bf16 natively, fp32 elsewhere.

resolve_precision(requested, device) -> (choice, reason) is the one place that decides, for
training (train.precision: bf16 = autocast over float32 weights) and for generate, chat, serve
and eval (--precision). "auto" becomes:
  CUDA   bf16 on compute capability 8.0+ (Ampere, Hopper: bf16 tensor cores), else fp32
  CPU    bf16 when the CPU reports avx512_bf16 or amx_bf16 (bf16 dot products in hardware:
         oneDNN's bf16 matmuls run ~2-4x its fp32 ones there), else fp32 (without them bf16
         is emulated by conversions and is slower than fp32)
  other  fp32 (mps and the rest: not measured)
The CPU flags come from /proc/cpuinfo: torch.backends.cpu.get_cpu_capability() says only
"AVX512", which Skylake (no bf16) and Sapphire Rapids (bf16, AMX) both report. Where there is no
/proc/cpuinfo (macOS, Windows) the flags are unknown and auto stays fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 arithmetic
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path | None = None) -> set[str] | None:
    """The first CPU's flags from /proc/cpuinfo; None when that file cannot be read."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_precision(requested: str, device: torch.device | str,
                      allowed: tuple[str, ...] = PRECISIONS) -> tuple[str, str]:
    """(choice, reason): the concrete precision (fp32, bf16 or fp16) for `requested` on device,
    and why, in words for a log line. ValueError names what is allowed when requested is not."""
    if requested not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {requested!r}")
    if requested != "auto":
        return requested, "asked for"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if major >= 8:
            return "bf16", f"auto: CUDA sm_{major}{minor} has bf16 tensor cores"
        return "fp32", f"auto: CUDA sm_{major}{minor} has no bf16 tensor cores (before sm_80)"
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is None:
            return "fp32", f"auto: CPU flags unknown ({CPUINFO} unreadable)"
        native = [f for f in CPU_BF16_FLAGS if f in flags]
        if native:
            return "bf16", f"auto: CPU has {'+'.join(native)} (native bf16 matmuls)"
        return "fp32", "auto: CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated)"
    return "fp32", f"auto: no bf16 measurement for device type {device.type!r}"
