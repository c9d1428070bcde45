"""The CPU training step against its matmul floor, measured in CPU time (robust to other load).

    python -m fastlm.bench.bench_step_floor [--preset shakespeare_char_cpu] [--batch 12]
        [--seq-len 64] [--precision fp32] [--steps 20] [--json PATH]

One thread. The step is fastlm.train's (fastlm.tools.profile.make_step); its CPU time is the
thread's (time.thread_time: on a machine shared with other jobs, time spent waiting for a core
does not count, which wall time would). The floor: one profiled step records every aten::mm and
aten::addmm with its input shapes (forward and backward), then those products are replayed alone
on fresh tensors of the same shapes and timed the same way. Reported: medians of both, their
ratio step/matmul, and the load average. `python -m fastlm.profile` gives the same split from
wall time with the top non-matmul ops; this is the number to compare across commits on a
loaded machine (run the two commits' processes in turns).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

MATMULS = ("aten::mm", "aten::addmm")  # the leaves: neither calls the other


# the profiler's names of input dtypes
DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16,
          "double": torch.float64}


def recorded_matmuls(step) -> list[tuple[str, list]]:
    """(name, [(shape, strides, dtype) per input]) of every matmul one call of step() runs:
    dtypes and strides too, so a bf16 step's products replay in bf16 and the backward's
    transposed operands stay transposed."""
    with torch.profiler.profile(record_shapes=True) as prof:
        step(0)
    calls = []
    for e in prof.events():
        if e.name in MATMULS:
            inputs = list(zip(e.input_shapes, e.structured_input_strides, e.input_dtypes))
            calls.append((e.name, [i for i in inputs if i[0]]))  # scalars (beta, alpha) have no shape
    return calls


def _tensor(shape, strides, dtype_name):
    if dtype_name not in DTYPES:
        raise ValueError(f"a recorded matmul has inputs of dtype {dtype_name}; the replay "
                         f"knows {', '.join(DTYPES)}")
    strides = strides if len(strides) == len(shape) else None
    t = torch.empty_strided(shape, strides, dtype=DTYPES[dtype_name]) if strides else \
        torch.empty(shape, dtype=DTYPES[dtype_name])
    return t.normal_()


def replayer(calls: list[tuple[str, list]]):
    """A function running the recorded matmuls on random tensors of their shapes, strides and
    dtypes."""
    ops = []
    for name, inputs in calls:
        tensors = [_tensor(*i) for i in inputs]
        if name == "aten::mm":
            ops.append((torch.mm, tuple(tensors[:2])))
        else:  # addmm(bias, a, b)
            ops.append((torch.addmm, tuple(tensors[:3])))

    def run():
        for fn, args in ops:
            fn(*args)
    return run


def cpu_ms(fn, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        t = time.thread_time()
        fn(i)
        out.append((time.thread_time() - t) * 1e3)
    return out


def measure(preset: str, batch: int, seq_len: int, precision: str, steps: int) -> dict:
    from fastlm.bench.bench_threads import load_average, make_stepper

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = make_stepper(preset, batch, seq_len, precision)
        for i in range(3):
            step(i)
        load_before = load_average()
        step_ms = cpu_ms(step, steps)
        calls = recorded_matmuls(step)
        replay = replayer(calls)
        replay()
        matmul_ms = cpu_ms(lambda _i: replay(), steps)
    finally:
        torch.set_num_threads(previous)
    step_med, mm_med = statistics.median(step_ms), statistics.median(matmul_ms)
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "precision": precision,
            "threads": 1, "step_cpu_ms": step_med, "matmul_cpu_ms": mm_med,
            "step_over_matmul": step_med / mm_med if mm_med > 0 else None,
            "matmul_calls": len(calls), "steps": steps,
            "load_before": load_before, "load_after": load_average()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_step_floor",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare_char_cpu")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps (and matmul replays)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq_len < 1:
        p.error("--steps, --batch and --seq-len must be >= 1")
    from fastlm.config import ConfigError
    try:
        r = measure(args.preset, args.batch, args.seq_len, args.precision, args.steps)
    except (ValueError, ConfigError) as exc:
        print(f"bench_step_floor: {exc}", file=sys.stderr)
        return 2
    ratio = "n/a" if r["step_over_matmul"] is None else f"{r['step_over_matmul']:.2f}"
    print(f"{r['preset']} {r['precision']} {r['batch']}x{r['seq_len']}, 1 thread, CPU time: "
          f"step {r['step_cpu_ms']:.2f} ms, its {r['matmul_calls']} matmuls alone "
          f"{r['matmul_cpu_ms']:.2f} ms, step/matmul {ratio} (load {r['load_before']})")
    if args.json:
        from fastlm.bench import utils
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        utils.write_json([{**utils.environment(torch.device("cpu")), **r}], args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
