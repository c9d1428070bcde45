"""precision=auto: bf16 where the hardware computes bf16 natively, fp32 elsewhere.

resolve_precision(requested, device) -> (choice, reason) is the one place that decides, for
training (train.precision: bf16 = autocast over float32 weights) and for generate, chat, serve
and eval (--precision). "auto" becomes:
  CUDA   bf16 on compute capability 8.0+ (Ampere, Hopper: bf16 tensor cores), else fp32
  CPU    bf16 when the CPU reports avx512_bf16 or amx_bf16 (bf16 dot products in hardware)
         AND a bf16 matmul measured here runs at least MIN_CPU_BF16_SPEEDUP x fp32's; else
         fp32. The flag alone is not enough: on a 2-core Intel Xeon VM that reports
         avx512_bf16, bf16 matmuls ran 0.5x fp32's and bf16 autocast trained 1.4x slower,
         while on a Zen 4 EPYC bf16 matmuls run ~2-4x fp32's. The measurement (~0.1 s, once
         per process) settles it.
  other  fp32 (mps and the rest: not measured)
The CPU flags come from /proc/cpuinfo: torch.backends.cpu.get_cpu_capability() says only
"AVX512", which Skylake (no bf16) and Sapphire Rapids (bf16, AMX) both report. Where there is no
/proc/cpuinfo (macOS, Windows) the flags are unknown and auto stays fp32.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 arithmetic
CPUINFO = Path("/proc/cpuinfo")
MIN_CPU_BF16_SPEEDUP = 1.2  # bf16 autocast also pays casts: a matmul barely faster is a loss


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


@functools.cache
def cpu_bf16_speedup(n: int = 512, reps: int = 8) -> float:
    """fp32 time / bf16 time of an (n, n) @ (n, n) matmul on one core of this CPU: the
    fastest of interleaved runs after a warm-up of each (the minimum is what the hardware
    does; other processes only add time). One thread: bf16 units are per core, and one
    core is what a shared machine's neighbours leave least noisy. Cached for the process."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(reps + 1):
            for a, b in ((a32, b32), (a16, b16)):
                t0 = time.perf_counter()
                torch.mm(a, b)
                if i:  # the first round warms up
                    times[a.dtype].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return min(times[torch.float32]) / min(times[torch.bfloat16])


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
        native = "+".join(f for f in CPU_BF16_FLAGS if f in flags)
        if not native:
            return "fp32", ("auto: CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be "
                            "emulated)")
        speedup = cpu_bf16_speedup()
        if speedup >= MIN_CPU_BF16_SPEEDUP:
            return "bf16", f"auto: CPU has {native}, bf16 matmul {speedup:.1f}x fp32 here"
        return "fp32", (f"auto: CPU has {native} but a bf16 matmul ran {speedup:.2f}x fp32's "
                        f"speed here (needs {MIN_CPU_BF16_SPEEDUP}x)")
    return "fp32", f"auto: no bf16 measurement for device type {device.type!r}"
