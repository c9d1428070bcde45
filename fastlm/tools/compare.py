"""Train several architectures on the same data for the same wall-clock budget and compare them:

    python -m fastlm.compare --archs gpt2,llama,lstm,gru,gcnn --data tinyshakespeare.txt \\
        --budget-seconds 150 [--out DIR] [--threads T] [--device auto|cpu|cuda]
        [--presets gcnn=tiny-gcnn,...] [--section.key=value ...]

Each arch trains with its comparison preset (fastlm/configs: gpt2 -> shakespeare_char_cpu, any
other arch A -> shakespeare-A; --presets overrides), all sized to about the same parameter count
(~0.8M with byte tokens) and, where sensible, the same window (64 tokens), optimizer (AdamW,
betas 0.9/0.99, weight decay 0.1) and schedule (100 warmup steps, cosine to lr/10); the presets
say where an arch departs (the RNNs take a higher lr and more, contiguous, rows). Trailing
`--section.key=value` options apply to every run. Data: byte tokens (the default tokenizer).

Per arch:
  1. calibrate: a few optimizer steps in a fresh process (the run's threads) time the arch's
     steps/s, so that train.max_steps = what fits in the budget and the learning-rate schedule
     completes in it (a cosine cut off before its end would handicap the slower archs);
  2. train: `python -m fastlm.train` in a fresh subprocess (clean timing: no state left by the
     previous arch, its own thread setting) with train.max_seconds = the budget as a hard stop;
     the budget counts the trainer's loop, periodic evaluations included, not process start-up
     or data loading. Runs go to DIR/<arch>/ (metrics.jsonl, checkpoints, train.log);
  3. evaluate: the final checkpoint on the whole validation text, cut into consecutive windows
     of the training length, identical for every arch (each window starts from an empty context,
     the RNNs from a zero state, so every model sees at most one window of context).

Writes DIR/compare.json (everything, with the command and machine), DIR/compare.md (the table:
arch, params, tokens/s, steps, val loss, bits per byte) and DIR/compare.png (val bits per byte
against training wall time from each run's periodic evaluations; skipped with a message without
matplotlib). Loss is in nats per byte; with byte tokens bits per byte = loss / ln 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastlm.command import run_command

DEFAULT_PRESETS = {"gpt2": "shakespeare_char_cpu"}  # any other arch A: shakespeare-A
CALIBRATION_SECONDS = (0.5, 4.0)  # per arch, after 2 warm-up steps: 3% of the budget, clamped
N_EVALS = 10  # periodic evaluations per run (the points of the curve), plus the one at step 0
BUDGET_USE = 0.97  # of the budget left after the evaluations: step-time jitter, logging
EVAL_BATCH_COST = 0.35  # an eval batch (forward only) in training steps (forward + backward)
EVAL_BATCH = 32  # windows per forward in the final evaluation


class CompareError(Exception):
    """Bad arguments or a failed run; reported as one line."""


# ---------------------------------------------------------------------------------------------
# Arguments
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m fastlm.compare",
        description="Train each architecture for the same wall-clock budget on the same data "
                    "and compare val loss, bits per byte and throughput. Trailing "
                    "--section.key=value options are passed to every run.")
    p.add_argument("--archs", required=True, help="comma-separated model.arch names")
    p.add_argument("--data", required=True, help="training text (byte tokens; the last 10%% "
                                                 "of a single file is the validation text)")
    p.add_argument("--budget-seconds", type=float, required=True,
                   help="wall-clock training time per arch")
    p.add_argument("--out", default="", help="output folder (default compare/<timestamp>)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (0 = torch's default)")
    p.add_argument("--device", default="auto", help="train.device of every run")
    p.add_argument("--presets", default="", help="arch=preset,... overriding the defaults "
                   "(gpt2=shakespeare_char_cpu, else shakespeare-<arch>)")
    p.add_argument("--seed", type=int, default=1337, help="train.seed of every run")
    args, extra = p.parse_known_args(argv)
    for opt in extra:
        name = opt[2:].partition("=")[0]
        if not (opt.startswith("--") and "=" in opt and "." in name):
            raise CompareError(f"unexpected argument '{opt}': options for the runs are written "
                               "--section.key=value (e.g. --train.batch_size=12)")
    if args.budget_seconds <= 0:
        raise CompareError(f"--budget-seconds must be > 0, got {args.budget_seconds:g}")
    if args.threads < 0:
        raise CompareError(f"--threads must be >= 0, got {args.threads}")
    return args, extra


def resolve_archs(spec: str, presets_spec: str) -> list[tuple[str, str]]:
    """[(arch, preset)], checked before anything runs: every arch registered, every preset
    shipped."""
    from fastlm import models
    from fastlm.config import list_presets

    archs = [a.strip() for a in spec.split(",") if a.strip()]
    if not archs:
        raise CompareError("--archs: give at least one architecture, e.g. --archs gpt2,gcnn")
    if len(set(archs)) != len(archs):
        raise CompareError(f"--archs: {spec!r} names an architecture twice")
    available = models.available()
    unknown = [a for a in archs if a not in available]
    if unknown:
        raise CompareError(f"--archs: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'}"
                           f" not registered; fastlm.models.available() = "
                           f"{', '.join(available)}")
    chosen = dict(DEFAULT_PRESETS)
    for item in filter(None, (s.strip() for s in presets_spec.split(","))):
        arch, eq, preset = item.partition("=")
        if not eq or not preset:
            raise CompareError(f"--presets: '{item}' is not arch=preset")
        chosen[arch] = preset
    shipped = list_presets()
    out = []
    for arch in archs:
        preset = chosen.get(arch, f"shakespeare-{arch}")
        if preset not in shipped:
            raise CompareError(f"no comparison preset for {arch}: fastlm/configs/{preset}.toml "
                               f"does not exist (choose one with --presets {arch}=NAME; "
                               f"presets: {', '.join(shipped)})")
        out.append((arch, preset))
    return out


# ---------------------------------------------------------------------------------------------
# One arch
def run_config(preset: str, args: argparse.Namespace, extra: list[str], run_dir: Path,
               more: tuple[str, ...] = ()) -> list[str]:
    """The fastlm.train arguments of one run."""
    return [f"--model.preset={preset}", "--data", args.data, "--out", str(run_dir),
            f"--train.device={args.device}", f"--train.seed={args.seed}",
            "--train.progress=false", *extra, *more]


def calibrate(cfg, seconds: float) -> float:
    """Optimizer steps per second of cfg's model at its batch shape on cfg's device: the
    trainer's step (fastlm.train.step: accumulation, precision, clipping, the optimizer) on
    random tokens."""
    from fastlm import models
    from fastlm.train.optim import build_optimizer
    from fastlm.train.runtime import grad_accum_steps, pick_device
    from fastlm.train.step import TrainStep

    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = models.build(cfg.model).to(device).train()
    B, T = cfg.train.batch_size, cfg.seq_len
    train_step = TrainStep(model, build_optimizer(model, cfg.optim), device=device,
                           precision=cfg.train.precision, grad_clip=cfg.train.grad_clip,
                           accum=grad_accum_steps(cfg, 1))
    gen = torch.Generator().manual_seed(0)

    def micro_loss(_micro: int) -> torch.Tensor:
        x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=gen)  # (B, T)
        x, y = model.make_batch(x, torch.roll(x, -1, 1), gen)
        return model(x.to(device), y.to(device))[1]

    for _ in range(2):  # warm-up: allocator, kernels, lazy init
        train_step(micro_loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        train_step(micro_loss)
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def calibrate_in_subprocess(train_argv: list[str], env: dict, seconds: float) -> float:
    """calibrate() in a fresh process with the run's environment: a process that has already
    trained or evaluated other models times some of them up to 2x slow (an LSTM after two
    transformers: 11 instead of 14.5 steps/s), and the run itself starts fresh too."""
    proc = subprocess.run([sys.executable, "-m", "fastlm.compare", CALIBRATE_FLAG, str(seconds),
                           *train_argv], env=env, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise CompareError(f"calibration failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(lines[-1])


CALIBRATE_FLAG = "--calibrate-seconds"  # internal: python -m fastlm.compare FLAG S TRAIN_ARGS


def _calibrate_main(argv: list[str]) -> int:
    """The calibration subprocess: prints the steps/s of the run configured by argv."""
    from fastlm.config import parse_args

    print(calibrate(parse_args(argv[1:]), float(argv[0])))
    return 0


@torch.no_grad()
def full_val_loss(run_dir: Path, val: torch.Tensor) -> tuple[float, int]:
    """Mean loss (nats per token) of the run's final checkpoint over every consecutive window of
    the validation tokens `val` (uint8, 1-D) at the run's seq_len, and the tokens scored."""
    from fastlm.config import load_config
    from fastlm.restore import load
    from fastlm.train.runtime import pick_device

    cfg = load_config(run_dir / "config.toml")
    device = pick_device(cfg.train.device)
    model = load(run_dir, device).model
    T = cfg.seq_len
    n = (len(val) - 1) // T
    if n < 1:
        raise CompareError(f"the validation text ({len(val)} bytes) is shorter than one "
                           f"window of {T + 1} bytes")
    x = val[:n * T].long().view(n, T)  # (n, T)
    y = val[1:n * T + 1].long().view(n, T)  # (n, T): the next byte of each position
    total = 0.0
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        loss = model(xb.to(device), yb.to(device))[1]  # mean over the chunk
        total += loss.item() * xb.numel()
    return total / (n * T), n * T


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "val"]


