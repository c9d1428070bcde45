"""The training loop: `python -m fastlm.train [--config FILE.toml] [--data PATH] [--out RUN_DIR]
[--section.key=value ...]` (all keys: `--help`).

With no arguments it trains the tiny preset on the Python standard library's sources (byte
tokens), on the GPU if there is one, else the CPU, in about 3 minutes on a 2-core CPU. A run
directory (default runs/<timestamp>) receives:

  config.toml     the resolved config; `--config RUN_DIR/config.toml` repeats the run
  metrics.jsonl   one JSON object per line: {"kind": "train", step, loss, lr, grad_norm,
                  tokens_per_s, time_s} every log_interval steps and {"kind": "val", step,
                  val_loss, val_bpb, time_s} at step 0, every eval.interval steps and the end
  checkpoints/    fastlm.checkpoint directories (at the end, every checkpoint.interval, Ctrl-C)
  sample.txt      the text sampled at the end

Ctrl-C stops at the end of the current step and saves a checkpoint (a second Ctrl-C aborts at
once); `--checkpoint.resume=RUN_DIR` continues from the latest checkpoint. Warmup + cosine
learning rate, global gradient-norm clipping, float32 (mixed precision, compile and DDP come
with their own issue).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from fastlm import checkpoint, ops
from fastlm.config import Config, ConfigError, parse_args, to_dict, to_toml
from fastlm.data.text import TextData, load_text
from fastlm.models.gpt import GPT
from fastlm.optim import AdamW, param_groups


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    interrupted: bool


class SetupError(Exception):
    """Anything wrong before training starts: reported as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Pieces of the loop, each small enough to swap (the tokenizer and shard loader issues replace
# load_data; mixed precision wraps the step)
def load_data(cfg: Config) -> TextData:
    """The corpus as an object with train_batch, val_batches, encode, decode, vocab_size and
    bytes_per_token."""
    try:
        data = load_text(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction,
                         min_len=cfg.seq_len + 1)
    except (OSError, ValueError) as exc:
        raise SetupError(str(exc)) from None
    if data.vocab_size > cfg.model.vocab_size:
        raise SetupError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                         f"vocabulary ({data.vocab_size})")
    return data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"train.device={name} but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --train.device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError(f"train.device={name} but MPS is not available here")
    return device


