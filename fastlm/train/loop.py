"""The training loop: `python -m fastlm.train [--config FILE.toml] [--data PATH] [--out RUN_DIR]
[--tokenizer byte|FILE] [--resume [PATH]] [--section.key=value ...]` (all keys: `--help`), or
`torchrun --nproc_per_node=N -m fastlm.train ...` for DDP / FSDP2 (fastlm.distributed).

With no arguments it trains the tiny preset on the Python standard library's sources (byte
tokens), on the GPU if there is one, else the CPU, in about 3 minutes on a 2-core CPU. A run
directory (default runs/<timestamp>), written by rank 0 only, receives:

  config.toml     the resolved config; `--config RUN_DIR/config.toml` repeats the run
  tokenizer.json  the run's tokenizer (also copied into every checkpoint)
  metrics.jsonl   one JSON object per line: {"kind": "train", step, loss, lr, grad_norm,
                  tokens_per_s, mfu (GPU; null = unknown), time_s, skipped} every log_interval
                  steps and {"kind": "val", step, val_loss, val_bpb, time_s} at step 0, every
                  eval.interval steps and the end
  loss.png        train/val loss and lr (fastlm.plot; needs matplotlib)
  tensorboard/    the same scalars as TensorBoard event files (fastlm.tensorboard_log; needs the
                  tensorboard package; --train.tensorboard=false turns it off)
  checkpoints/    fastlm.checkpoint directories (at the end, every checkpoint.interval, on
                  Ctrl-C / SIGTERM)
  sample.txt      the text sampled at the end

Ctrl-C or SIGTERM stops at the end of the current step and saves a checkpoint (a second one
aborts at once); `--resume RUN_DIR` continues from the latest checkpoint that verifies, with the
model, optimizer, RNG states and data position, so the loss curve continues bit for bit on CPU.
A step whose loss or gradient norm is NaN/inf is skipped (and counted); train.max_bad_steps in a
row stop the run, keeping the last good checkpoint. Schedules: fastlm.schedule; precision
bf16/fp16 through autocast (fp16 with a gradient scaler); torch.compile and activation
checkpointing by flag; train.max_seconds stops on wall-clock time as if max_steps were reached.

The model is whatever model.arch names (fastlm.models.build); the loop only uses the
LanguageModel interface: make_batch for the objective's inputs/targets, and for recurrent models
contiguous stream batches with the hidden state carried (and checkpointed) between them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_map
from tqdm import tqdm

from fastlm import checkpoint, models, ops
from fastlm.train import distributed
from fastlm.train import logs as tensorboard_log
from fastlm.config import Config, ConfigError, parse_args, to_dict, to_toml
from fastlm.models import LanguageModel
from fastlm.train.optim import build_optimizer
from fastlm.train.schedule import lr_at as schedule_lr
from fastlm.data.corpus import DataError, load_data


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    interrupted: bool
    skipped_steps: int = 0


class SetupError(Exception):
    """Anything wrong before training starts: reported as one line, no traceback."""


class TrainingDiverged(Exception):
    """Too many NaN/inf steps in a row; the message says what to try."""


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
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
    """Learning rate of optimizer step `step` under cfg.optim (fastlm.schedule)."""
    o = cfg.optim
    return schedule_lr(step, lr=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps,
                       total=cfg.train.max_steps, schedule=o.schedule,
                       decay_fraction=o.decay_fraction)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step: train.grad_accum, or what train.tokens_per_step asks."""
    if not cfg.train.tokens_per_step:
        return cfg.train.grad_accum
    per_micro = cfg.train.batch_size * cfg.seq_len * world_size
    accum, rest = divmod(cfg.train.tokens_per_step, per_micro)
    if rest or not accum:
        raise SetupError(f"train.tokens_per_step ({cfg.train.tokens_per_step:,}) must be a "
                         f"multiple of batch_size * seq_len * processes = {per_micro:,}; e.g. "
                         f"{max(1, round(cfg.train.tokens_per_step / per_micro)) * per_micro:,}")
    return accum


def resolve_vocab(cfg: Config, vocab: int) -> None:
    """model.vocab_size follows the tokenizer unless set explicitly (then it must fit)."""
    explicit = "model.vocab_size" in getattr(cfg, "explicit", ())
    if explicit and cfg.model.vocab_size < vocab:
        raise SetupError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                         f"vocabulary ({vocab}); leave it unset to follow the tokenizer")
    if not explicit:
        cfg.model.vocab_size = vocab


