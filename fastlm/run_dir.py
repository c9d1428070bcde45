"""A run directory belongs to one run (fastlm.train, fastlm.finetune, fastlm.export --from-hf).

Writing a second run into a directory that holds one mixed their metrics, replaced config.toml
and let checkpoint pruning (which keeps the highest steps) delete one run's checkpoints for the
other's. So claim() refuses a directory that holds a run's files unless the caller continues
that run (--resume) or starts it again (--overwrite: the run's own files are removed first,
anything else in the directory is left alone). check_writable() then writes a probe into
checkpoints/, so a directory that cannot take a checkpoint fails before training, not after.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# what fastlm writes into a run directory; nothing else is ever removed by --overwrite
ARTIFACTS = ("checkpoints", "metrics.jsonl", "config.toml", "tokenizer.json", "loss.png",
             "tensorboard", "sample.txt", "finetune.json")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message names it and the way out."""


def existing_run(run_dir: Path) -> list[str]:
    """The run files run_dir already holds (empty: nobody's run)."""
    return [name for name in ARTIFACTS if (Path(run_dir) / name).exists()]


def claim(run_dir: str | Path, *, continuing: bool = False, overwrite: bool = False,
          resume_hint: bool = True) -> Path:
    """Make run_dir this run's: refuse another run's directory unless continuing (it is this
    run's own) or overwrite (its run files are removed). Returns run_dir, created."""
    run_dir = Path(run_dir)
    found = existing_run(run_dir)
    if found and not continuing:
        if not overwrite:
            ways = "--resume to continue it, " if resume_hint else ""
            raise RunDirError(f"{run_dir} already holds a run ({', '.join(found)}); add {ways}"
                              "--overwrite to start again there (its run files are deleted), "
                              "or choose another --out")
        for name in found:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot create the run directory "
                          f"({exc.strerror or exc})") from None
    return run_dir


def check_writable(run_dir: str | Path) -> None:
    """Write and remove a probe file where checkpoints go; RunDirError naming the place if not."""
    root = Path(run_dir) / "checkpoints"
    probe = root / f".probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise RunDirError(f"{exc.filename or root}: cannot write checkpoints there "
                          f"({exc.strerror or exc}); fix its permissions or free space, or "
                          "choose another --out") from None
