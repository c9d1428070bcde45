"""Training side by side: fastlm.train against nanoGPT's own train.py, same text, same threads.

    python -m fastlm.bench.bench_train --nanogpt PATH_TO_NANOGPT_SOURCE
        [--data ../shared/data/tinyshakespeare.txt] [--iters 2000] [--repeats N]
        [--threads 1,2] [--precisions fp32,bf16,auto] [--json PATH] [--keep DIR]
    python -m fastlm.bench.bench_train --vs-fp32 [--iters 500] [--threads 1] ...

--vs-fp32 compares fastlm's default (train.precision=auto: bf16 autocast on hardware that
computes bf16 natively) with forced fp32 on the same config and needs no nanoGPT: the same
tokens/s, plus the wall time (metrics.jsonl's time_s, evaluations included alike) until each run
first reaches the fp32 run's final validation loss (within --val-tol, default 0.01 nats/byte),
evaluated every iters/10 steps.

Both trainers run nanoGPT's documented CPU config of tiny Shakespeare (4 layers, 4 heads, width
128, block 64, batch 12, lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4 over the run,
AdamW betas (0.9, 0.99), weight decay 0.1, gradient clip 1, dropout 0), each in its own process
with the same torch thread count (OMP_NUM_THREADS and MKL_NUM_THREADS), one after the other and
interleaved within each repeat, so a change of load on a shared machine hits both:

  nanogpt      python train.py config/train_shakespeare_char.py --device=cpu --compile=False
               --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
               --n_head=4 --n_embd=128 --max_iters=N --lr_decay_iters=N --dropout=0.0
               (its README's command) plus --out_dir and --always_save_checkpoint=True, so the
               model it ends with is on disk to be scored (saving happens inside its evaluation
               iterations, which the timing leaves out)
  fastlm-fp32  python -m fastlm.train --model.preset=shakespeare_char_cpu --data FILE --out DIR
               --train.max_steps=N --train.log_interval=1 --train.progress=false
               --sample.tokens=0 (no text sample after training: not part of the loop)
  fastlm-bf16  the same with --train.precision=bf16 (bf16 autocast, float32 weights and
               optimizer). nanoGPT has no CPU mixed precision: on a CPU its autocast context is
               a no-op whatever --dtype says, so its only row is float32.

nanoGPT runs from a temporary copy of its source (train.py, model.py, configurator.py, config/),
on the train.bin/val.bin/meta.pkl that its own data/shakespeare_char/prepare.py writes from a copy
of FILE saved as its input.txt; `requests` is stubbed out for that script, so nothing is ever
downloaded. Nothing of nanoGPT is written outside the temporary folder (or --keep DIR).

What is measured, per provider and thread count (medians over the repeats):
  tokens/s    of the training loop alone: tokens / summed step time. nanoGPT's step times are the
              "iter k: ... time X ms" lines without iteration 0 (warm-up) and without the
              iterations that evaluated (k % eval_interval == 0: its timer includes evaluation
              and checkpointing there); fastlm's are the differences of metrics.jsonl's time_s
              (wall clock, 1 ms resolution) between consecutive rows, without step 1: like
              nanoGPT's they include each step's logging, and a step after an evaluation is
              timed from the end of that evaluation. The median step time is reported too
              (robust to another process stealing the CPU for a moment).
  val loss    each trainer's own estimate at the last step (nanoGPT: 20 random validation
              batches; fastlm: 20 fixed ones), and both final models scored here on the same
              symbols: every non-overlapping 64-token window of the validation split. Both cut
              the file at int(0.9 * length) and tiny Shakespeare is ASCII, so nanoGPT's 65
              characters and fastlm's bytes are the same symbols and nats per character are
              comparable; bits per character = nats / ln 2 (= bits per byte here).
  interleaved the same ratio, robust to load: after the runs, both models' training steps
              (forward, backward, clip, optimizer step) take turns in blocks of 10 in this
              process (--interleaved-blocks per model, 0 = skip), median ms per step. On a
              shared machine the full runs, minutes apart, see different loads; this does not.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from fastlm.bench import utils

OP = "train"
BATCH, SEQ_LEN = 12, 64  # nanoGPT's documented CPU run
TOKENS_PER_STEP = BATCH * SEQ_LEN
EVAL_BATCHES = 20
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                 "data/shakespeare_char/prepare.py")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# prepare.py imports requests to download input.txt when it is missing; it is never missing here,
# and a stub makes sure no download can happen whatever the script does.
_PREPARE = """import runpy, sys, types
stub = types.ModuleType("requests")
def _no_download(*a, **k):
    raise SystemExit("bench_train: nanoGPT's prepare.py tried to download; input.txt is missing")
