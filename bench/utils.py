"""The shared benchmark harness: timing, environment facts, rows, tables and JSON.

Every bench_<op>.py builds on this so numbers are comparable across ops and machines:
- time_call(): warm-up, then the median (and spread) of many runs; CUDA events on a GPU,
  perf_counter on CPU; callers rotate input sets larger than the caches (input_sets()).
- bench_kernel(): one op, several providers (reference, each fastlm backend, the peers users
  would pick instead), modes fwd / bwd / full (fwd+bwd), one row per measurement, with GB/s
  against a copy bandwidth measured in the same run (the memory roofline of a norm-like op).
- environment(): device name, versions, commit, date and threads: carried by every JSON row.
- Roofline ceilings measured in the run itself, not taken from datasheets: copy_bandwidth_gbps()
  (a large device copy) and matmul_tflops() (a large dense matmul, bf16 on a GPU, float32 on CPU).
- set_provider_filter(): `--providers` of the CLI; bench_kernel() times only the wanted ones.
- set_progress(): the CLI's progress bar, advanced once per row (each timed call, each skip).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastlm import ops

SIZES = ("small", "medium", "large")
MODES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Environment
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


@functools.cache
def _commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Facts every JSON row carries, so a number is never separated from where it came from."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env["driver"] = _nvidia_driver()
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def device_slug(device: torch.device) -> str:
    """A folder name for bench/results/: 'cpu-intel-xeon-...' or 'nvidia-h100-80gb-hbm3'."""
    name = device_name(device).lower()
    slug = "".join(c if c.isalnum() else "-" for c in name)
    slug = "-".join(filter(None, slug.split("-")))
    return slug if device.type == "cuda" else f"cpu-{slug}"


# ---------------------------------------------------------------------------------------------
# Timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    q1_ms: float | None = None  # quartiles: the spread the table shows (min/max catch outliers)
    q3_ms: float | None = None

    @property
    def iqr_ms(self) -> float | None:
        return None if self.q1_ms is None else self.q3_ms - self.q1_ms


def time_call(fn: Callable[[int], object], device: torch.device, warmup_s: float = 0.1,
              budget_s: float = 1.0, min_runs: int = 5, max_runs: int = 200,
              row: bool = True) -> Timing:
    """Time fn(i) for i = 0, 1, ... (i selects the rotating input set): warm up for warmup_s,
    then run until budget_s or max_runs, at least min_runs. GPU runs are timed with CUDA events
    around each call; CPU runs with perf_counter. row=False: a ceiling, not a table row (the
    progress bar does not count it)."""
    i = 0
    start = time.perf_counter()
    while True:  # warm-up: compilation, caches, allocator
        fn(i)
        i += 1
        synchronize(device)
        if time.perf_counter() - start >= warmup_s and i >= 2:
            break
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs
                                       or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e3)
        i += 1
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) >= 2 else samples * 3
    if row:
        row_done()
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), q1, q3)


def _proc_status_bytes(key: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/self/status has no {key}")


def time_steps_and_peak(step: Callable[[], object], runs: int, device: torch.device) -> dict:
    """Run step() `runs` times (after the caller's warm-up) -> median/min/max ms and the peak
    memory above the start: the allocator's peak on CUDA; on a CPU the process's peak resident
    set (VmHWM, reset to the current RSS through /proc/self/clear_refs, so Linux only). Meant
    for a fresh child process per measurement, where nothing else moves the peak."""
    if device.type == "cuda":
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        start = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _proc_status_bytes("VmHWM")) - start
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": runs, "peak_mem_bytes": peak}


def cache_bytes(device: torch.device) -> int:
    """Bytes of input that overflow the last-level cache (so runs measure memory, not cache)."""
    if device.type == "cuda":
        return 2 * getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return 2 * (64 << 20)  # generous for server CPUs' LLC


def input_sets(make: Callable[[], list], bytes_per_set: int, device: torch.device,
               max_sets: int = 16) -> list[list]:
    """Enough independent input sets that cycling through them defeats the cache."""
    n = max(1, min(max_sets, math.ceil(cache_bytes(device) / max(1, bytes_per_set))))
    return [make() for _ in range(n)]


@functools.cache
def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured memory roofline: a large device copy (bytes read + bytes written) per second."""
    n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda _: dst.copy_(src), device, warmup_s=0.05, budget_s=0.5, max_runs=50,
                  row=False)
    return 2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9


