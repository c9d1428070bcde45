"""What a stage is handed: the recipe, its own folder and the records of the stages before it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastlm.recipe.spec import Recipe
from fastlm.train.runtime import pick_device


class StageError(RuntimeError):
    """A stage could not finish; the message says why (the runner names the stage)."""


class StageInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM inside a stage that saved its progress (pretraining)."""


@dataclass
class Context:
    recipe: Recipe
    root: Path  # the run's folder, DIR
    stage: str
    records: dict[str, dict]  # finished stages' records (fastlm.recipe.fingerprint)
    progress: bool = True

    @property
    def dir(self) -> Path:
        return self.root / self.stage

    @property
    def device(self) -> str:
        return str(pick_device(self.recipe.recipe.device))

    @property
    def model_stage(self) -> str:
        """The stage whose checkpoint is the recipe's final model: sft, else pretrain."""
        return "sft" if "sft" in self.recipe.recipe.stages else "pretrain"

    def output(self, stage: str, key: str):
        return self.records[stage]["outputs"][key]

    def tasks_dir(self) -> Path:
        return self.root / "data" / "tasks"
