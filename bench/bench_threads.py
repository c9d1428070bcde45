"""Thread scaling of the training step on CPU: tokens/s at 1, 2, ... threads, in one process.

    python -m fastlm.bench.bench_threads [--presets shakespeare_char_cpu,gpt2-124m]
        [--threads 1,2] [--precisions fp32,bf16] [--rounds 5] [--steps 3] [--json PATH]

Each step is what fastlm.train runs (fastlm.tools.profile.make_step: forward with the loss under
the precision's autocast, backward, clipping at norm 1, fastlm's AdamW step) on random tokens.
Batches: shakespeare_char_cpu trains on 12 x 64 tokens (its config); gpt2-124m on 1 x 256
(--gpt2-batch, --gpt2-seq-len: a CPU step of a few seconds in ~2 GiB, not its GPU batch).

The thread counts take turns: every round runs --steps steps at each count (torch.set_num_threads)
after one untimed step at that count, so a change of load on a shared machine hits every count
alike; per (preset, precision, threads) the report is the median step time over all rounds,
tokens/s from it and the speedup over the first thread count. The load average before and after
goes into the JSON and the table: on a machine shared with other work, n threads only get n cores
when nothing else runs, so a speedup is only as good as that number.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

# preset -> (batch, seq_len) on CPU
DEFAULT_SHAPES = {"shakespeare_char_cpu": (12, 64), "gpt2-124m": (1, 256)}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def make_stepper(preset: str, batch: int, seq_len: int, precision: str, seed: int = 0):
    """A training step of `preset` at `precision` (fastlm.train's), on a fixed random batch."""
    from fastlm import models
    from fastlm.config import model_preset
    from fastlm.models.base import param_groups
    from fastlm.tools.profile import make_step
    from fastlm.train.optim import AdamW

    cfg = model_preset(preset)
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds {preset}'s block_size {cfg.block_size}")
    torch.manual_seed(seed)
    model = models.build(cfg)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    return make_step(model, optimizer, [(ids[:, :-1], ids[:, 1:])], torch.device("cpu"),
                     precision)


def measure(step, threads: list[int], rounds: int, steps: int) -> dict[int, list[float]]:
    """Step times (ms) per thread count, the counts taking turns round by round."""
    times: dict[int, list[float]] = {n: [] for n in threads}
    previous = torch.get_num_threads()
    try:
        i = 0
        for _ in range(rounds):
            for n in threads:
                torch.set_num_threads(n)
                step(i)  # untimed: the pool resizes, caches refill
                i += 1
                for _ in range(steps):
                    t = time.perf_counter()
                    step(i)
                    times[n].append((time.perf_counter() - t) * 1e3)
                    i += 1
    finally:
        torch.set_num_threads(previous)
    return times


def run(presets: list[str], threads: list[int], precisions: list[str], rounds: int, steps: int,
        shapes: dict[str, tuple[int, int]], log=print) -> list[dict]:
    rows = []
    for preset in presets:
        batch, seq_len = shapes.get(preset, (2, 128))
        for precision in precisions:
            step = make_stepper(preset, batch, seq_len, precision)
            load_before = load_average()
            times = measure(step, threads, rounds, steps)
            load_after = load_average()
            base = statistics.median(times[threads[0]])
            for n in threads:
                ms = statistics.median(times[n])
                rows.append({
                    "preset": preset, "precision": precision, "threads": n, "batch": batch,
                    "seq_len": seq_len, "step_ms": ms, "step_ms_min": min(times[n]),
                    "tokens_per_s": batch * seq_len / (ms / 1e3),
                    "speedup": base / ms, "samples": len(times[n]),
                    "load_before": load_before, "load_after": load_after,
                })
                log(format_row(rows[-1]))
    return rows


def format_row(r: dict) -> str:
    load = "/".join(f"{x:.1f}" for x in r["load_before"] or []) or "n/a"
    return (f"{r['preset']:<22} {r['precision']:<5} {r['threads']:>3} thr  "
            f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_ms']:9.1f} ms (min "
            f"{r['step_ms_min']:.1f})  x{r['speedup']:.2f}  load {load}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cpus = os.cpu_count() or 1
    default_threads = sorted({1, 2, cpus} if cpus >= 2 else {1})
    p.add_argument("--presets", default="shakespeare_char_cpu,gpt2-124m")
    p.add_argument("--threads", default=",".join(map(str, default_threads)),
                   help="thread counts, the first is the speedups' base (default 1,2[,cpus])")
    p.add_argument("--precisions", default="fp32,bf16", help="train.precision values")
    p.add_argument("--rounds", type=int, default=5, help="turns of every thread count")
    p.add_argument("--steps", type=int, default=3, help="timed steps per turn")
    p.add_argument("--gpt2-batch", type=int, default=DEFAULT_SHAPES["gpt2-124m"][0])
    p.add_argument("--gpt2-seq-len", type=int, default=DEFAULT_SHAPES["gpt2-124m"][1])
    p.add_argument("--json", default=None, help="write the rows (with the environment) here")
    args = p.parse_args(argv)
    try:
        args.threads = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--threads: comma-separated integers, got {args.threads!r}")
    if not args.threads or min(args.threads) < 1:
        p.error("--threads: every count must be >= 1")
    args.presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in ("fp32", "bf16", "fp16")]
    if bad:
        p.error(f"--precisions: choose from fp32, bf16, fp16, got {', '.join(bad)}")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastlm.bench import utils
    from fastlm.config import ConfigError

    shapes = dict(DEFAULT_SHAPES, **{"gpt2-124m": (args.gpt2_batch, args.gpt2_seq_len)})
    print(f"bench_threads: {utils.cpu_name()}, {os.cpu_count()} CPUs, threads {args.threads}")
    try:
        rows = run(args.presets, args.threads, args.precisions, args.rounds, args.steps, shapes)
    except (ValueError, ConfigError) as exc:
        print(f"bench_threads: {exc}", file=sys.stderr)
        return 2
    if args.json:
        env = utils.environment(torch.device("cpu"))
        utils.write_json([{**env, **r} for r in rows], args.json)  # r: this row's threads
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