stub.get = _no_download
sys.modules["requests"] = stub
runpy.run_path("data/shakespeare_char/prepare.py", run_name="__main__")
"""


class BenchError(RuntimeError):
    """Bad arguments or a trainer that failed; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# nanoGPT workspace
def check_nanogpt(path: Path) -> None:
    missing = [f for f in NANOGPT_FILES if not (path / f).is_file()]
    if missing:
        raise BenchError(f"--nanogpt {path}: not a nanoGPT source tree (missing "
                         f"{', '.join(missing)}); pass the folder holding its train.py")


def source_hash(path: Path) -> str:
    """sha256 over nanoGPT's train.py and model.py: which version ran (no git in a copy)."""
    h = hashlib.sha256()
    for name in ("train.py", "model.py"):
        h.update((path / name).read_bytes())
    return h.hexdigest()[:16]


def make_workspace(nanogpt: Path, data: Path, root: Path) -> Path:
    """A runnable copy of nanoGPT under root/nanogpt with its char dataset prepared from data."""
    ws = root / "nanogpt"
    (ws / "data" / "shakespeare_char").mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy2(nanogpt / name, ws / name)
    shutil.copytree(nanogpt / "config", ws / "config")
    shutil.copy2(nanogpt / "data/shakespeare_char/prepare.py", ws / "data/shakespeare_char")
    shutil.copy2(data, ws / "data/shakespeare_char/input.txt")
    out = subprocess.run([sys.executable, "-c", _PREPARE], cwd=ws, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise BenchError(f"nanoGPT's prepare.py failed on {data}:\n{out.stdout}{out.stderr}")
    return ws


# ---------------------------------------------------------------------------------------------
# Commands and their logs
def nanogpt_command(iters: int, eval_interval: int, out_dir: Path) -> list[str]:
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
            "--compile=False", f"--eval_iters={EVAL_BATCHES}", "--log_interval=1",
            f"--block_size={SEQ_LEN}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4",
            "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            "--dropout=0.0", f"--eval_interval={eval_interval}", f"--out_dir={out_dir}",
            "--always_save_checkpoint=True"]


def fastlm_command(data: Path, iters: int, eval_interval: int, out_dir: Path,
                   precision: str) -> list[str]:
    return [sys.executable, "-m", "fastlm.train", "--model.preset=shakespeare_char_cpu",
            "--data", str(data), "--out", str(out_dir), f"--train.max_steps={iters}",
            "--train.log_interval=1", "--train.progress=false", f"--eval.interval={eval_interval}",
            f"--eval.batches={EVAL_BATCHES}", f"--train.precision={precision}",
            "--sample.tokens=0"]


def run_logged(cmd: list[str], cwd: Path, threads: int, log: Path) -> float:
    """Run cmd with `threads` torch threads, stdout+stderr into log; wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
        raise BenchError(f"{' '.join(cmd)} exited with {proc.returncode} (log {log}):\n{tail}")
    return wall


_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.MULTILINE)
_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.MULTILINE)


def parse_nanogpt(text: str, eval_interval: int) -> tuple[list[float], float, int]:
    """(loop step times in seconds, val loss of the last evaluation, its step) from its stdout."""
    steps = [float(ms) / 1e3 for it, _loss, ms in _ITER.findall(text)
             if int(it) > 0 and int(it) % eval_interval]
    evals = _EVAL.findall(text)
    if not steps or not evals:
        raise BenchError("nanoGPT's output has no 'iter k: ... time X ms' or 'step k: ... val "
                         "loss' lines; has its train.py changed its log format?")
    return steps, float(evals[-1][2]), int(evals[-1][0])


def parse_fastlm(metrics: Path) -> tuple[list[float], float, int]:
    """(loop step times in seconds, last val_loss, its step) from RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    if not train or not val:
        raise BenchError(f"{metrics} has no train or val rows")
    # Wall time between consecutive rows, like nanoGPT's per-iteration timer: it includes the
    # logging of each step (its own tokens_per_s field does not), and a row that follows a val
    # row starts after that evaluation ended. log_interval=1: one train row per step.
    steps, prev_time = [], None
    for r in rows:
        if r.get("kind") == "train" and prev_time is not None and r["step"] > 1:
            steps.append(r["time_s"] - prev_time)
        prev_time = r["time_s"]
    return steps, val[-1]["val_loss"], val[-1]["step"]


