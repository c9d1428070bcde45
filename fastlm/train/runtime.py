"""What every training command (fastlm.train, fastlm.finetune) needs around its loop: the device,
the setup error it reports as one line, the learning rate of a step under the config, the
micro-batches per step, and Ctrl-C / SIGTERM handling."""
from __future__ import annotations

import signal
import threading

import torch
from tqdm import tqdm

from fastlm.config import Config
from fastlm.train.schedule import lr_at as schedule_lr


class SetupError(Exception):
    """Anything wrong before training starts: reported as one line, no traceback."""


def pick_device(name: str) -> torch.device:
    """train.device: auto (the GPU if there is one, else the CPU) or a torch device name that
    must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"train.device={name} but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --train.device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError(f"train.device={name} but MPS is not available here")
    return device


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of optimizer step `step` under cfg.optim (fastlm.train.schedule)."""
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
