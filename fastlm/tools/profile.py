"""`python -m fastlm.profile`: real training steps of a preset model, measured.

    python -m fastlm.profile --preset gpt2-124m [--steps N] [--warmup W] [--compile]
                             [--batch B] [--seq-len T] [--dtype bfloat16] [--device cuda]
                             [--threads N] [--json PATH] [--trace FILE] [--top K]

Each step is what fastlm.train runs (fastlm.train.step: forward with the loss under the
precision's autocast, backward, gradient clipping, a fastlm.train.optim.AdamW step; --dtype is
train.precision: float32 weights, bfloat16/float16 autocast, float16 with the gradient scaler),
on random token batches (the data does not change the arithmetic).
Reported: tokens/s and step time (median of the timed steps, after warm-up), MFU (model FLOPs
per second over the GPU's dense bf16/fp16 peak, fastlm.train.flops), peak memory (CUDA allocator
peak on a GPU; peak resident set size on CPU), and with NVML (nvidia-ml-py on an NVIDIA GPU) the
GPU's name, clocks, utilisation and power sampled during the timed steps, energy per step and
per token. A separate short run under torch.profiler gives the top kernels (GPU) or ops (CPU)
and their share of the step; on CPU also the step against its floor, the matrix multiplies:
"matmul ms / other ms / step ms, step/matmul" and the top non-matmul ops; --trace writes that run as a Chrome trace (chrome://tracing or
https://ui.perfetto.dev). Fields that cannot be measured here are null in the JSON, with the
reason in `notes`.

MFU follows the PaLM paper's definition (appendix B) as nanoGPT computes it: FLOPs per token =
6 N + 12 L T C, see fastlm.train.flops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fastlm.command import run_command
from fastlm.config import ConfigError, list_presets, model_preset
from fastlm.tools import nvml
from fastlm.train import flops
from fastlm.train.flops import flops_per_token, peak_flops
from fastlm.train.step import TrainStep

# --dtype -> the trainer's train.precision (weights stay float32; 16-bit types via autocast)
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ---------------------------------------------------------------------------------------------
# Memory
def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark (VmHWM) so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------------------------------------
# The run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, optimizer, batches, device, precision: str = "fp32"):
    """One training step as fastlm.train runs it (fastlm.train.step, without the logging):
    step(i) trains on batches[i % len(batches)], clipping at norm 1."""
    train_step = TrainStep(model, optimizer, device=device, precision=precision, grad_clip=1.0)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        train_step(lambda _micro: model(x, y)[1])
    return step


def top_ops(prof, device: torch.device, step_ms_total: float, k: int) -> list[dict]:
    """The k entries with the most self time: GPU kernels (self device time) on a GPU, operators
    (self CPU time) on CPU; pct_of_step is their share of the profiled steps' wall time."""
    gpu = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if gpu:
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((us, e))
    rows.sort(key=lambda r: -r[0])
    return [{"name": e.key, "calls": e.count, "self_ms": us / 1e3,
             "pct_of_step": 100 * (us / 1e3) / step_ms_total if step_ms_total else None}
            for us, e in rows[:k]]


# The operators that multiply matrices on CPU, forward and backward (autograd's mm for a
# Linear's weight and input gradients is aten::mm too). linear and matmul only dispatch to mm
# or addmm: their self time is that dispatch, counted with them.
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                        "aten::matmul", "aten::linear", "aten::mv", "aten::addmv", "aten::dot",
                        "aten::_addmm_activation"})


def matmul_breakdown(prof, profile_steps: int, step_ms: float, k: int) -> dict:
    """CPU: how far the step is above its matrix multiplies. matmul_ms is the profiled self time
    of MATMUL_OPS per step; other_ms is the timed step (measured without the profiler) minus
    that, so the profiler's own per-op cost does not land in it; top_other lists the other
    operators by self time (these do include the profiler's per-call overhead, ~us per call).
    The C++ attention's own small matrix products count as other: they are not aten matmuls."""
    matmul_us, others = 0.0, []
    for e in prof.key_averages():
        us = e.self_cpu_time_total
        if e.key in MATMUL_OPS:
            matmul_us += us
        elif us > 0:
            others.append((us, e))
    others.sort(key=lambda r: -r[0])
    matmul_ms = matmul_us / 1e3 / profile_steps
    return {
        "matmul_ms": matmul_ms,
        "other_ms": step_ms - matmul_ms,
        "step_over_matmul": step_ms / matmul_ms if matmul_ms > 0 else None,
        "top_other": [{"name": e.key, "calls": e.count // profile_steps,
                       "self_ms": us / 1e3 / profile_steps} for us, e in others[:k]],
    }


