"""The one way from a checkpoint to a model: `load(path) -> (model, tokenizer, meta)`.

    from fastlm.restore import load
    model, tokenizer, meta = load("runs/x")           # a run directory: its latest checkpoint
    lm = load("runs/x/checkpoints/step_000600", device="cuda", pack=True)
    lm.model, lm.tokenizer, lm.meta.name, lm.meta.task

Generation, chat, the server, evaluation, fine-tuning, export and fastlm.compare all call it, so
every command reads a checkpoint the same way:

  model      fastlm.models.build(the manifest's model config): the architecture model.arch names,
             wrapped in a Classifier when the checkpoint is a classification fine-tune
             (manifest "finetune": {"task": "classify", "labels": [...]}); eval mode.
  tokenizer  the first of (one rule for every checkpoint):
               1. an explicit file (the --tokenizer option of the commands);
               2. the manifest's "tokenizer" record, written by fastlm.finetune:
                  {"kind": "byte", "special_tokens": [...]}  byte ids then the specials after 255
                  {"kind": "file", "path": "tokenizer.json"} relative to the run directory;
               3. tokenizer.json inside the checkpoint (fastlm.train copies the run's tokenizer
                  into every checkpoint and lists it, checksummed, in the manifest's files);
               4. tokenizer.json in the run directory, or next to a checkpoint directory that
                  is not in a run (older checkpoints, `python -m fastlm.export --from-hf`);
               5. byte tokens, when the vocabulary has room for 256 of them.
  meta       where the checkpoint is, its step, manifest config, label order, task ("lm",
             "classify", "sft"), a display name and notes (the tokenizer's source, packing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fastlm import checkpoint, models
from fastlm.checkpoint import CheckpointError
from fastlm.config import ConfigError, ModelConfig, load_config
from fastlm.models.classifier import Classifier
from fastlm.models.packed_linear import pack_linears
from fastlm.tokenizer import Tokenizer


@dataclass
class Meta:
    """What a checkpoint says about itself, beyond its weights and tokenizer."""
    path: Path  # the checkpoint directory
    config: dict[str, Any]  # the manifest's config (all sections)
    step: int = 0
    labels: list[str] = field(default_factory=list)  # a classifier's label order
    notes: list[str] = field(default_factory=list)  # shown by the CLIs: tokenizer source, ...

    @property
    def task(self) -> str:
        return self.config.get("finetune", {}).get("task", "lm")

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent  # RUN_DIR/checkpoints/step_N

    @property
    def name(self) -> str:
        """RUN-step_N (the server's model id), or the directory's own name outside a run."""
        run = self.run_dir.name if self.path.parent.name == "checkpoints" else self.path.name
        return f"{run}-{self.path.name}"


class Restored(NamedTuple):
    model: nn.Module  # a fastlm.models.LanguageModel, or a Classifier around one
    tokenizer: Tokenizer
    meta: Meta


def model_config(saved: dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from a manifest's "model" section, checked like a config file would be."""
    try:
        cfg = load_config(overrides={"model.preset": "", **{f"model.{k}": v
                                                            for k, v in saved.items()
                                                            if k != "preset"}})
    except ConfigError as exc:
        raise CheckpointError(f"{where}: its model config does not fit this fastlm's models "
                              f"(another version?): {exc}") from None
    return cfg.model


def find_tokenizer(config: dict[str, Any], ckpt_path: Path, vocab_size: int,
                   explicit: str | Path | None = None) -> tuple[Tokenizer, str]:
    """(tokenizer, where it came from) by the rule in the module docstring."""
    where = ckpt_path / "manifest.json"
    spec = config.get("tokenizer")
    if explicit:
        file = Path(explicit)
        if not file.is_file():
            raise CheckpointError(f"--tokenizer {explicit}: no such file")
        tok, source = Tokenizer.load(file), str(file)
    elif spec is not None and spec.get("kind") == "byte":
        tok = Tokenizer.byte(spec.get("special_tokens", []))
        source = f"byte tokenizer + {len(tok.special_tokens)} special tokens (manifest)"
    elif spec is not None and spec.get("kind") == "file":
        file = ckpt_path.parent.parent / spec["path"]
        if not file.is_file():
            raise CheckpointError(f"{where}: its tokenizer file {file} is missing")
        tok, source = Tokenizer.load(file), str(file)
    elif spec is not None:
        raise CheckpointError(f"{where}: unknown tokenizer record {spec!r}")
    else:
        found = [d / "tokenizer.json" for d in (ckpt_path, ckpt_path.parent.parent,
                                                ckpt_path.parent)
                 if (d / "tokenizer.json").is_file()]
        if found:
            tok, source = Tokenizer.load(found[0]), str(found[0])
        elif vocab_size < 256:
            raise CheckpointError(f"{ckpt_path}: no tokenizer.json found and the model's "
                                  f"vocabulary ({vocab_size}) is too small for bytes; pass "
                                  "--tokenizer")
        else:
            tok = Tokenizer.byte()
            source = "byte tokenizer (no tokenizer.json next to the checkpoint)"
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {tok.vocab_size} ids but "
                              f"model.vocab_size is {vocab_size}; pass the tokenizer it was "
                              "trained with")
    return tok, source


def load_weights(ckpt: checkpoint.Checkpoint, model: nn.Module) -> None:
    try:
        ckpt.load_model(model)
    except RuntimeError as exc:  # size mismatches come from load_state_dict as RuntimeError
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path / 'model.safetensors'} does not fit the model its "
                              f"manifest describes: {str(exc).splitlines()[-1].strip()}") from None


def load(path: str | Path, device: str | torch.device = "cpu",
         tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
         pack: bool = False) -> Restored:
    """A checkpoint directory (or a run directory: its latest checkpoint) ready for inference.

    tokenizer: a tokenizer file that overrides the checkpoint's own. dtype: cast the weights.
    pack: on the CPU, also keep every Linear's weight in oneDNN's packed layout
    (fastlm.models.packed_linear: decode matmuls 1.6-2.7x faster at twice the weights' memory);
    for generation, not for training."""
    ckpt = checkpoint.load(path)
    where = str(ckpt.path / "manifest.json")
    config = ckpt.manifest.get("config", {})
    if "model" not in config:
        raise CheckpointError(f"{where}: no model config in the manifest")
    lm = models.build(model_config(config["model"], where))  # the arch model.arch names
    tok, source = find_tokenizer(config, ckpt.path, lm.config.vocab_size, tokenizer)
    meta = Meta(ckpt.path, config, ckpt.step, notes=[f"tokenizer: {source}"])
    model: nn.Module = lm
    finetune = config.get("finetune", {})
    if finetune.get("task") == "classify":
        meta.labels = [str(x) for x in finetune["labels"]]
        model = Classifier(lm, len(meta.labels))
    load_weights(ckpt, model)
    model.to(device).eval()
    if dtype is not None:
        model.to(dtype)
    if pack and (n := pack_linears(model)):
        meta.notes.append(f"{n} linears packed for the CPU")
    return Restored(model, tok, meta)