def checkpoint_blocks(model: LanguageModel) -> None:
    """Activation checkpointing: each block recomputes its activations in the backward. The
    forward is wrapped per instance, so parameter names and checkpoints do not change."""
    from torch.utils.checkpoint import checkpoint as recompute

    units = model.checkpoint_units()
    if not units:
        raise SetupError(f"train.activation_checkpointing: model.arch={model.config.arch} has "
                         "no repeated blocks to recompute; leave it off")
    for block in units:
        block.forward = functools.partial(recompute, block.forward, use_reentrant=False)


def gpu_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense 16-bit tensor-core peak of this GPU (fastlm.profile's table), the denominator of
    MFU = tokens/s * flops_per_token / peak, where flops_per_token = 6 N + 12 L T C
    (GPT.flops_per_token). None on CPUs and unknown GPUs: MFU is reported as unknown, never
    against a guessed peak. fp32 runs are measured against the bf16 peak (what they forgo)."""
    if device.type != "cuda":
        return None
    from fastlm.tools.profile import peak_flops
    return peak_flops(torch.cuda.get_device_name(device),
                      "float16" if precision == "fp16" else "bfloat16")


def precision_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16; a no-op context for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast,
             dist: distributed.DistInfo | None = None) -> float:
    """Mean loss (nats per token) over the fixed validation batches (each rank holds its rows
    of them; the mean is over ranks too)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast():
            total += model(x.to(device), y.to(device))[1].float()
    model.train(was_training)
    total /= len(batches)
    return distributed.all_reduce_mean(total, dist or distributed.DistInfo()).item()


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (rank 0; others pass None).
    Each write opens and closes the file, so a crash never loses a line or a handle. The same
    rows go to TensorBoard when a fastlm.train.logs.TensorBoardLog is given."""

    def __init__(self, path: Path | None,
                 tensorboard: tensorboard_log.TensorBoardLog | None = None):
        self.path = path
        self.tensorboard = tensorboard

    def write(self, **row) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class StopFlag:
    """The first Ctrl-C or SIGTERM asks the loop to stop at the end of the step (and save);
    the second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this step and saving a "
                   "checkpoint (send it again to abort without saving)")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def rng_state(device: torch.device) -> dict:
    """Every global RNG, in types torch.load(weights_only=True) accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "numpy_rng": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "python_rng" in state:
        random.setstate(state["python_rng"])
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def open_resume(cfg: Config):
    """The checkpoint to resume from (None: start fresh)."""
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    if spec == "latest":  # bare --resume: this run directory's checkpoints, if any
        if not cfg.train.out_dir:
            raise SetupError("--resume without a path needs --out RUN_DIR (whose latest "
                             "checkpoint to continue from)")
        if checkpoint.latest(cfg.train.out_dir) is None:
            print(f"fastlm.train: no checkpoint in {cfg.train.out_dir} yet; starting fresh")
            return None
        spec = cfg.train.out_dir
    try:
        return checkpoint.load(spec, warn=tqdm.write)
    except checkpoint.CheckpointError as exc:
        raise SetupError(f"checkpoint.resume: {exc}") from None


# ---------------------------------------------------------------------------------------------
def train(cfg: Config) -> TrainResult:
    """Run training as configured. Raises SetupError for problems found before the first step."""
    try:
        ops.set_backend(cfg.kernels.backend)
    except ValueError as exc:
        raise SetupError(f"kernels.backend: {exc}") from None
    device = pick_device(cfg.train.device)
    dist = distributed.init_from_env(device.type)
    try:
        return _train(cfg, distributed.device_for(dist, device), dist)
    finally:
        distributed.shutdown(dist)


def _train(cfg: Config, device: torch.device, dist: distributed.DistInfo) -> TrainResult:
    backends = check_backends(device)
    main_rank = dist.is_main
    log = print if main_rank else (lambda *a, **k: None)
    resume = open_resume(cfg)
    try:
        data, tok_spec = load_data(cfg, dist.rank, dist.world_size)
    except DataError as exc:
        raise SetupError(str(exc)) from None
    resolve_vocab(cfg, data.vocab_size)
    if resume is not None:
        saved_model = resume.manifest["config"].get("model", {})
        diff = [k for k, v in to_dict(cfg)["model"].items()
                if k != "preset" and saved_model.get(k, v) != v]
        if diff:
            saved_run = resume.path.parent.parent
            raise SetupError(
                f"checkpoint.resume: {resume.path} was trained with other model settings "
                f"({', '.join(f'model.{k}={saved_model[k]!r}' for k in diff)}); add "
                f"--config {saved_run / 'config.toml'} to reuse that run's settings")
    accum = grad_accum_steps(cfg, dist.world_size)

    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    raw_model = models.build(cfg.model).to(device)
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(raw_model)
    fsdp = dist.enabled and cfg.train.parallel == "fsdp"
    if resume is not None and not fsdp:
        resume.load_model(raw_model)
    model = distributed.wrap(raw_model, dist, cfg.train.parallel, device)
    o = cfg.optim
    optimizer = build_optimizer(raw_model, o.name, o.lr, o.weight_decay, o.betas, o.eps,
                                o.momentum, o.nesterov)
    data_gen = torch.Generator().manual_seed(cfg.train.seed)
    step = 0
    if resume is not None:
        if fsdp:
            distributed.load_full_state(raw_model, optimizer, resume.model_state(),
                                        resume.optimizer_state())
        else:
            resume.load_optimizer(optimizer)
        state = resume.train_state()
        step = state["step"]
        set_rng_state(state, device)
        data_gen.set_state(state["data_rng"])
        data.load_state_dict(state.get("data", {}))
        if state.get("tokenizer") not in (None, tok_spec.tok.hash()):
            raise SetupError(f"checkpoint.resume: {resume.path} was trained with another "
                             f"tokenizer ({state['tokenizer']}); data.tokenizer="
                             f"{cfg.data.tokenizer} is {tok_spec.tok.hash()}")
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto"
                                                 and device.type == "cuda")
    if compile_on:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    autocast = functools.partial(precision_context, cfg.train.precision, device)

    run_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else (
        resume.path.parent.parent if resume is not None else default_run_dir())
    cfg.train.out_dir = str(run_dir)
    config_dict = to_dict(cfg)
    tok_file = run_dir / "tokenizer.json"
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        tok_spec.tok.save(tok_file)
    tb_log, tb_where = (tensorboard_log.open_log(run_dir, cfg.train.tensorboard) if main_rank
                        else (None, ""))
    metrics = MetricsLog(run_dir / "metrics.jsonl" if main_rank else None, tb_log)

    T, B = cfg.seq_len, cfg.train.batch_size
    tokens_per_step = B * T * accum * dist.world_size
    peak = gpu_peak_flops(device, cfg.train.precision)  # per GPU; None: MFU unknown
    flops_per_token = raw_model.flops_per_token(T)
    # Fixed for the whole run (a masked objective draws its masks once, from the seed), so every
    # evaluation scores the same tokens.
    val_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    val_batches = [raw_model.make_batch(x, y, val_gen)
                   for x, y in data.val_batches(cfg.eval.batches, B, T)]
    recurrent = raw_model.recurrent
    if recurrent and not hasattr(data, "stream_batch"):
        raise SetupError(f"model.arch={cfg.model.arch} trains on contiguous streams, which this "
                         f"data source ({data.description}) does not provide")
    log(f"fastlm.train: run directory {run_dir}")
    log(f"  data    {data.description}")
    log(f"  tokens  {tok_spec.name}, vocab {data.vocab_size}, "
        f"{data.bytes_per_token:.3f} bytes/token (val)")
    log(f"  model   {cfg.model.preset or 'custom'} ({cfg.model.arch}), "
        f"{raw_model.num_params() / 1e6:.2f}M parameters, context {T}")
    log(f"  device  {device}, ops: " + ", ".join(f"{k}={v}" for k, v in backends.items()))
    log(f"  train   {o.name}, {o.schedule} lr {o.lr:g}, {cfg.train.precision}"
        + (", compiled" if compile_on else "")
        + (", activation checkpointing" if cfg.train.activation_checkpointing else "")
        + (f", {cfg.train.parallel} x {dist.world_size} processes" if dist.enabled else ""))
    log(f"  tboard  {tb_where}")
    log(f"  steps   {step} -> {cfg.train.max_steps}, {tokens_per_step:,} tokens/step "
        f"({B} x {T} x {accum}" + (f" x {dist.world_size})" if dist.enabled else ")"),
        flush=True)

    cpu_copy: list[LanguageModel] = []  # FSDP: rank 0's unsharded model for writing checkpoints

    def save_checkpoint(val_loss: float | None) -> Path | None:
        model_sd, optim_sd = distributed.full_state(raw_model, optimizer, fsdp)  # collective
        path = None
        if main_rank:
            if fsdp:  # the gathered weights into a plain CPU model: the same file as DDP writes
                if not cpu_copy:
                    cpu_copy.append(models.build(cfg.model))
                cpu_copy[0].load_state_dict(model_sd)
            state = {"step": step, "data_rng": data_gen.get_state(),  # next random windows
                     **({"carry": carry} if recurrent else {}),  # TBPTT hidden state
                     "data": data.state_dict(), "tokenizer": tok_spec.tok.hash(),
                     "skipped_steps": skipped_total, **rng_state(device)}
            path = checkpoint.save(run_dir, step, cpu_copy[0] if fsdp else raw_model, optim_sd,
                                   state, config_dict, {"val_loss": val_loss},
                                   cfg.checkpoint.keep_last, {"tokenizer.json": tok_file})
        distributed.barrier(dist)
        return path

    def run_eval() -> float:
        val_loss = evaluate(model, val_batches, device, autocast, dist)
        # Bits per byte only mean something for next-token prediction: a masked objective
        # scores 15% of the tokens, each seeing both sides.
        bpb = (val_loss / math.log(2) / data.bytes_per_token
               if raw_model.objective == "causal" else None)
        metrics.write(kind="val", step=step, val_loss=val_loss, val_bpb=bpb,
                      time_s=round(time.perf_counter() - t_start, 3))
        if main_rank:
            tqdm.write(f"step {step:>6}: val loss {val_loss:.4f}, "
                       + (f"{bpb:.3f} bits/byte" if bpb is not None
                          else f"{raw_model.objective} objective"))
        return val_loss

    def out_of_time() -> bool:
        """train.max_seconds has passed (any rank's clock: all ranks stop at the same step)."""
        if not cfg.train.max_seconds:
            return False
        over = time.perf_counter() - t_start >= cfg.train.max_seconds
        if not dist.enabled:  # one process: no collective, no device round trip per step
            return over
        flag = torch.tensor(float(over), device=device)
        return distributed.all_reduce_mean(flag, dist).item() > 0

    t_start = time.perf_counter()
    val_loss = run_eval() if resume is None else resume.manifest["metrics"].get("val_loss")
    model.train()
    interrupted, diverged = False, None
    skipped_total, bad_in_row = (state.get("skipped_steps", 0) if resume is not None else 0), 0
    bar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=not (cfg.train.progress and main_rank), file=sys.stderr)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    carry = None  # recurrent models: the hidden state carried from one batch to the next
    if recurrent and resume is not None and state.get("carry") is not None:
        carry = tree_map(lambda t: t.to(device), state["carry"])
    t_interval, interval_tokens = time.perf_counter(), 0
    with StopFlag() as stop:
        while step < cfg.train.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                if recurrent:  # each row continues its own stream where the last batch ended
                    x, y = data.stream_batch(B, T)
                else:
                    x, y = data.train_batch(B, T, data_gen)
                x, y = raw_model.make_batch(x, y, data_gen)  # the model's objective
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == accum - 1 or not dist.enabled or fsdp
                with (model.no_sync() if not sync and hasattr(model, "no_sync")
                      else contextlib.nullcontext()):
                    with autocast():
                        if recurrent:  # truncated BPTT: the state carries, its graph does not
                            _, loss, carry = model(x, y, state=carry, return_state=True)
                            carry = tree_map(torch.Tensor.detach, carry)
                        else:
                            _, loss = model(x, y)
                    scaler.scale(loss / accum).backward()
                step_loss += loss.detach().float() / accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.train.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of the global norm
                grad_norm = grad_norm.full_tensor()
            distributed.all_reduce_mean(step_loss, dist)
            if scaler.is_enabled():
                # fp16: inf gradients are how the scaler finds its scale (it skips those steps
                # and halves the scale), so only a non-finite loss counts as a bad step here.
                finite = bool(torch.isfinite(step_loss))
            else:
                finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
            if finite or scaler.is_enabled():
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                skipped_total += 1
                bad_in_row += 1
                if main_rank:
                    tqdm.write(f"step {step + 1}: loss {step_loss.item():.4g}, grad norm "
                               f"{grad_norm.item():.4g}: not finite, update skipped "
                               f"({bad_in_row} in a row)")
                if bad_in_row >= cfg.train.max_bad_steps:
                    diverged = (f"{bad_in_row} steps in a row had a NaN/inf loss or gradient; "
                                "stopping (the last good checkpoint is kept). Try a lower "
                                "--optim.lr, more --optim.warmup_steps, --train.grad_clip=1 or "
                                "--train.precision=bf16 instead of fp16")
                    break
            else:
                bad_in_row = 0
                loss_sum += step_loss
                loss_count += 1
            step += 1
            interval_tokens += tokens_per_step
            bar.update(1)

            last = step == cfg.train.max_steps or out_of_time()
            if (step % cfg.train.log_interval == 0 or last or stop.requested) and loss_count:
                train_loss = (loss_sum / loss_count).item()
                elapsed = time.perf_counter() - t_interval
                tok_s = interval_tokens / elapsed
                mfu = (tok_s * flops_per_token / (peak * dist.world_size)) if peak else None
                metrics.write(kind="train", step=step, loss=train_loss, lr=lr,
                              grad_norm=grad_norm.item(), tokens_per_s=round(tok_s, 1),
                              mfu=None if mfu is None else round(mfu, 4),
                              time_s=round(time.perf_counter() - t_start, 3),
                              skipped=skipped_total)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                                gnorm=f"{grad_norm.item():.2f}", tok_s=f"{tok_s:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}),
                                refresh=False)
                loss_sum.zero_()
                loss_count, interval_tokens = 0, 0
            if step % cfg.eval.interval == 0 or last or stop.requested:
                val_loss = run_eval()
            if last or stop.requested or (cfg.checkpoint.interval
                                          and step % cfg.checkpoint.interval == 0):
                path = save_checkpoint(val_loss)
                if stop.requested:
                    interrupted = True
                    if main_rank:
                        tqdm.write(f"saved {path}; resume with --resume {run_dir}")
                    break
            if step % cfg.train.log_interval == 0:
                t_interval = time.perf_counter()  # tokens/s leaves out eval and saving time
            if last:
                break
    bar.close()
    data.close()
    metrics.close()
    wall = time.perf_counter() - t_start
    if diverged:
        raise TrainingDiverged(diverged)
    log(f"fastlm.train: {'stopped' if interrupted else 'done'} at step {step} in {wall:.1f} s"
        + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
        + (f", {skipped_total} steps skipped (NaN/inf)" if skipped_total else ""))
    if main_rank:
        _write_plot(run_dir)

    if (cfg.sample.tokens and not interrupted and main_rank and not fsdp
            and raw_model.objective == "causal"):
        sample = generate_sample(raw_model, data, cfg, device)
        (run_dir / "sample.txt").write_text(sample)
        print(f"--- sample ({cfg.sample.tokens} tokens, temperature {cfg.sample.temperature}) "
              f"---\n{sample}\n---")
    return TrainResult(run_dir, step, val_loss, interrupted, skipped_total)


def _write_plot(run_dir: Path) -> None:
    from fastlm.train import plot
    try:
        path = plot.plot_run(run_dir)
        print(f"  plot    {path}")
    except plot.PlotUnavailable as exc:
        print(f"  plot    skipped: {exc}")


def generate_sample(model: LanguageModel, data, cfg: Config, device: torch.device) -> str:
    prompt = data.encode(cfg.sample.prompt) or [0]
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T0)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    model.eval()
    out = model.generate(idx, cfg.sample.tokens, cfg.sample.temperature, cfg.sample.top_k, gen)
    return data.decode(out[0].tolist())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 130 after Ctrl-C/SIGTERM, 3 when
    training diverged)."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else list(argv))
        result = train(cfg)
    except (ConfigError, SetupError) as exc:
        raise SystemExit(f"fastlm.train: error: {exc}") from None
    except TrainingDiverged as exc:
        print(f"fastlm.train: {exc}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError as exc:
        raise SystemExit(f"fastlm.train: error: out of memory ({exc}). Try a smaller "
                         "--train.batch_size (keep the tokens per step with --train.grad_accum "
                         "or --train.tokens_per_step), --train.activation_checkpointing=true, "
                         "--train.precision=bf16 or --train.parallel=fsdp") from None
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