def profile(preset: str, steps: int = 10, warmup: int = 3, batch: int | None = None,
            seq_len: int | None = None, dtype: str | None = None, device: str | None = None,
            compile: bool = False, trace: str | None = None, top: int = 15,
            profile_steps: int = 2, seed: int = 0, threads: int | None = None,
            log=print) -> dict:
    """Run the measurement and return the report (the JSON written by the CLI).
    threads: torch.set_num_threads for the run (CPU), restored afterwards; None keeps torch's."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _profile(preset, steps, warmup, batch, seq_len, dtype, device, compile, trace,
                        top, profile_steps, seed, log)
    finally:
        torch.set_num_threads(previous)


def _profile(preset, steps, warmup, batch, seq_len, dtype, device, compile, trace, top,
             profile_steps, seed, log) -> dict:
    from fastlm.bench import utils
    from fastlm import models
    from fastlm.models.base import param_groups
    from fastlm.train.optim import AdamW

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    gpu = dev.type == "cuda"
    cfg = model_preset(preset)
    T = seq_len or (cfg.block_size if gpu else min(cfg.block_size, 256))
    B = batch or (8 if gpu else 2)
    if T > cfg.block_size:
        raise ValueError(f"--seq-len {T} exceeds the preset's block_size {cfg.block_size}")
    if steps < 1 or warmup < 0 or B < 1:
        raise ValueError("--steps and --batch must be >= 1 and --warmup >= 0")
    dtype_name = flops.dtype_name(dtype or ("bfloat16" if gpu else "float32"))
    if dtype_name not in PRECISION:
        raise ValueError(f"--dtype: choose float32, bfloat16 or float16, got {dtype}")
    notes = []

    torch.manual_seed(seed)
    model = models.build(cfg).to(dev)  # float32 weights, as fastlm.train keeps them
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    runner = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):  # (B, T) token ids and next-token targets
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
        batches.append((ids[:, :-1].to(dev), ids[:, 1:].to(dev)))
    step = make_step(runner, optimizer, batches, dev, PRECISION[dtype_name])
    name = utils.device_name(dev)
    log(f"fastlm.profile: {preset} ({model.num_params() / 1e6:.1f}M parameters), batch {B} x "
        f"{T} tokens, {dtype_name}{', compiled' if compile else ''}, on {name}")

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(dev)
    warmup_s = time.perf_counter() - t0

    # NVML samples the timed steps only (not the warm-up, compilation or the profiler run).
    sampler, nvml_info, nvml_reason = None, None, None
    if gpu:
        pci = _pci_bus_id(dev)
        try:
            nvml_info = nvml.device_info(dev.index or 0, pci)
            sampler = nvml.NVMLSampler(dev.index or 0, pci)
        except nvml.NVMLUnavailable as exc:
            nvml_reason = str(exc)
    else:
        nvml_reason = f"no NVIDIA GPU in this run (device {dev.type}); {nvml.NEEDS_GPU}"
    if nvml_reason:
        notes.append(nvml_reason)

    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    elif not reset_peak_rss():
        notes.append("peak memory: the process's lifetime peak RSS (no /proc/self/clear_refs)")
    times = []
    if sampler:
        sampler.start()
    try:
        for i in range(warmup, warmup + steps):
            t = time.perf_counter()
            step(i)
            _sync(dev)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        if sampler:
            sampler.stop()
    peak_mem = torch.cuda.max_memory_allocated(dev) if gpu else peak_rss_bytes()

    step_ms = statistics.median(times)
    tokens = B * T
    tokens_per_s = tokens / (step_ms / 1e3)
    fpt = flops_per_token(cfg, T)
    achieved = fpt * tokens_per_s
    peak = peak_flops(name, dtype_name)  # None for CPUs and unknown GPUs
    if peak is None:
        notes.append(f"MFU: no known {dtype_name} peak for '{name}'"
                     + (" (CPU)" if not gpu else " (add it to fastlm.train.flops.PEAKS)"))

    power = sampler.summary() if sampler else None
    energy_step = power["energy_j"] / steps if power and power["energy_j"] is not None else None

    # The profiler run: separate steps, so its overhead does not touch the timings above.
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch_profile(activities=activities) as prof:
        t = time.perf_counter()
        for i in range(profile_steps):
            step(i)
        _sync(dev)
        profiled_ms = (time.perf_counter() - t) * 1e3
    if trace:
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        prof.export_chrome_trace(trace)

    return {
        "preset": preset, "params": model.num_params(), "batch": B, "seq_len": T,
        "tokens_per_step": tokens, "dtype": dtype_name, "compile": compile,
        "steps": steps, "warmup_steps": warmup, "warmup_s": warmup_s,
        "tokens_per_s": tokens_per_s, "step_ms": step_ms,
        "step_ms_min": min(times), "step_ms_max": max(times),
        "flops_per_token": fpt, "achieved_tflops": achieved / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else achieved / peak,
        "peak_memory_bytes": peak_mem,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if gpu else "peak RSS (VmHWM)",
        "power_w": power["power_w"] if power else None,
        "power_w_max": power["power_w_max"] if power else None,
        "energy_j_per_step": energy_step,
        "energy_j_per_token": None if energy_step is None else energy_step / tokens,
        "gpu_util_pct": power["gpu_util_pct"] if power else None,
        "sm_clock_mhz": power["sm_clock_mhz"] if power else None,
        "mem_clock_mhz": power["mem_clock_mhz"] if power else None,
        "nvml": None if nvml_info is None else {**nvml_info, **(power or {})},
        "profiled_steps": profile_steps,
        "top_ops": top_ops(prof, dev, profiled_ms, top),
        "threads": torch.get_num_threads(),
        # CPU only: on a GPU the matmuls are kernels overlapping the host's work
        "matmul": None if gpu else matmul_breakdown(prof, profile_steps, step_ms, top),
        "trace": trace,
        "notes": notes,
        **utils.environment(dev),
    }


def _pci_bus_id(dev: torch.device) -> str | None:
    """NVML's form of the GPU's PCI address ('00000000:1B:00.0'), from torch's properties."""
    props = torch.cuda.get_device_properties(dev)
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:  # older torch: match by index instead
        return None


