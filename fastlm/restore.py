"""Rebuild a trained model from a checkpoint: the network, its tokenizer and what it is for.

A checkpoint's manifest holds the resolved config it was trained with (fastlm.checkpoint). Two
optional sections written by fastlm.finetune say more:

    "tokenizer": {"kind": "byte", "special_tokens": [...]}   byte tokens plus special ids after
                 255 (the chat template's), or {"kind": "file", "path": "tok.json"}
    "finetune":  {"task": "classify", "labels": [...]}        a Classifier and its label order
                 {"task": "sft", ...}                          a chat-tuned language model

Without a "tokenizer" section the tokenizer is the checkpoint's tokenizer.json (fastlm.train
copies the run's tokenizer into each checkpoint), or byte tokens when there is none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlm import checkpoint
from fastlm.checkpoint import CheckpointError
from fastlm.models.classifier import Classifier
from fastlm.config import ConfigError, ModelConfig, load_config
from fastlm import models
from fastlm.tokenizer import Tokenizer


@dataclass
class Restored:
    model: nn.Module  # GPT, or Classifier for a classification fine-tune
    tokenizer: Tokenizer
    config: dict[str, Any]  # the manifest's config (all sections)
    path: Path  # the checkpoint directory
    labels: list[str] = field(default_factory=list)
    step: int = 0

    @property
    def task(self) -> str:
        return self.config.get("finetune", {}).get("task", "lm")

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent  # RUN_DIR/checkpoints/step_N


def model_config(saved: dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from a manifest's "model" section, checked like a config file would be."""
    try:
        cfg = load_config(overrides={"model.preset": "", **{f"model.{k}": v
                                                            for k, v in saved.items()
                                                            if k != "preset"}})
    except ConfigError as exc:
        raise CheckpointError(f"{where}: its model config does not fit this fastlm's GPT "
                              f"(another architecture or version?): {exc}") from None
    return cfg.model


def tokenizer_for(config: dict[str, Any], ckpt_path: Path) -> Tokenizer:
    """The checkpoint's tokenizer: the manifest's "tokenizer" spec (fine-tunes), else a
    tokenizer.json inside the checkpoint (fastlm.train copies it there), else byte tokens."""
    spec = config.get("tokenizer")
    where = ckpt_path / "manifest.json"
    if spec is None:
        file = ckpt_path / "tokenizer.json"
        return Tokenizer.load(file) if file.is_file() else Tokenizer.byte()
    if spec.get("kind") == "byte":
        return Tokenizer.byte(spec.get("special_tokens", []))
    if spec.get("kind") == "file":  # relative to the run directory
        file = ckpt_path.parent.parent / spec["path"]
        if not file.is_file():
            raise CheckpointError(f"{where}: its tokenizer file {file} is missing")
        return Tokenizer.load(file)
    raise CheckpointError(f"{where}: unknown tokenizer spec {spec!r}")


def load_weights(ckpt: checkpoint.Checkpoint, model: nn.Module) -> None:
    try:
        ckpt.load_model(model)
    except RuntimeError as exc:  # size mismatches come from load_state_dict as RuntimeError
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / 'model.safetensors'} does not fit the model its "
                              f"manifest describes: {str(exc).splitlines()[-1].strip()}") from None


def restore(path: str | Path, device: str | torch.device = "cpu") -> Restored:
    """Load a checkpoint directory (or a run directory: its latest checkpoint) for inference."""
    ckpt = checkpoint.load(path)
    where = str(ckpt.path / "manifest.json")
    config = ckpt.manifest.get("config", {})
    if "model" not in config:
        raise CheckpointError(f"{where}: no model config in the manifest")
    gpt = models.build(model_config(config["model"], where))
    tokenizer = tokenizer_for(config, ckpt.path)
    if tokenizer.vocab_size > gpt.config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but "
                              f"model.vocab_size is {gpt.config.vocab_size}")
    finetune = config.get("finetune", {})
    labels: list[str] = []
    model: nn.Module = gpt
    if finetune.get("task") == "classify":
        labels = [str(x) for x in finetune["labels"]]
        model = Classifier(gpt, len(labels))
    load_weights(ckpt, model)
    model.to(device).eval()
    return Restored(model, tokenizer, config, ckpt.path, labels, ckpt.step)
