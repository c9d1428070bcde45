"""The training loop: `python -m fastlm.train [--config FILE.toml] [--data PATH] [--out RUN_DIR]
[--tokenizer byte|FILE] [--resume [PATH]] [--section.key=value ...]` (all keys: `--help`), or
`torchrun --nproc_per_node=N -m fastlm.train ...` for DDP / FSDP2 (fastlm.train.distributed).

With no arguments it trains the tiny preset on the Python standard library's sources (byte
tokens), on the GPU if there is one, else the CPU, in about 3 minutes on a 2-core CPU. A run
directory (default runs/<timestamp>), written by rank 0 only, receives:

  config.toml     the resolved config; `--config RUN_DIR/config.toml` repeats the run
  tokenizer.json  the run's tokenizer (also copied into every checkpoint)
  metrics.jsonl   one JSON object per line: {"kind": "train", step, loss, lr, grad_norm,
                  tokens_per_s, mfu (GPU; null = unknown), time_s, skipped} every log_interval
                  steps and {"kind": "val", step, val_loss, val_bpb, time_s} at step 0, every
                  eval.interval steps and the end
  loss.png        train/val loss and lr (fastlm.train.plot; needs matplotlib)
  tensorboard/    the same scalars as TensorBoard event files (fastlm.train.logs; needs the
                  tensorboard package; --train.tensorboard=false turns it off)
  checkpoints/    fastlm.checkpoint directories (at the end, every checkpoint.interval, on
                  Ctrl-C / SIGTERM)
  sample.txt      the text sampled at the end

A run directory holds one run: an --out that holds another is refused unless --resume continues
it or --overwrite starts again there (deleting its run files). Checkpoints must be writable
before the first step; a save that fails later (disk full) warns and training goes on, the next
save retrying, and if the last one fails the command ends naming the last good checkpoint.

Ctrl-C or SIGTERM stops at the end of the current step and saves a checkpoint (a second one
aborts at once); `--resume RUN_DIR` continues from the latest checkpoint that verifies, with the
model, optimizer, RNG states and data position, so the loss curve continues bit for bit on CPU.
A step whose loss or gradient norm is NaN/inf is skipped (and counted); train.max_bad_steps in a
row stop the run, keeping the last good checkpoint. Each optimizer step (gradient accumulation,
bf16/fp16 autocast, the fp16 gradient scaler, clipping, skipping) is fastlm.train.step's, the
one every trainer runs; schedules: fastlm.train.schedule; torch.compile and activation
checkpointing by flag; train.max_seconds stops on wall-clock time as if max_steps were reached.

The model is whatever model.arch names (fastlm.models.build); the loop only uses the
LanguageModel interface: make_batch for the objective's inputs/targets, and for recurrent models
contiguous stream batches with the hidden state carried (and checkpointed) between them.
"""
from __future__ import annotations

import functools
import math
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_map
from tqdm import tqdm

from fastlm import checkpoint, models, ops
from fastlm import run_dir as run_dirs
from fastlm.command import run_command
from fastlm.config import Config, ConfigError, parse_args, to_dict, to_toml
from fastlm.data.corpus import DataError, load_data
from fastlm.models import LanguageModel
from fastlm.train import distributed, logs
from fastlm.train.flops import gpu_peak_flops
from fastlm.train.optim import build_optimizer
from fastlm.train.runtime import SetupError, StopFlag, grad_accum_steps, lr_at, pick_device
from fastlm.train.step import TrainStep


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    interrupted: bool
    skipped_steps: int = 0


class TrainingDiverged(Exception):
    """Too many NaN/inf steps in a row; the message says what to try."""


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
def check_backends(device: torch.device) -> dict[str, str]:
    """The backend each op will use on device; a forced but unavailable one fails now."""
    try:
        return {op: ops.select_backend(op, device) for op in ops.IMPLEMENTED}
    except (ops.BackendUnavailableError, ValueError) as exc:
        raise SetupError(str(exc)) from None


def resolve_vocab(cfg: Config, vocab: int) -> None:
    """model.vocab_size follows the tokenizer unless set explicitly (then it must fit)."""
    explicit = "model.vocab_size" in cfg.explicit
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
        return Trainer(cfg, distributed.device_for(dist, device), dist).run()
    finally:
        distributed.shutdown(dist)