# ---------------------------------------------------------------------------------------------
# CLI
def format_report(r: dict) -> str:
    def num(v, fmt, unit=""):
        return "n/a" if v is None else f"{v:{fmt}}{unit}"

    lines = [
        f"tokens/s        {r['tokens_per_s']:,.0f}",
        f"step time       {r['step_ms']:.2f} ms median ({r['step_ms_min']:.2f}..."
        f"{r['step_ms_max']:.2f}, {r['steps']} steps)",
        f"model FLOPs     {r['achieved_tflops']:.3g} TFLOP/s ({r['flops_per_token'] / 1e9:.3g} "
        f"GFLOP/token)",
        f"MFU             {num(r['mfu'] and 100 * r['mfu'], '.1f', '%')}"
        + (f" of {r['peak_tflops']:.0f} TFLOP/s" if r["peak_tflops"] else ""),
        f"peak memory     {r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['peak_memory_kind']})",
        f"power           {num(r['power_w'], '.0f', ' W')} mean, "
        f"{num(r['power_w_max'], '.0f', ' W')} max",
        f"energy          {num(r['energy_j_per_step'], '.3g', ' J/step')}, "
        f"{num(r['energy_j_per_token'], '.3g', ' J/token')}",
        f"GPU util/clocks {num(r['gpu_util_pct'], '.0f', '%')}, SM "
        f"{num(r['sm_clock_mhz'], '.0f', ' MHz')}, memory {num(r['mem_clock_mhz'], '.0f', ' MHz')}",
        f"top ops ({r['profiled_steps']} profiled steps, self time, % of step):",
    ]
    for op in r["top_ops"]:
        pct = "" if op["pct_of_step"] is None else f"{op['pct_of_step']:5.1f}%"
        lines.append(f"  {pct} {op['self_ms'] / r['profiled_steps']:9.3f} ms/step "
                     f"{op['calls'] // r['profiled_steps']:>5}x  {op['name'][:90]}")
    m = r.get("matmul")
    if m:
        ratio = "n/a" if m["step_over_matmul"] is None else f"{m['step_over_matmul']:.2f}"
        lines.append(f"matmul          {m['matmul_ms']:.2f} ms / other {m['other_ms']:.2f} ms / "
                     f"step {r['step_ms']:.2f} ms, step/matmul {ratio} ({r['threads']} "
                     f"thread{'s' if r['threads'] != 1 else ''})")
        lines.append("top non-matmul ops (self time per profiled step):")
        for op in m["top_other"]:
            lines.append(f"  {op['self_ms']:9.3f} ms/step {op['calls']:>5}x  {op['name'][:90]}")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastlm.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help=f"model preset: {', '.join(list_presets())}")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step (default 8 on a GPU, 2 on CPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: block_size on a GPU, <= 256 on CPU)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--top", type=int, default=15, help="how many top kernels/ops to list")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--trace", default=None, help="write a Chrome trace of the profiled steps")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = profile(args.preset, args.steps, args.warmup, args.batch, args.seq_len,
                         args.dtype, args.device, args.compile, args.trace, args.top,
                         threads=args.threads)
    except (ValueError, ConfigError) as exc:
        print(f"fastlm.profile: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        from fastlm.bench.utils import write_json
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.trace:
        print(f"wrote Chrome trace {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