def default_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what training runs in); float32 on CPU (bf16 GEMMs there are emulated)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.cache
def matmul_tflops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """Measured compute roofline: dense (n, n) @ (n, n) TFLOP/s at `dtype` (default: see
    default_matmul_dtype), n = 8192 on a GPU (large enough to saturate the tensor cores), 1024
    on CPU (a few ms per call on one core)."""
    dtype = dtype or default_matmul_dtype(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_call(lambda _: a @ b, device, warmup_s=0.1, budget_s=0.5, max_runs=50, row=False)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------
# Progress (the CLI's bar over rows)
_progress = None


def set_progress(bar) -> None:
    """A tqdm bar that row_done() advances (None: no bar)."""
    global _progress
    _progress = bar


def row_done() -> None:
    if _progress is not None:
        _progress.update(1)


# Provider selection (the CLI's --providers)
_provider_filter: frozenset[str] | None = None


def set_provider_filter(names) -> None:
    """Only providers named here are timed by bench_kernel (None: all of them)."""
    global _provider_filter
    _provider_filter = None if names is None else frozenset(names)


def wanted(provider: str) -> bool:
    return _provider_filter is None or provider in _provider_filter


# ---------------------------------------------------------------------------------------------
# Kernel benchmarks
@dataclass
class Provider:
    """One implementation to time: fn(*inputs) -> output (differentiable for bwd/full)."""
    name: str
    fn: Callable
    skip_reason: str | None = None


@dataclass
class Case:
    shape: tuple
    dtype: torch.dtype
    make_inputs: Callable[[], list]  # fresh random inputs (requires_grad where bwd applies)
    bytes_moved: dict  # mode -> fewest bytes an ideal kernel moves through memory
    extra: dict = field(default_factory=dict)


def bench_kernel(op: str, case: Case, providers: list[Provider], modes, device: torch.device,
                 budget_s: float = 1.0) -> list[dict]:
    """Time every provider on one case in every mode; one row per (provider, mode)."""
    env = environment(device)
    sets = input_sets(case.make_inputs, case.bytes_moved["fwd"], device)
    roofline = copy_bandwidth_gbps(device)
    rows = []
    for mode in modes:
        for p in providers:
            if not wanted(p.name):
                continue
            row = {"op": op, "provider": p.name, "shape": list(case.shape),
                   "dtype": str(case.dtype).removeprefix("torch."), "mode": mode, **case.extra}
            if p.skip_reason:
                rows.append({**row, "skipped": p.skip_reason, **env})
                row_done()
                continue
            try:
                timing = time_call(_runner(p.fn, sets, mode), device, budget_s=budget_s)
            except Exception as exc:  # a peer that fails on this shape is reported, not fatal
                rows.append({**row, "skipped": f"{type(exc).__name__}: {exc}"[:200], **env})
                row_done()
                continue
            gbps = case.bytes_moved[mode] / (timing.median_ms * 1e-3) / 1e9
            rows.append({**row, "median_ms": timing.median_ms, "min_ms": timing.min_ms,
                         "max_ms": timing.max_ms, "iqr_ms": timing.iqr_ms, "runs": timing.runs,
                         "gb_per_s": gbps, "pct_of_copy_bw": 100 * gbps / roofline,
                         "copy_bw_gbps": roofline, **env})
    _add_speedups(rows)
    return rows


def _runner(fn, sets, mode):
    if mode == "fwd":
        def run(i):
            with torch.no_grad():
                fn(*sets[i % len(sets)])
        return run
    prepared = []
    for inputs in sets:
        out = fn(*inputs)
        wants = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        prepared.append((inputs, out, wants, torch.randn_like(out)))
    if mode == "bwd":
        def run(i):
            _, out, wants, dy = prepared[i % len(prepared)]
            torch.autograd.grad(out, wants, dy, retain_graph=True)
        return run

    def run(i):  # full: forward and backward
        inputs, _, wants, dy = prepared[i % len(prepared)]
        torch.autograd.grad(fn(*inputs), wants, dy)
    return run


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch: torch's median over this row's (same case and mode)."""
    base = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == "torch" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and r["mode"] in base:
            r["speedup_vs_torch"] = base[r["mode"]] / r["median_ms"]


# ---------------------------------------------------------------------------------------------
# Output
def throughput(row: dict) -> str:
    """TFLOP/s for compute-bound ops (attention, matmul-heavy heads), else GB/s."""
    for key in ("tflops", "tflop_per_s"):
        if key in row:
            return f"{row[key]:.3g} TFLOP/s"
    return f"{row['gb_per_s']:.1f} GB/s" if "gb_per_s" in row else ""


def roofline_pct(row: dict) -> str:
    """The share of this run's measured ceiling: the matmul peak if the row has one, else the
    copy bandwidth."""
    if "pct_of_matmul_peak" in row:
        return f"{row['pct_of_matmul_peak']:.0f}% mm"
    return f"{row['pct_of_copy_bw']:.0f}% copy" if "pct_of_copy_bw" in row else ""


def case_label(row: dict) -> str:
    shape = "x".join(str(n) for n in row.get("shape", []))
    return shape + (" causal" if row.get("causal") else "")


def spread(row: dict) -> str:
    """Interquartile range as a share of the median (min/max when quartiles are missing)."""
    if row.get("iqr_ms") is not None:
        return f"±{50 * row['iqr_ms'] / row['median_ms']:.1f}%"
    if "min_ms" in row:
        return f"{row['min_ms']:.3g}..{row['max_ms']:.3g}"
    return ""


TABLE_COLUMNS = [
    ("op", lambda r: r.get("op", "")), ("provider", lambda r: r.get("provider", "")),
    ("shape", case_label), ("dtype", lambda r: r.get("dtype", "")),
    ("mode", lambda r: r.get("mode", "")),
    ("median ms", lambda r: f"{r['median_ms']:.4g}"), ("spread", spread),
    ("throughput", throughput), ("roofline", roofline_pct),
    ("vs torch", lambda r: f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else ""),
]


def format_table(rows: list[dict]) -> str:
    """Plain-text table: median, spread, GB/s or TFLOP/s (whichever the row has), % of the
    measured roofline and the speed-up over torch."""
    table = [[head for head, _ in TABLE_COLUMNS]]
    notes = {}  # row index -> skip reason, written after the case columns (not sized by them)
    for r in rows:
        if "median_ms" not in r:
            notes[len(table)] = f"skipped: {r.get('skipped', 'no timing')[:80]}"
            table.append([cell(r) for _, cell in TABLE_COLUMNS[:5]]
                         + [""] * (len(TABLE_COLUMNS) - 5))
            continue
        table.append([cell(r) for _, cell in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in table) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for i, row in enumerate(table):
        cells = row[:5] + [notes[i]] if i in notes else row
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(rows: list[dict], path: str) -> None:
    """Write rows atomically (temp file + rename): a crash never leaves half a result file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def fastlm_providers(op: str, device: torch.device, call: Callable[[str], Callable]) -> list[Provider]:
    """One Provider per fastlm backend of `op` (reference and the native ones); call(backend)
    returns the function to time. Unavailable backends stay in the table with their reason."""
    providers = []
    for backend in ("reference", "cpu", "cuda", "triton"):
        if backend not in ops.IMPLEMENTED[op]:
            continue
        reason = ops.unavailable_reason(op, backend, device)
        if backend == "triton" and device.type == "cpu" and reason is None:
            reason = "the Triton interpreter is a correctness tool, not timed"
        if backend in ("cuda", "triton") and device.type == "cpu" and reason:
            continue  # GPU backends on a CPU run: nothing to say
        providers.append(Provider(f"fastlm-{backend}", call(backend), reason))
    return providers


def compiled(fn: Callable) -> Callable:
    """torch.compile of a peer's eager function (compile time falls in the warm-up)."""
    return torch.compile(fn, dynamic=False)


def liger_provider(device: torch.device, load: Callable[[], Callable]) -> Provider:
    """Liger-Kernel as a peer: load() imports it and returns the function to time."""
    if device.type != "cuda":
        return Provider("liger", None, "Liger-Kernel runs on GPUs only")
    try:
        return Provider("liger", load())
    except ImportError:
        return Provider("liger", None, "liger-kernel not installed")


def run_grid(op: str, args, shapes, make_case: Callable, providers: Callable) -> list[dict]:
    """bench_kernel over every shape x dtype of a kernel bench (its module's run(args))."""
    device = torch.device(args.device)
    rows = []
    for shape in shapes:
        for dtype in args.dtypes:
            rows += bench_kernel(op, make_case(shape, dtype, device), providers(device), args.modes,
                                 device, budget_s=args.budget)
    return rows