# ---------------------------------------------------------------------------------------------
# Scoring both final models on the same validation windows
def val_windows(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) (W, SEQ_LEN) byte ids of every non-overlapping window of the validation split."""
    raw = data.read_bytes()
    val = np.frombuffer(raw[int(len(raw) * 0.9):], dtype=np.uint8).astype(np.int64)
    w = (len(val) - 1) // SEQ_LEN
    x = torch.from_numpy(val[:w * SEQ_LEN].reshape(w, SEQ_LEN).copy())
    y = torch.from_numpy(val[1:w * SEQ_LEN + 1].reshape(w, SEQ_LEN).copy())
    return x, y


@torch.no_grad()
def mean_loss(model, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    """Mean next-symbol loss (nats) over all windows; model(x, y) -> (_, mean loss)."""
    total = 0.0
    for s in range(0, len(x), batch):
        _, loss = model(x[s:s + batch], y[s:s + batch])
        total += loss.item() * len(x[s:s + batch])
    return total / len(x)


def score_nanogpt(ws: Path, out_dir: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """nanoGPT's saved model (its own model.py) on the windows, bytes mapped to its char ids."""
    import pickle
    with open(ws / "data/shakespeare_char/meta.pkl", "rb") as f:  # written by prepare.py above
        stoi = pickle.load(f)["stoi"]
    table = torch.full((256,), -1, dtype=torch.long)
    for ch, i in stoi.items():
        table[ord(ch)] = i
    xs, ys = table[x], table[y]
    if (xs < 0).any() or (ys < 0).any():
        raise BenchError("validation text holds a character nanoGPT's vocabulary lacks")
    module = load_nanogpt_model(ws)
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return mean_loss(model.eval(), xs, ys)


