"""Which function runs each stage, and which earlier stages' outputs it reads (its inputs, so
its fingerprint covers them). The order is fastlm.recipe.spec.STAGES."""
from __future__ import annotations

from fastlm.recipe import build, checks, report
from fastlm.recipe.build import input_files
from fastlm.recipe.spec import BUILTIN, STAGES, Recipe

RUNNERS = {"data": build.data, "tokenizer": build.tokenizer, "pretrain": build.pretrain,
           "eval": checks.evaluate, "sft": build.sft, "eval-sft": checks.evaluate_sft,
           "export": checks.export, "serve-check": checks.serve_check, "report": report.report}
# Stages that continue their own interrupted work (same fingerprint) instead of starting over.
RESUMABLE = {"pretrain"}
assert tuple(RUNNERS) == STAGES


def inputs(stage: str, recipe: Recipe) -> list[str]:
    """The stages whose outputs `stage` reads."""
    final = "sft" if "sft" in recipe.recipe.stages else "pretrain"
    return {"data": [], "tokenizer": ["data"], "pretrain": ["tokenizer"],
            "eval": ["data", "pretrain"], "sft": ["data", "pretrain"],
            "eval-sft": ["data", "sft"], "export": ["data", final],
            "serve-check": [final],
            "report": [s for s in STAGES[:-1] if s in recipe.recipe.stages]}[stage]


def files(stage: str, recipe: Recipe) -> list[str]:
    """The files from outside the run a stage reads (their size and mtime enter its
    fingerprint): the data inputs, and task or chat files given as paths."""
    if stage == "data":
        return [f for f in input_files(recipe) if not f.startswith("hf:")]
    specs = {"eval": [recipe.eval.mc, recipe.eval.generate],
             "eval-sft": [recipe.eval.mc, recipe.eval.generate], "sft": [recipe.sft.data]}
    return [str(recipe.resolve(s)) for s in specs.get(stage, []) if s and s != BUILTIN]