class Trainer:
    """One run: the constructor sets everything up from the config (data, model, optimizer,
    resumed state, run directory) and prints the header; run() trains to the end.

    What a checkpoint saves besides the model and optimizer lives here as attributes: step
    (optimizer steps done), skipped (NaN/inf steps so far) and carry (a recurrent model's
    hidden state between batches)."""

    def __init__(self, cfg: Config, device: torch.device, dist: distributed.DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.backends = check_backends(device)
        self.resume = open_resume(cfg)
        self._open_data()
        self.accum = grad_accum_steps(cfg, dist.world_size)
        self._build_model()
        self.step, self.skipped, self.carry = 0, 0, None
        self.data_gen = torch.Generator().manual_seed(cfg.train.seed)
        if self.resume is not None:
            self._restore()
        self.compiled = cfg.train.compile == "true" or (cfg.train.compile == "auto"
                                                        and device.type == "cuda")
        if self.compiled:
            self.model = torch.compile(self.model)
        self.asked_precision, kept = cfg.train.precision, self._resumed_precision()
        self.train_step = TrainStep(self.model, self.optimizer, device=device,
                                    precision=kept or cfg.train.precision,
                                    grad_clip=cfg.train.grad_clip, accum=self.accum, dist=dist)
        self.precision_reason = ("auto: kept from the resumed checkpoint" if kept
                                 else self.train_step.precision_reason)
        # the run records the choice (config.toml, checkpoints): repeating or resuming it keeps it
        cfg.train.precision = self.train_step.precision
        self._open_run_dir()

        T, B = cfg.seq_len, cfg.train.batch_size
        self.tokens_per_step = B * T * self.accum * dist.world_size
        self.peak = gpu_peak_flops(device, cfg.train.precision)  # per GPU; None: MFU unknown
        self.flops_per_token = self.raw_model.flops_per_token(T)
        # Fixed for the whole run (a masked objective draws its masks once, from the seed), so
        # every evaluation scores the same tokens.
        val_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        self.val_batches = [self.raw_model.make_batch(x, y, val_gen)
                            for x, y in self.data.val_batches(cfg.eval.batches, B, T)]
        self.recurrent = self.raw_model.recurrent
        if self.recurrent and not hasattr(self.data, "stream_batch"):
            raise SetupError(f"model.arch={cfg.model.arch} trains on contiguous streams, which "
                             f"this data source ({self.data.description}) does not provide")
        self._print_header()
        self.cpu_copy: LanguageModel | None = None  # FSDP: rank 0's unsharded model for saving
        self.unsaved: checkpoint.SaveError | None = None  # why the newest save failed, if it did
        self.t_start = 0.0  # run() starts the clock

    # -- setup, in this order --------------------------------------------------------------------
    def _say(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            print(*args, **kwargs)

    def _open_data(self) -> None:
        cfg, resume = self.cfg, self.resume
        try:
            self.data, self.tok_spec = load_data(cfg, self.dist.rank, self.dist.world_size)
        except DataError as exc:
            raise SetupError(str(exc)) from None
        resolve_vocab(cfg, self.data.vocab_size)
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

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.raw_model = models.build(cfg.model).to(self.device)
        if cfg.train.activation_checkpointing:
            checkpoint_blocks(self.raw_model)
        self.fsdp = self.dist.enabled and cfg.train.parallel == "fsdp"
        if self.resume is not None and not self.fsdp:
            self.resume.load_model(self.raw_model)
        self.model = distributed.wrap(self.raw_model, self.dist, cfg.train.parallel, self.device)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim)

    def _restore(self) -> None:
        """The resumed checkpoint's optimizer, step, RNG states, data position and carry."""
        resume, tok = self.resume, self.tok_spec.tok
        if self.fsdp:
            distributed.load_full_state(self.raw_model, self.optimizer, resume.model_state(),
                                        resume.optimizer_state())
        else:
            resume.load_optimizer(self.optimizer)
        state = resume.train_state()
        self.step = state["step"]
        self.skipped = state.get("skipped_steps", 0)
        set_rng_state(state, self.device)
        self.data_gen.set_state(state["data_rng"])
        self.data.load_state_dict(state.get("data", {}))
        if state.get("tokenizer") not in (None, tok.hash()):
            raise SetupError(f"checkpoint.resume: {resume.path} was trained with another "
                             f"tokenizer ({state['tokenizer']}); data.tokenizer="
                             f"{self.cfg.data.tokenizer} is {tok.hash()}")
        if self.raw_model.recurrent and state.get("carry") is not None:
            self.carry = tree_map(lambda t: t.to(self.device), state["carry"])

    def _resumed_precision(self) -> str | None:
        """train.precision=auto on a resumed run: the checkpoint's precision, so a run keeps its
        arithmetic when resumed (on other hardware too); None: resolve as asked."""
        if self.cfg.train.precision != "auto" or self.resume is None:
            return None
        saved = self.resume.manifest["config"].get("train", {}).get("precision")
        return saved if saved in ("fp32", "bf16", "fp16") else None

    def _open_run_dir(self) -> None:
        cfg, resume, main_rank = self.cfg, self.resume, self.dist.is_main
        self.run_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else (
            resume.path.parent.parent if resume is not None else default_run_dir())
        # continuing: this directory's own run (--resume from its checkpoint, or a bare
        # --resume that found none there yet)
        continuing = (cfg.checkpoint.resume == "latest" or resume is not None and
                      resume.path.parent.parent.resolve() == self.run_dir.resolve())
        overwrite = cfg.checkpoint.overwrite
        if continuing and overwrite:
            raise SetupError(f"--overwrite would delete the checkpoints --resume continues "
                             f"from in {self.run_dir}; give one of them")
        cfg.train.out_dir = str(self.run_dir)
        cfg.checkpoint.overwrite = False  # consumed: repeating the config must not delete again
        self.config_dict = to_dict(cfg)
        self.tok_file = self.run_dir / "tokenizer.json"
        if main_rank:
            try:
                run_dirs.claim(self.run_dir, continuing=continuing,
                              overwrite=overwrite)
                run_dirs.check_writable(self.run_dir)
            except run_dirs.RunDirError as exc:
                raise SetupError(str(exc)) from None
            if continuing:  # the steps after the checkpoint are trained (and logged) again
                logs.trim(self.run_dir / "metrics.jsonl",
                          self.step if resume is not None else None)
            (self.run_dir / "config.toml").write_text(
                f"# train.precision: asked {self.asked_precision}, chose {cfg.train.precision} "
                f"({self.precision_reason})\n" + to_toml(cfg))
            self.tok_spec.tok.save(self.tok_file)
        tb_log, self.tb_where = (logs.open_log(self.run_dir, cfg.train.tensorboard) if main_rank
                                 else (None, ""))
        self.metrics = logs.MetricsLog(self.run_dir / "metrics.jsonl" if main_rank else None,
                                       tb_log)

    def _print_header(self) -> None:
        cfg, dist, data, o = self.cfg, self.dist, self.data, self.cfg.optim
        T, B = cfg.seq_len, cfg.train.batch_size
        self._say(f"fastlm.train: run directory {self.run_dir}")
        self._say(f"  data    {data.description}")
        self._say(f"  tokens  {self.tok_spec.name}, vocab {data.vocab_size}, "
                  f"{data.bytes_per_token:.3f} bytes/token (val)")
        self._say(f"  model   {cfg.model.preset or 'custom'} ({cfg.model.arch}), "
                  f"{self.raw_model.num_params() / 1e6:.2f}M parameters, context {T}")
        self._say(f"  device  {self.device}, ops: "
                  + ", ".join(f"{k}={v}" for k, v in self.backends.items()))
        self._say(f"  train   {o.name}, {o.schedule} lr {o.lr:g}, {cfg.train.precision} "
                  f"({self.precision_reason})"
                  + (", compiled" if self.compiled else "")
                  + (", activation checkpointing" if cfg.train.activation_checkpointing else "")
                  + (f", {cfg.train.parallel} x {dist.world_size} processes"
                     if dist.enabled else ""))
        self._say(f"  tboard  {self.tb_where}")
        self._say(f"  steps   {self.step} -> {cfg.train.max_steps}, {self.tokens_per_step:,} "
                  f"tokens/step ({B} x {T} x {self.accum}"
                  + (f" x {dist.world_size})" if dist.enabled else ")"), flush=True)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, main_rank = self.cfg, self.dist.is_main
        self.t_start = time.perf_counter()
        val_loss = (self.run_eval() if self.resume is None
                    else self.resume.manifest["metrics"].get("val_loss"))
        self.model.train()
        interrupted, diverged, bad_in_row = False, None, 0
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not (cfg.train.progress and main_rank),
                   file=sys.stderr)
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        t_interval, interval_tokens = time.perf_counter(), 0
        with StopFlag() as stop:
            while self.step < cfg.train.max_steps:
                lr = lr_at(self.step, cfg)
                result = self.train_step(self.micro_loss, lr)
                if not result.finite:
                    self.skipped += 1
                    bad_in_row += 1
                    if main_rank:
                        tqdm.write(f"step {self.step + 1}: loss {result.loss.item():.4g}, grad "
                                   f"norm {result.grad_norm.item():.4g}: not finite, update "
                                   f"skipped ({bad_in_row} in a row)")
                    if bad_in_row >= cfg.train.max_bad_steps:
                        diverged = (f"{bad_in_row} steps in a row had a NaN/inf loss or "
                                    "gradient; stopping (the last good checkpoint is kept). Try "
                                    "a lower --optim.lr, more --optim.warmup_steps, "
                                    "--train.grad_clip=1 or --train.precision=bf16 instead of "
                                    "fp16")
                        break
                else:
                    bad_in_row = 0
                    loss_sum += result.loss
                    loss_count += 1
                self.step += 1
                interval_tokens += self.tokens_per_step
                bar.update(1)

                last = self.step == cfg.train.max_steps or self.out_of_time()
                if ((self.step % cfg.train.log_interval == 0 or last or stop.requested)
                        and loss_count):
                    train_loss = (loss_sum / loss_count).item()  # waits for the device
                    tok_s = interval_tokens / (time.perf_counter() - t_interval)
                    self.log_train(train_loss, lr, result.grad_norm, tok_s, bar)
                    loss_sum.zero_()
                    loss_count, interval_tokens = 0, 0
                if self.step % cfg.eval.interval == 0 or last or stop.requested:
                    val_loss = self.run_eval()
                if last or stop.requested or (cfg.checkpoint.interval
                                              and self.step % cfg.checkpoint.interval == 0):
                    path = self.save_checkpoint(val_loss)
                    if stop.requested:
                        interrupted = True
                        if path is not None:
                            tqdm.write(f"saved {path}; resume with --resume {self.run_dir}")
                        break
                if self.step % cfg.train.log_interval == 0:
                    t_interval = time.perf_counter()  # tokens/s leaves out eval and saving time
                if last:
                    break
        bar.close()
        self.data.close()
        self.metrics.close()
        if diverged:
            raise TrainingDiverged(diverged)
        if self.unsaved is not None:  # the last save failed: say so, and what is left
            good = checkpoint.latest(self.run_dir)
            raise checkpoint.SaveError(f"{self.unsaved}. The last good checkpoint is "
                                       f"{good or 'none'}: steps after it are lost")
        self.finish(val_loss, interrupted)
        return TrainResult(self.run_dir, self.step, val_loss, interrupted, self.skipped)

    def micro_loss(self, micro: int) -> torch.Tensor:
        """The next micro-batch's loss (TrainStep calls it under autocast)."""
        B, T, device = self.cfg.train.batch_size, self.cfg.seq_len, self.device
        if self.recurrent:  # each row continues its own stream where the last batch ended
            x, y = self.data.stream_batch(B, T)
        else:
            x, y = self.data.train_batch(B, T, self.data_gen)
        x, y = self.raw_model.make_batch(x, y, self.data_gen)  # the model's objective
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if not self.recurrent:
            return self.model(x, y)[1]
        # truncated BPTT: the state carries, its graph does not
        _, loss, carry = self.model(x, y, state=self.carry, return_state=True)
        self.carry = tree_map(torch.Tensor.detach, carry)
        return loss

    def log_train(self, train_loss: float, lr: float, grad_norm: torch.Tensor, tok_s: float,
                  bar: tqdm) -> None:
        """A metrics row and the progress bar's numbers for the steps since the last one."""
        mfu = ((tok_s * self.flops_per_token / (self.peak * self.dist.world_size))
               if self.peak else None)
        self.metrics.write(kind="train", step=self.step, loss=train_loss, lr=lr,
                           grad_norm=grad_norm.item(), tokens_per_s=round(tok_s, 1),
                           mfu=None if mfu is None else round(mfu, 4),
                           time_s=round(time.perf_counter() - self.t_start, 3),
                           skipped=self.skipped)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                        gnorm=f"{grad_norm.item():.2f}", tok_s=f"{tok_s:,.0f}",
                        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}), refresh=False)

    def run_eval(self) -> float:
        """Validation loss now (written to the metrics and shown)."""
        raw, step = self.raw_model, self.step
        val_loss = evaluate(self.model, self.val_batches, self.device, self.train_step.autocast,
                            self.dist)
        # Bits per byte only mean something for next-token prediction: a masked objective
        # scores 15% of the tokens, each seeing both sides.
        bpb = (val_loss / math.log(2) / self.data.bytes_per_token
               if raw.objective == "causal" else None)
        self.metrics.write(kind="val", step=step, val_loss=val_loss, val_bpb=bpb,
                           time_s=round(time.perf_counter() - self.t_start, 3))
        if self.dist.is_main:
            tqdm.write(f"step {step:>6}: val loss {val_loss:.4f}, "
                       + (f"{bpb:.3f} bits/byte" if bpb is not None
                          else f"{raw.objective} objective"))
        return val_loss

    def save_checkpoint(self, val_loss: float | None) -> Path | None:
        """A checkpoint of the run as it stands (a collective: every rank calls it)."""
        model_sd, optim_sd = distributed.full_state(self.raw_model, self.optimizer,
                                                    self.fsdp)
        path = None
        if self.dist.is_main:
            model = self.raw_model
            if self.fsdp:  # the gathered weights into a plain CPU model: the file DDP writes
                if self.cpu_copy is None:
                    self.cpu_copy = models.build(self.cfg.model)
                self.cpu_copy.load_state_dict(model_sd)
                model = self.cpu_copy
            state = {"step": self.step, "data_rng": self.data_gen.get_state(),  # next windows
                     **({"carry": self.carry} if self.recurrent else {}),  # TBPTT hidden state
                     "data": self.data.state_dict(), "tokenizer": self.tok_spec.tok.hash(),
                     "skipped_steps": self.skipped, **rng_state(self.device)}
            try:
                path = checkpoint.save(self.run_dir, self.step, model, optim_sd, state,
                                       self.config_dict, {"val_loss": val_loss},
                                       self.cfg.checkpoint.keep_last,
                                       {"tokenizer.json": self.tok_file})
                self.unsaved = None
            except checkpoint.SaveError as exc:  # training state is intact: go on, retry later
                self.unsaved = exc
                tqdm.write(f"fastlm.train: warning: {exc}; training goes on and the next "
                           "save tries again")
        distributed.barrier(self.dist)
        return path

    def out_of_time(self) -> bool:
        """train.max_seconds has passed (any rank's clock: all ranks stop at the same step)."""
        if not self.cfg.train.max_seconds:
            return False
        over = time.perf_counter() - self.t_start >= self.cfg.train.max_seconds
        if not self.dist.enabled:  # one process: no collective, no device round trip per step
            return over
        flag = torch.tensor(float(over), device=self.device)
        return distributed.all_reduce_mean(flag, self.dist).item() > 0

    def finish(self, val_loss: float | None, interrupted: bool) -> None:
        """The closing line, the loss plot and (a finished causal run) the text sample."""
        cfg, main_rank = self.cfg, self.dist.is_main
        wall = time.perf_counter() - self.t_start
        self._say(f"fastlm.train: {'stopped' if interrupted else 'done'} at step {self.step} in "
                  f"{wall:.1f} s" + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                  + (f", {self.skipped} steps skipped (NaN/inf)" if self.skipped else ""))
        if main_rank:
            _write_plot(self.run_dir)
        if (cfg.sample.tokens and not interrupted and main_rank and not self.fsdp
                and self.raw_model.objective == "causal"):
            sample = generate_sample(self.raw_model, self.data, cfg, self.device)
            (self.run_dir / "sample.txt").write_text(sample)
            print(f"--- sample ({cfg.sample.tokens} tokens, temperature "
                  f"{cfg.sample.temperature}) ---\n{sample}\n---")


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
    except (ConfigError, SetupError, checkpoint.SaveError) as exc:
        raise SystemExit(f"fastlm.train: error: {exc}") from None
    except TrainingDiverged as exc:
        print(f"fastlm.train: {exc}", file=sys.stderr)
        return 3
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        # the CPU allocator's failure is a plain RuntimeError naming it
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) \
                and "DefaultCPUAllocator" not in str(exc):
            raise
        raise SystemExit(f"fastlm.train: error: out of memory ({str(exc).strip()[:200]}). Try "
                         "a smaller --train.batch_size (keep the tokens per step with --train.grad_accum "
                         "or --train.tokens_per_step), --train.activation_checkpointing=true, "
                         "--train.precision=bf16 or --train.parallel=fsdp") from None
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