def check_backends(device: torch.device) -> dict[str, str]:
    """The backend each op will use on device; a forced but unavailable one fails now."""
    try:
        return {op: ops.select_backend(op, device) for op in ops.IMPLEMENTED}
    except (ops.BackendUnavailableError, ValueError) as exc:
        raise SetupError(str(exc)) from None


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr at max_steps (or constant)."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant" or total <= o.warmup_steps:
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / (total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean loss (nats per token) over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        total += model(x.to(device), y.to(device))[1]
    model.train(was_training)
    return (total / len(batches)).item()


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl. Each write opens and closes
    the file (a few writes per second at most), so a crash never loses a line or a handle."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class StopFlag:
    """First Ctrl-C asks the loop to stop at the end of the step; the second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("\nCtrl-C: stopping after this step and saving a checkpoint "
                   "(press again to abort without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------
def train(cfg: Config) -> TrainResult:
    """Run training as configured. Raises SetupError for problems found before the first step."""
    try:
        ops.set_backend(cfg.kernels.backend)
    except ValueError as exc:
        raise SetupError(f"kernels.backend: {exc}") from None
    device = pick_device(cfg.train.device)
    backends = check_backends(device)
    resume = None
    if cfg.checkpoint.resume:
        try:
            resume = checkpoint.load(cfg.checkpoint.resume)
        except checkpoint.CheckpointError as exc:
            raise SetupError(f"checkpoint.resume: {exc}") from None
        saved_model = resume.manifest["config"].get("model", {})
        diff = [k for k, v in to_dict(cfg)["model"].items()
                if k != "preset" and saved_model.get(k, v) != v]
        if diff:
            saved_run = resume.path.parent.parent
            raise SetupError(
                f"checkpoint.resume: {resume.path} was trained with other model settings "
                f"({', '.join(f'model.{k}={saved_model[k]!r}' for k in diff)}); add "
                f"--config {saved_run / 'config.toml'} to reuse that run's settings")
    data = load_data(cfg)

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    optimizer = AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                      betas=cfg.optim.betas, eps=cfg.optim.eps)
    data_gen = torch.Generator().manual_seed(cfg.train.seed)
    step = 0
    if resume is not None:
        resume.load_model(model)
        resume.load_optimizer(optimizer)
        state = resume.train_state()
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        data_gen.set_state(state["data_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    run_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else (
        resume.path.parent.parent if resume is not None else default_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.out_dir = str(run_dir)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    config_dict = to_dict(cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")

    T, B, accum = cfg.seq_len, cfg.train.batch_size, cfg.train.grad_accum
    tokens_per_step = B * T * accum
    val_batches = data.val_batches(cfg.eval.batches, B, T)
    print(f"fastlm.train: run directory {run_dir}")
    print(f"  data    {data.description}")
    print(f"  model   {cfg.model.preset or 'custom'} ({cfg.model.arch}), "
          f"{model.num_params() / 1e6:.2f}M parameters, context {T}")
    print(f"  device  {device}, ops: " + ", ".join(f"{k}={v}" for k, v in backends.items()))
    print(f"  steps   {step} -> {cfg.train.max_steps}, {tokens_per_step:,} tokens/step "
          f"({B} x {T} x {accum})", flush=True)

    def save_checkpoint(val_loss: float | None) -> Path:
        state = {"step": step, "torch_rng": torch.get_rng_state(),
                 "data_rng": data_gen.get_state(),  # the data position: next random windows
                 "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        return checkpoint.save(run_dir, step, model, optimizer, state, config_dict,
                               {"val_loss": val_loss}, cfg.checkpoint.keep_last)

    def run_eval() -> float:
        val_loss = evaluate(model, val_batches, device)
        bpb = val_loss / math.log(2) / data.bytes_per_token
        metrics.write(kind="val", step=step, val_loss=val_loss, val_bpb=bpb,
                      time_s=round(time.perf_counter() - t_start, 3))
        tqdm.write(f"step {step:>6}: val loss {val_loss:.4f}, {bpb:.3f} bits/byte")
        return val_loss

    t_start = time.perf_counter()
    val_loss = run_eval() if resume is None else resume.manifest["metrics"].get("val_loss")
    model.train()
    interrupted = False
    bar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=not cfg.train.progress, file=sys.stderr)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    t_interval, interval_tokens = time.perf_counter(), 0
    with StopFlag() as stop:
        while step < cfg.train.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(accum):
                x, y = data.train_batch(B, T, data_gen)
                _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                (loss / accum).backward()
                loss_sum += loss.detach()
                loss_count += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.train.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_tokens += tokens_per_step
            bar.update(1)

            last = step == cfg.train.max_steps
            if step % cfg.train.log_interval == 0 or last or stop.requested:
                train_loss = (loss_sum / loss_count).item()
                elapsed = time.perf_counter() - t_interval
                tok_s = interval_tokens / elapsed
                metrics.write(kind="train", step=step, loss=train_loss, lr=lr,
                              grad_norm=grad_norm.item(), tokens_per_s=round(tok_s, 1),
                              time_s=round(time.perf_counter() - t_start, 3))
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                loss_sum.zero_()
                loss_count, interval_tokens = 0, 0
            if step % cfg.eval.interval == 0 or last or stop.requested:
                val_loss = run_eval()
            if last or stop.requested or (cfg.checkpoint.interval
                                          and step % cfg.checkpoint.interval == 0):
                path = save_checkpoint(val_loss)
                if stop.requested:
                    interrupted = True
                    tqdm.write(f"saved {path}; resume with --checkpoint.resume={run_dir}")
                    break
            if step % cfg.train.log_interval == 0:
                t_interval = time.perf_counter()  # tokens/s leaves out eval and saving time
    bar.close()
    wall = time.perf_counter() - t_start
    print(f"fastlm.train: {'stopped' if interrupted else 'done'} at step {step} in {wall:.1f} s"
          + (f", val loss {val_loss:.4f}" if val_loss is not None else ""))

    if cfg.sample.tokens and not interrupted:
        sample = generate_sample(model, data, cfg, device)
        (run_dir / "sample.txt").write_text(sample)
        print(f"--- sample ({cfg.sample.tokens} tokens, temperature {cfg.sample.temperature}) "
              f"---\n{sample}\n---")
    return TrainResult(run_dir, step, val_loss, interrupted)


def generate_sample(model: GPT, data: TextData, cfg: Config, device: torch.device) -> str:
    prompt = data.encode(cfg.sample.prompt) or [0]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T0)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    model.eval()
    out = model.generate(idx, cfg.sample.tokens, cfg.sample.temperature, cfg.sample.top_k, gen)
    return data.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 130 after Ctrl-C)."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else list(argv))
        result = train(cfg)
    except (ConfigError, SetupError) as exc:
        raise SystemExit(f"fastlm.train: error: {exc}") from None
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