def run_arch(arch: str, preset: str, args: argparse.Namespace, extra: list[str], out: Path,
             val: torch.Tensor) -> dict:
    from fastlm import models
    from fastlm.config import parse_args

    run_dir = out / arch
    cfg = parse_args(run_config(preset, args, extra, run_dir))
    if cfg.data.tokenizer != "byte":
        raise CompareError("fastlm.compare measures bits per byte with byte tokens; leave "
                           "data.tokenizer at 'byte'")
    params = models.build(cfg.model).num_params()
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    lo, hi = CALIBRATION_SECONDS
    rate = calibrate_in_subprocess(run_config(preset, args, extra, run_dir), env,
                                   min(hi, max(lo, 0.03 * args.budget_seconds)))
    # Steps that fit: the budget at the calibrated rate, less the N_EVALS + 1 evaluations of
    # eval.batches forward passes each that the trainer's clock also counts.
    eval_steps = (N_EVALS + 1) * cfg.eval.batches * EVAL_BATCH_COST
    planned = max(1, int(rate * args.budget_seconds * BUDGET_USE - eval_steps))
    warmup = min(cfg.optim.warmup_steps, max(1, planned // 10))  # a tiny budget still decays
    interval = max(1, planned // N_EVALS)
    more = (f"--train.max_steps={planned}", f"--train.max_seconds={args.budget_seconds:g}",
            f"--eval.interval={interval}", f"--optim.warmup_steps={warmup}",
            f"--train.log_interval={max(1, min(cfg.train.log_interval, interval))}")
    argv = run_config(preset, args, extra, run_dir, more)
    print(f"[{arch}] preset {preset}, {params / 1e6:.3f}M params, calibrated "
          f"{rate:.2f} steps/s -> max_steps {planned}, eval every {interval}, budget "
          f"{args.budget_seconds:g} s", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    load_before = _load_average()
    cpu0 = _children_cpu_seconds()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "fastlm.train", *argv], stdout=log,
                              stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - t0
    cpu = _children_cpu_seconds() - cpu0  # the trainer process's CPU time, start-up included
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-8:])
        raise CompareError(f"[{arch}] fastlm.train exited with {proc.returncode} "
                           f"(log: {log_path}):\n{tail}")
    train_rows, val_rows = read_metrics(run_dir)
    if not val_rows or not train_rows:
        raise CompareError(f"[{arch}] {run_dir / 'metrics.jsonl'} has no train/val rows")
    val_loss, scored = full_val_loss(run_dir, val)
    speeds = [r["tokens_per_s"] for r in train_rows]
    sample = run_dir / "sample.txt"
    result = {
        "arch": arch, "preset": preset, "params": params,
        "tokens_per_s": round(statistics.median(speeds), 1),
        "steps": train_rows[-1]["step"], "planned_steps": planned,
        "calibrated_steps_per_s": round(rate, 3),
        "train_seconds": val_rows[-1]["time_s"], "process_seconds": round(wall, 2),
        "process_cpu_seconds": round(cpu, 2),
        "val_loss": round(val_loss, 4), "val_bpb": round(val_loss / math.log(2), 4),
        "val_tokens": scored,
        "trainer_val_loss": round(val_rows[-1]["val_loss"], 4),
        "final_train_loss": round(train_rows[-1]["loss"], 4),
        "curve": [[r["time_s"], round(r["val_bpb"], 4), r["step"]] for r in val_rows],
        "config": {k: v for k, v in (
            ("n_layer", cfg.model.n_layer), ("n_embd", cfg.model.n_embd),
            ("seq_len", cfg.seq_len), ("batch_size", cfg.train.batch_size),
            ("lr", cfg.optim.lr), ("min_lr", cfg.optim.min_lr), ("warmup_steps", warmup),
            ("schedule", cfg.optim.schedule))},
        # Other processes' demand for the cores (1-minute load average before and after the
        # run): on a shared machine a load above the core count slows every arch's clock.
        "load_average": [load_before, _load_average()],
        "run_dir": str(run_dir),
        "sample": sample.read_text() if sample.exists() else None,
    }
    print(f"[{arch}] {result['steps']} steps in {result['train_seconds']:.1f} s, "
          f"{result['tokens_per_s']:,.0f} tokens/s, val loss {val_loss:.4f} "
          f"({result['val_bpb']:.3f} bits/byte)", flush=True)
    return result


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (resource is Unix-only)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None


# ---------------------------------------------------------------------------------------------
# Reports
COLUMNS = ("arch", "params", "tokens/s", "steps", "val loss", "bits/byte")


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        steps = f"{r['steps']}" + ("" if r["steps"] >= r["planned_steps"]
                                   else f" of {r['planned_steps']}")
        lines.append(f"| {r['arch']} | {r['params'] / 1e6:.3f}M | {r['tokens_per_s']:,.0f} | "
                     f"{steps} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    results = report["results"]
    head = [f"# fastlm.compare: {', '.join(r['arch'] for r in results)}", "",
            "```", report["command"], "```", "",
            (f"Data: {report['data']} ({report['val_bytes']:,} validation bytes, byte tokens). "
             f"Budget: {report['budget_seconds']:g} s of training wall time per arch on "
             f"{report['machine']['device']} ({report['machine']['threads']} threads), "
             f"torch {report['machine']['torch']}, commit {report['machine']['commit']}, "
             f"{report['machine']['date']}."), "",
            table(results), "",
            ("val loss: mean cross-entropy (nats per byte) of the final weights over the whole "
             "validation text in consecutive windows of the training length, every arch on the "
             "same windows, each window from an empty context (RNNs from a zero state); "
             "bits/byte = val loss / ln 2. tokens/s: median training throughput (evaluations "
             "excluded). steps: optimizer steps done (\"of N\": the budget ran out before the "
             "planned N, so the learning-rate schedule did not finish).")]
    for r in results:
        c = r["config"]
        head.append(f"- {r['arch']}: preset {r['preset']}, {c['n_layer']} layers x "
                    f"{c['n_embd']}, batch {c['batch_size']} x {c['seq_len']}, lr {c['lr']:g} "
                    f"-> {c['min_lr']:g} ({c['schedule']}, {c['warmup_steps']} warmup), "
                    f"{r['train_seconds']:.1f} s of training ({r['process_seconds']:.0f} s "
                    f"wall / {r['process_cpu_seconds']:.0f} s CPU for the whole process), "
                    f"load average {r['load_average'][0]} -> {r['load_average'][1]} on "
                    f"{report['machine']['cores']} cores")
    return "\n".join(head) + "\n"


def plot(report: dict, path: Path) -> str:
    """DIR/compare.png, or the reason it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in report["results"]:
        curve = [p for p in r["curve"] if p[2] > 0]  # step 0 (uniform, ~8 bits) squashes the
        ax.plot([p[0] for p in curve], [p[1] for p in curve], "o-", ms=3,  # axis: leave out
                label=f"{r['arch']} ({r['params'] / 1e6:.2f}M)")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("val bits per byte (periodic eval)")
    ax.set_title(f"{Path(report['data']).name}: {report['budget_seconds']:g} s per arch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def machine(threads: int, device: str) -> dict:
    from fastlm.train.runtime import pick_device

    dev = pick_device(device)
    name = platform.processor() or platform.machine()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name")), name)
        except OSError:
            pass
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent),
                                 "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": name, "threads": threads or torch.get_num_threads(),
            "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
def compare(argv: list[str]) -> dict:
    from fastlm.data.text import load_text

    args, extra = parse(argv)
    archs = resolve_archs(args.archs, args.presets)
    from fastlm.config import ConfigError, parse_args
    from fastlm.models import registry
    cfgs = []
    for arch, preset in archs:  # every run's config is valid before the first one starts
        objective = registry.get(arch).cls.objective
        if objective != "causal":
            raise CompareError(f"{arch} is a {objective} model: its loss does not predict the "
                               "next byte, so its bits per byte are not comparable; "
                               "fastlm.compare compares causal language models")
        try:
            cfgs.append(parse_args(run_config(preset, args, extra, Path("unused"))))
        except ConfigError as exc:
            raise CompareError(f"[{arch}] {exc}") from None
        if cfgs[-1].model.arch != arch:
            raise CompareError(f"preset {preset} trains model.arch={cfgs[-1].model.arch}, not "
                               f"{arch}; name a {arch} preset with --presets {arch}=NAME")
    d = cfgs[0].data
    try:  # the validation split fastlm.train makes of the same data
        val = load_text(args.data, d.max_bytes, d.val_fraction, min_len=2).val
    except (OSError, ValueError) as exc:
        raise CompareError(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)  # final evaluations; subprocesses: OMP_NUM_THREADS
    out = Path(args.out or Path("compare") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    for arch, _ in archs:
        if (out / arch).exists() and any((out / arch).iterdir()):
            raise CompareError(f"{out / arch} is not empty (a previous comparison?); choose "
                               "another --out")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    report = {
        "command": "python -m fastlm.compare " + shlex.join(argv),
        "data": args.data, "val_bytes": len(val), "budget_seconds": args.budget_seconds,
        "machine": machine(args.threads, args.device), "extra_options": extra,
        "results": results,
    }
    for arch, preset in archs:
        results.append(run_arch(arch, preset, args, extra, out, val))
        # Written after every arch: a later failure or Ctrl-C keeps the finished ones.
        (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "compare.md").write_text(markdown(report))
    png = plot(report, out / "compare.png")
    print("\n" + table(results))
    print(f"\nwrote {out / 'compare.json'}, {out / 'compare.md'}; compare.png: {png}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CALIBRATE_FLAG]:
        return _calibrate_main(argv[1:])
    try:
        compare(argv)
    except CompareError as exc:
        raise SystemExit(f"fastlm.compare: error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
