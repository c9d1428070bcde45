"""Checkpoints: one directory per step under RUN_DIR/checkpoints/, written atomically.

    step_000600/
      model.safetensors   model weights (safetensors; a tied weight is stored once)
      optimizer.pt        optimizer state dict (torch.save; loaded with weights_only=True)
      train_state.pt      step, RNG states, anything else the loop needs to resume (same)
      manifest.json       format, step, resolved config, metrics, sha256 and size of each file

A checkpoint is written into a hidden temporary directory next to its final place and renamed
when every file is complete, so a crash never leaves a half-written step_* directory; the
temporary directories of a save that was killed are removed by the next save, and a save that
fails (a full disk, no permission) removes its own and raises SaveError naming the place, the
checkpoints already there untouched. Loading verifies the manifest's shape and every checksum
first and names the file that does not match. After saving, only the last `keep_last`
checkpoints and the best one (lowest val_loss in its manifest) are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

FORMAT = "fastlm-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)")
_SAVE_TEMP = re.compile(r"\.(tmp|old)-(step_\d+)-(\d+)")  # a save's work dirs (kind, final, pid)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


class SaveError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission); the message names where."""


@dataclass
class Checkpoint:
    """A verified checkpoint on disk: its directory and parsed manifest."""
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return self.manifest["step"]

    def load_model(self, model: nn.Module) -> None:
        missing, unexpected = load_model(model, str(self.path / "model.safetensors"),
                                         strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{self.path / 'model.safetensors'} does not fit the model: "
                                  f"missing {sorted(missing)}, unexpected {sorted(unexpected)} "
                                  "(was it saved with another model config?)")

    def model_state(self) -> dict[str, torch.Tensor]:
        """The saved weights as a state dict on CPU (each tied tensor once)."""
        from safetensors.torch import load_file
        return load_file(str(self.path / "model.safetensors"))

    def optimizer_state(self) -> dict[str, Any]:
        return self._torch_load("optimizer.pt")

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.load_state_dict(self._torch_load("optimizer.pt"))

    def train_state(self) -> dict[str, Any]:
        return self._torch_load("train_state.pt")

    def _torch_load(self, name: str) -> Any:
        return torch.load(self.path / name, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, model: nn.Module | dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer | dict[str, Any],
         train_state: dict[str, Any], config: dict[str, Any],
         metrics: dict[str, Any] | None = None, keep_last: int = 3,
         extra_files: dict[str, Path] | None = None) -> Path:
    """Write checkpoint `step` atomically and prune old ones; returns its directory.

    model and optimizer may be given as (full) state dicts instead (FSDP gathers them); the
    model's then holds each tensor once (no tied duplicates). extra_files {name: source} are
    copied in and checksummed like the rest (e.g. the tokenizer, so a checkpoint is whole)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp, step, model, optimizer, train_state, config, metrics, extra_files)
    except BaseException as exc:  # Ctrl-C included: no half-written directory stays
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)):  # safetensors' and torch's writers: these
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SaveError(f"{root}: could not write checkpoint step {step} ({why}); the "
                            "checkpoints already there are untouched") from None
        raise
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a save): replace it
        old = root / f".old-step_{step:06d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _prune(root, keep_last)
    return final


def _write(tmp: Path, step: int, model, optimizer, train_state: dict[str, Any],
           config: dict[str, Any], metrics: dict[str, Any] | None,
           extra_files: dict[str, Path] | None) -> None:
    """Every file of checkpoint `step` into the empty directory tmp, fsynced, manifest last."""
    if isinstance(model, dict):
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    # safetensors creates its file 0600; the weights get the mode every other file gets
    os.chmod(tmp / "model.safetensors", 0o666 & ~umask)
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(train_state, tmp / "train_state.pt")
    names = ["model.safetensors", "optimizer.pt", "train_state.pt"]
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
        names.append(name)
    files = {}
    for name in names:
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "config": config,
                "metrics": metrics or {}, "files": files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp / "manifest.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Clear what killed saves left under root: .tmp-step_* directories (never complete) are
    removed; an .old-step_* directory (the previous copy of a step being replaced) goes back
    to its place if the new copy never arrived, else it is removed. Directories of a save that
    is still running (its process is alive, this one excepted) are left alone."""
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        m = _SAVE_TEMP.fullmatch(p.name)
        if not m or (int(m.group(3)) != os.getpid() and _pid_alive(int(m.group(3)))):
            continue
        final = root / m.group(2)
        if m.group(1) == "old" and not final.exists():
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints under root, oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / "manifest.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep_last: int) -> None:
    steps = _steps(root)
    keep = {p for _, p in steps[-keep_last:]}
    scored = []
    for _, p in steps:
        try:
            val = _read_manifest(p)["metrics"].get("val_loss")
        except CheckpointError:
            continue
        if isinstance(val, (int, float)):
            scored.append((val, p))
    if scored:
        keep.add(min(scored)[1])
    for _, p in steps:
        if p not in keep:
            shutil.rmtree(p)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    steps = _steps(checkpoint_dir(run_dir))
    return steps[-1][1] if steps else None


def load(path: str | Path, warn=print) -> Checkpoint:
    """Open a checkpoint directory and verify it; or, given a run directory, its newest
    checkpoint that verifies (each newer one that does not, a missing manifest included, is
    reported through `warn`)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return _load_dir(path)
    root = checkpoint_dir(path)
    candidates = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())
    if not candidates:
        raise CheckpointError(f"{path}: not a checkpoint directory (no manifest.json) and "
                              f"no checkpoints under {root}")
    (_, oldest), newer = candidates[0], candidates[1:]
    for _, candidate in reversed(newer):
        try:
            return _load_dir(candidate)
        except CheckpointError as exc:
            warn(f"fastlm.checkpoint: {exc}; falling back to the previous checkpoint")
    try:
        return _load_dir(oldest)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (and no older checkpoint verifies)") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    """path/manifest.json, parsed and checked for the shape save() writes."""
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (the checkpoint is incomplete)") from None
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise CheckpointError(f"{file}: not a {FORMAT} v{VERSION} manifest")
    shape = {"step": int, "config": dict, "metrics": dict, "files": dict}
    for key, kind in shape.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CheckpointError(f"{file}: '{key}' must be a JSON "
                                  f"{'integer' if kind is int else 'object'}, got "
                                  f"{manifest.get(key)!r:.80}")
    for name, info in manifest["files"].items():
        if Path(name).name != name or name in (".", ".."):  # a listed file stays inside path
            raise CheckpointError(f"{file}: file name {name!r} is not a plain file name")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{file}: files.{name} must be an object with a sha256")
    return manifest


def _load_dir(path: Path) -> Checkpoint:
    manifest = _read_manifest(path)
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 differs from the "
                                  "manifest): the file is corrupt or was modified")
    return Checkpoint(path, manifest)
