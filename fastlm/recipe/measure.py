"""Per-stage peak memory: the process's resident-set high-water mark (reset at each stage start
where Linux allows it), torchrun children's, and the GPU allocator's peak."""
from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peaks() -> None:
    try:  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak covers the whole process so far (said in the report)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict[str, int | None]:
    """{"peak_rss_bytes", "peak_child_rss_bytes", "peak_gpu_bytes"} since reset_peaks()."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"peak_rss_bytes": rss, "peak_child_rss_bytes": children or None,
            "peak_gpu_bytes": gpu}