def score_fastlm(run_dir: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    from fastlm import checkpoint
    from fastlm.restore import load
    model = load(checkpoint.latest(run_dir)).model
    return mean_loss(model, x, y)


# ---------------------------------------------------------------------------------------------
# Interleaved steps: a load-robust ratio on a shared machine
def load_nanogpt_model(ws: Path):
    """nanoGPT's model module, imported from the workspace copy."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", ws / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved_steps(ws: Path | None, data: Path, precisions: list[str], blocks: int,
                      block_steps: int = 10) -> dict[str, float]:
    """Median ms per training step of each model, measured in this process with blocks of
    block_steps steps taking turns, so a change of load hits every provider alike (the full runs
    above are minutes apart). A step is what both loops do per iteration, run by the one
    fastlm.train.step for both: forward with targets, backward, clip the gradient norm to 1,
    optimizer step, zero the gradients; nanoGPT's with its model.py and configure_optimizers,
    fastlm's with fastlm.models.gpt.GPT and fastlm.train.optim.build_optimizer from the preset
    (bf16: autocast around the forward). ws None: fastlm's models only."""
    from fastlm.config import parse_args as parse_config
    from fastlm.models.gpt import GPT
    from fastlm.train.optim import build_optimizer
    from fastlm.train.step import TrainStep

    train = torch.from_numpy(np.frombuffer(data.read_bytes(), dtype=np.uint8).astype(np.int64))
    train = train[:int(len(train) * 0.9)]
    gen = torch.Generator().manual_seed(0)

    def batch(vocab_map=None):  # (B, T) windows at random offsets, like both trainers
        ix = torch.randint(len(train) - SEQ_LEN - 1, (BATCH,), generator=gen)
        x = torch.stack([train[i:i + SEQ_LEN] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + SEQ_LEN] for i in ix])
        return (x, y) if vocab_map is None else (vocab_map[x], vocab_map[y])

    def stepper(model, optimizer, precision, vocab_map=None):
        train_step = TrainStep(model, optimizer, device=torch.device("cpu"), precision=precision,
                               grad_clip=1.0)
        return lambda: train_step(lambda _micro: model(*batch(vocab_map))[1])

    steps = {} if ws is None else {"nanogpt": nanogpt_stepper(ws, stepper)}
    cfg = parse_config(["--model.preset=shakespeare_char_cpu"])
    cfg.model.vocab_size = 256
    for precision in precisions:
        torch.manual_seed(0)
        model = GPT(cfg.model)
        steps[f"fastlm-{precision}"] = stepper(model, build_optimizer(model, cfg.optim),
                                               precision)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        for _ in range(3):
            step()
    for _ in range(blocks):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(block_steps):
                step()
            times[name].append((time.perf_counter() - t0) / block_steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def nanogpt_stepper(ws: Path, stepper):
    """nanoGPT's model and optimizer as interleaved_steps' step function."""
    import contextlib
    import io
    import pickle
    with open(ws / "data/shakespeare_char/meta.pkl", "rb") as f:
        stoi = pickle.load(f)["stoi"]
    to_char = torch.zeros(256, dtype=torch.long)
    for ch, i in stoi.items():
        to_char[ord(ch)] = i
    ng = load_nanogpt_model(ws)
    with contextlib.redirect_stdout(io.StringIO()):  # its parameter-count prints
        torch.manual_seed(0)
        n_model = ng.GPT(ng.GPTConfig(block_size=SEQ_LEN, vocab_size=len(stoi), n_layer=4,
                                      n_head=4, n_embd=128, dropout=0.0, bias=False))
        n_opt = n_model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    return stepper(n_model, n_opt, "fp32", to_char)


def val_curve(metrics: Path) -> list[tuple[int, float, float]]:
    """(step, time_s, val_loss) of every evaluation in RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["time_s"], r["val_loss"]) for r in rows if r.get("kind") == "val"]


def time_to_reach(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Seconds until the first evaluation at or below target (None: never)."""
    return next((t for _step, t, loss in curve if loss <= target), None)


def steps_to_reach(curve: list[tuple[int, float, float]], target: float) -> int | None:
    """Optimizer steps until the first evaluation at or below target (None: never)."""
    return next((step for step, _t, loss in curve if loss <= target), None)


def add_time_to_fp32_loss(rows: list[dict], runs: dict[tuple[str, int], list[dict]],
                          tol: float = 0.0) -> None:
    """--vs-fp32: per thread count, the fp32 runs' median final val loss plus tol is the
    target; each row gets the median seconds its runs took to first reach it, and the fp32
    row's time over its own (the speed-up at equal validation loss). tol (--val-tol) is what
    "equal" allows: a bf16 run that ends 6e-5 nats above fp32's final loss, far inside the
    evaluation's own sampling error, would otherwise never reach it."""
    for threads in {t for _name, t in runs}:
        fp32 = runs.get(("fastlm-fp32", threads), [])
        if not fp32 or not all("val_curve" in r for r in fp32):
            continue
        target = statistics.median(r["val_curve"][-1][2] for r in fp32) + tol
        times, steps = {}, {}
        for (name, t), rs in runs.items():
            if t == threads and all("val_curve" in r for r in rs):  # fastlm's runs
                reached = [time_to_reach(r["val_curve"], target) for r in rs]
                times[name] = (statistics.median(reached) if None not in reached else None)
                reached = [steps_to_reach(r["val_curve"], target) for r in rs]
                steps[name] = (statistics.median(reached) if None not in reached else None)
        for r in rows:
            if r["threads"] == threads and r["provider"] in times:
                r["fp32_target_val_loss"], r["val_tol"] = target, tol
                r["time_to_fp32_val_s"] = times[r["provider"]]
                r["steps_to_fp32_val"] = steps[r["provider"]]
                if times[r["provider"]] and times["fastlm-fp32"]:
                    r["speedup_at_fp32_val"] = times["fastlm-fp32"] / times[r["provider"]]


def add_interleaved_speedup_at_fp32_loss(rows: list[dict]) -> None:
    """Load-robust version of speedup_at_fp32_val: steps to the target times the interleaved
    step time (the full runs are minutes apart on a shared machine; the interleaved steps are
    not), fp32's over each row's."""
    fp32 = {r["threads"]: r for r in rows if r["provider"] == "fastlm-fp32"}
    for r in rows:
        b = fp32.get(r["threads"])
        if b and r.get("steps_to_fp32_val") and "interleaved_step_ms" in r \
                and "interleaved_step_ms" in b:
            r["interleaved_speedup_at_fp32_val"] = (
                b["steps_to_fp32_val"] * b["interleaved_step_ms"]
                / (r["steps_to_fp32_val"] * r["interleaved_step_ms"]))


# ---------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path,
                   help="nanoGPT's source folder (its train.py, model.py, config/, data/); "
                        "needed unless --vs-fp32")
    p.add_argument("--vs-fp32", action="store_true",
                   help="fastlm's default (precision auto) against forced fp32, no nanoGPT")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the text (tiny Shakespeare)")
    p.add_argument("--iters", type=int, default=2000, help="optimizer steps of each run")
    p.add_argument("--repeats", type=int, default=1, help="runs of each provider (median)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="fastlm rows: fp32, bf16 and/or auto (--vs-fp32: auto,fp32)")
    p.add_argument("--json", help="output file (default bench/results/<device>/train-<date>.json)")
    p.add_argument("--keep", type=Path, help="keep the runs (logs, checkpoints) in this folder")
    p.add_argument("--val-tol", type=float, default=0.01,
                   help="--vs-fp32: nats per byte above fp32's final val loss that still count "
                        "as reaching it (default 0.01, under the sampling error of the default "
                        "20 evaluation batches)")
    p.add_argument("--interleaved-blocks", type=int, default=15,
                   help="blocks of 10 steps per model in the interleaved timing (0 = skip it)")
    a = p.parse_args(argv)
    try:
        a.threads = [int(t) for t in a.threads.split(",")]
    except ValueError:
        p.error(f"--threads must be comma-separated integers, got {a.threads!r}")
    a.precisions = [s.strip() for s in a.precisions.split(",") if s.strip()]
    bad = [s for s in a.precisions if s not in ("fp32", "bf16", "auto")]
    if bad:
        p.error(f"--precisions: unknown {', '.join(bad)}; choose from fp32, bf16, auto")
    if a.vs_fp32:
        a.precisions = ["auto", "fp32"]
    elif a.nanogpt is None:
        p.error("--nanogpt PATH is needed (or --vs-fp32 for fastlm's auto against fp32)")
    if a.iters < 2 or a.repeats < 1 or min(a.threads) < 1 or a.interleaved_blocks < 0 \
            or a.val_tol < 0:
        p.error("--iters must be >= 2, --repeats and every --threads value >= 1, "
                "--interleaved-blocks and --val-tol >= 0")
    if not a.data.is_file():
        p.error(f"--data {a.data}: no such file (tiny Shakespeare lives at {DEFAULT_DATA})")
    if not a.data.read_bytes().isascii():
        p.error(f"--data {a.data}: the comparison needs ASCII text (characters = bytes)")
    return a


def run(args) -> list[dict]:
    if getattr(args, "nanogpt", None) is None and not getattr(args, "vs_fp32", False):
        # `python -m fastlm.bench --ops train`
        raise SystemExit("bench_train: needs nanoGPT's source and runs for minutes: use "
                         "`python -m fastlm.bench.bench_train --nanogpt PATH` (see its --help)")
    vs_fp32 = getattr(args, "vs_fp32", False)
    if vs_fp32:  # evaluations often enough to see when a run reaches a loss
        eval_interval = max(1, args.iters // 10)
    else:
        check_nanogpt(args.nanogpt)
        eval_interval = 250 if args.iters % 250 == 0 else args.iters  # nanoGPT's; end included
    root = Path(tempfile.mkdtemp(prefix="bench_train-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    ws = None if vs_fp32 else make_workspace(args.nanogpt, args.data, root)
    x, y = val_windows(args.data)
    providers = ([] if vs_fp32 else ["nanogpt"]) + [f"fastlm-{p}" for p in args.precisions]
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for rep in range(args.repeats):
            for threads in args.threads:
                for name in providers:
                    out = root / f"{name}-t{threads}-r{rep}"
                    log = root / f"{name}-t{threads}-r{rep}.log"
                    if name == "nanogpt":
                        cmd = nanogpt_command(args.iters, eval_interval, out)
                        wall = run_logged(cmd, ws, threads, log)
                        steps, val, val_step = parse_nanogpt(log.read_text(), eval_interval)
                        full = score_nanogpt(ws, out, x, y)
                    else:
                        cmd = fastlm_command(args.data.resolve(), args.iters, eval_interval, out,
                                             name.split("-")[1])
                        wall = run_logged(cmd, REPO, threads, log)
                        steps, val, val_step = parse_fastlm(out / "metrics.jsonl")
                        full = score_fastlm(out, x, y)
                    if name != "nanogpt":  # what auto chose, and the loss over time
                        r0 = {"val_curve": val_curve(out / "metrics.jsonl"), "precision":
                              tomllib.loads((out / "config.toml").read_text())["train"]
                              ["precision"]}
                    else:
                        r0 = {"precision": "fp32"}
                    r = {**r0, "tokens_per_s": len(steps) * TOKENS_PER_STEP / sum(steps),
                         "step_ms": statistics.median(steps) * 1e3, "val_loss": val,
                         "val_step": val_step, "full_val_loss": full, "wall_s": wall,
                         "loadavg": round(os.getloadavg()[0], 2), "command": cmd}
                    runs.setdefault((name, threads), []).append(r)
                    print(f"repeat {rep + 1}/{args.repeats} threads {threads} {name:12s} "
                          f"{r['tokens_per_s']:8,.0f} tok/s  step {r['step_ms']:6.2f} ms  "
                          f"val {val:.4f} (own, step {val_step})  full val {full:.4f} nats/char"
                          f"  wall {wall:.0f} s  load {r['loadavg']}", flush=True)
        interleaved = {}
        for threads in args.threads if args.interleaved_blocks else ():
            torch.set_num_threads(threads)
            interleaved[threads] = interleaved_steps(ws, args.data, args.precisions,
                                                     args.interleaved_blocks)
            print(f"interleaved steps, threads {threads}: " + ", ".join(
                f"{k} {v:.2f} ms" for k, v in interleaved[threads].items()), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return summarize(runs, args, interleaved)


def summarize(runs: dict[tuple[str, int], list[dict]], args,
              interleaved: dict[int, dict[str, float]] | None = None) -> list[dict]:
    env = utils.environment(torch.device("cpu"))
    nanogpt_version = source_hash(args.nanogpt) if args.nanogpt else None
    med = statistics.median
    rows = []
    for (name, threads), rs in runs.items():
        full = med(r["full_val_loss"] for r in rs)
        rows.append({
            **env, "op": OP, "provider": name, "threads": threads,
            "precision": rs[0].get("precision") or name.removeprefix("fastlm-").replace(
                "nanogpt", "fp32"),  # auto: what it chose
            "vocab": "65 characters" if name == "nanogpt" else "256 bytes",
            "iters": args.iters, "batch": BATCH, "seq_len": SEQ_LEN, "shape": [BATCH, SEQ_LEN],
            "repeats": len(rs), "tokens_per_s": med(r["tokens_per_s"] for r in rs),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in rs],
            "step_ms": med(r["step_ms"] for r in rs),
            "val_loss": med(r["val_loss"] for r in rs), "val_step": rs[0]["val_step"],
            "val_bpc": med(r["val_loss"] for r in rs) / math.log(2),
            "full_val_loss": full, "full_val_bpc": full / math.log(2),
            "full_val_loss_runs": [round(r["full_val_loss"], 4) for r in rs],
            "wall_s": med(r["wall_s"] for r in rs), "command": rs[0]["command"],
            "loadavg_runs": [r["loadavg"] for r in rs],  # 1-minute load at each run's end
            "nanogpt_source_sha256": nanogpt_version,
            "bench_command": "python -m fastlm.bench.bench_train " + " ".join(sys.argv[1:])})
    add_time_to_fp32_loss(rows, runs, args.val_tol)
    base = {r["threads"]: r for r in rows if r["provider"] == "nanogpt"}
    for r in rows:
        b = base.get(r["threads"])
        if b is not None:
            r["speedup_vs_nanogpt"] = r["tokens_per_s"] / b["tokens_per_s"]
            r["step_speedup_vs_nanogpt"] = b["step_ms"] / r["step_ms"]
            r["full_val_bpc_vs_nanogpt"] = r["full_val_bpc"] - b["full_val_bpc"]
        steps = (interleaved or {}).get(r["threads"], {})
        if r["provider"] in steps:
            r["interleaved_step_ms"] = steps[r["provider"]]
            if "nanogpt" in steps:
                r["interleaved_speedup_vs_nanogpt"] = steps["nanogpt"] / steps[r["provider"]]
    add_interleaved_speedup_at_fp32_loss(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    """The table printed here and by `python -m fastlm.bench report` (bench/RESULTS.md)."""
    header = ("threads", "provider", "tokens/s", "step ms", "vs nanoGPT", "interleaved",
              "own val loss", "full val bits/char", "runs", "load")
    body = [header]
    for r in sorted(rows, key=lambda r: (r["threads"], r["provider"] != "nanogpt",
                                         r["provider"])):
        ratio = f"{r['speedup_vs_nanogpt']:.2f}x" if "speedup_vs_nanogpt" in r else "-"
        inter = (f"{r['interleaved_step_ms']:.1f} ms {r['interleaved_speedup_vs_nanogpt']:.2f}x"
                 if "interleaved_speedup_vs_nanogpt" in r else "-")
        body.append((str(r["threads"]), r["provider"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['step_ms']:.2f}", ratio, inter,
                     f"{r['val_loss']:.4f}", f"{r['full_val_bpc']:.4f}", str(r["repeats"]),
                     "/".join(f"{x:.1f}" for x in r.get("loadavg_runs", []))))
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = rows[0]
    note = (f"{first['iters']} steps of {first['batch']}x{first['seq_len']} tokens. tokens/s: "
            "the training loop without evaluation, total tokens / total step time (median of the "
            "runs), which stalls from other processes pull down; step ms: the median step, "
            "which they do not; vs nanoGPT: tokens/s ratio at the same threads; interleaved: median ms per step and its ratio with the "
            "models' steps taking turns in one process (robust to the load of a shared "
            "machine); own val loss: each trainer's estimate at the last step, "
            "in nats per its token (nanoGPT: 65 characters, fastlm: bytes); full val: both final "
            "models scored here on every 64-character window of the validation split; load: the "
            "machine's 1-minute load average after each run.")
    lines += textwrap.wrap(note, 100)
    for r in rows:
        if "fp32_target_val_loss" in r:
            reached = r["time_to_fp32_val_s"]
            lines.append(
                f"threads {r['threads']} {r['provider']} ({r['precision']}): fp32's final val "
                f"loss + {r.get('val_tol', 0):g} = {r['fp32_target_val_loss']:.4f} reached after "
                + (f"{reached:.1f} s" if reached is not None else "never")
                + (f" (step {r['steps_to_fp32_val']})" if reached is not None else "")
                + (f", {r['speedup_at_fp32_val']:.2f}x fp32's time"
                   if "speedup_at_fp32_val" in r else "")
                + (f"; with the interleaved step times {r['interleaved_speedup_at_fp32_val']:.2f}x"
                   if "interleaved_speedup_at_fp32_val" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = run(args)
    except BenchError as exc:
        raise SystemExit(f"bench_train: error: {exc}") from None
    print(format_table(rows))
    path = args.json or str(REPO / "bench" / "results" / utils.device_slug(torch.device("cpu"))
                            / f"train-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    utils.write_json(rows, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
