"""Checkpoints: one directory per step under RUN_DIR/checkpoints/, written atomically.

    step_000600/
      model.safetensors   model weights (safetensors; a tied weight is stored once)
      optimizer.pt        optimizer state dict (torch.save; loaded with weights_only=True)
      train_state.pt      step, RNG states, anything else the loop needs to resume (same)
      manifest.json       format, step, resolved config, metrics, sha256 and size of each file

A checkpoint is written into a hidden temporary directory next to its final place and renamed
when every file is complete, so a crash never leaves a half-written step_* directory. Loading
verifies every checksum first and names the file that does not match. After saving, only the
last `keep_last` checkpoints and the best one (lowest val_loss in its manifest) are kept.
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


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


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
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if isinstance(model, dict):
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(model, str(tmp / "model.safetensors"))
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
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a save): replace it
        old = root / f".old-step_{step:06d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _prune(root, keep_last)
    return final


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
            val = json.loads((p / "manifest.json").read_text())["metrics"].get("val_loss")
        except (OSError, ValueError, KeyError):
            continue
        if val is not None:
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
    """Open a checkpoint directory and verify its checksums; or, given a run directory, its
    newest checkpoint that verifies (each corrupt newer one is reported through `warn`)."""
    path = Path(path)
    if not (path / "manifest.json").exists():
        steps = _steps(checkpoint_dir(path))
        if not steps:
            raise CheckpointError(f"{path}: not a checkpoint directory (no manifest.json) and "
                                  f"no checkpoints under {checkpoint_dir(path)}")
        for _, candidate in reversed(steps):
            try:
                return _load_dir(candidate)
            except CheckpointError as exc:
                if candidate == steps[0][1]:
                    raise CheckpointError(f"{exc} (and no older checkpoint verifies)") from None
                warn(f"fastlm.checkpoint: {exc}; falling back to the previous checkpoint")
    return _load_dir(path)


def _load_dir(path: Path) -> Checkpoint:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path / 'manifest.json'}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path / 'manifest.json'}: not a {FORMAT} v{VERSION} manifest")
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 differs from the "
                                  "manifest): the file is corrupt or was modified")
    return Checkpoint(path, manifest)
