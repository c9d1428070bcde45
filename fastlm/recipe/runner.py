"""Run a recipe's stages in order, skipping those already done with the same fingerprint.

A stage runs when it has no finished record, when its fingerprint changed (its settings or its
inputs did), or when --from/--only name it. Its folder is cleared first, except a resumable stage
(pretraining) restarted with the same fingerprint, which continues from its own checkpoint. A
stage that fails or is interrupted leaves no record, so the next run starts there; it never
touches another stage's folder, so everything before it stays as it was.
"""
from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path

from fastlm.recipe import fingerprint as fpr
from fastlm.recipe.context import Context, StageInterrupted
from fastlm.recipe.measure import peaks, reset_peaks
from fastlm.recipe.spec import STAGES, Recipe, RecipeError
from fastlm.recipe.stages import RESUMABLE, RUNNERS, files, inputs


def plan(recipe: Recipe, from_stage: str | None, only: str | None) -> list[str]:
    """The recipe's stages; RecipeError for a stage name or a choice that cannot run."""
    stages = [s for s in STAGES if s in recipe.recipe.stages]
    for flag, name in (("--from", from_stage), ("--only", only)):
        if name is not None and name not in stages:
            known = STAGES if name not in STAGES else stages
            raise RecipeError(f"{flag} {name}: not a stage of this recipe (stages: "
                              f"{', '.join(known)})")
    for stage in stages:
        missing = [s for s in inputs(stage, recipe) if s not in stages]
        if missing:
            raise RecipeError(f"[recipe] stages: {stage} needs {missing[0]}, which the list "
                              "leaves out")
    return stages


def _say(text: str) -> None:
    print(f"recipe: {text}", file=sys.stderr, flush=True)


def run(recipe: Recipe, out: str | Path, from_stage: str | None = None,
        only: str | None = None, progress: bool = True) -> int:
    """Run the recipe into out; returns the exit status (0, 1 a stage failed, 130 stopped)."""
    stages = plan(recipe, from_stage, only)
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    first_forced = stages.index(only or from_stage) if (only or from_stage) else len(stages)
    t_all = time.perf_counter()
    for i, stage in enumerate(stages):
        if only is not None and i > first_forced:
            break
        upstream = {s: records[s] for s in inputs(stage, recipe)}
        fp = fpr.fingerprint(recipe.section(stage), upstream, files(stage, recipe))
        folder = root / stage
        done = fpr.read(folder)
        current = done is not None and done.get("fingerprint") == fp
        if i < first_forced and (only is not None or from_stage is not None):
            if not current:
                raise RecipeError(f"{'--only' if only else '--from'} {stages[first_forced]}: "
                                  f"stage {stage} before it is not done with these settings; "
                                  "run the recipe without it first")
            records[stage] = done
            continue
        if current and i != first_forced and not (from_stage and i > first_forced):
            _say(f"[{i + 1}/{len(stages)}] {stage}: done (fingerprint {fp[:12]} matches)")
            records[stage] = done
            continue
        started = fpr.read(folder, fpr.STARTED)
        keep = (stage in RESUMABLE and started is not None and started["fingerprint"] == fp
                and done is None)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        fpr.mark_started(folder, fp)
        _say(f"[{i + 1}/{len(stages)}] {stage}" + (": resuming" if keep else ""))
        ctx = Context(recipe, root, stage, records, progress)
        reset_peaks()
        t0 = time.perf_counter()
        try:
            result = RUNNERS[stage](ctx)
        except (KeyboardInterrupt, StageInterrupted) as exc:
            _say(f"stopped in stage {stage} ({exc or 'interrupted'}); earlier stages are kept "
                 f"in {root}; run the same command again to continue")
            return 130
        except Exception as exc:  # noqa: BLE001 -- any failure: name the stage, keep what is done
            (folder / "error.txt").write_text(traceback.format_exc())
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _say(f"stage {stage} failed: {why} (traceback: {folder / 'error.txt'}); the "
                 f"stages before it are kept; fix it and run the same command to continue")
            return 1
        wall = time.perf_counter() - t0
        metrics = {"wall_s": round(wall, 3), **peaks(), **result.get("metrics", {})}
        if metrics.get("tokens") and not metrics.get("tokens_per_s"):
            metrics["tokens_per_s"] = metrics["tokens"] / wall
        record = {"stage": stage, "fingerprint": fp, "outputs": result["outputs"],
                  "metrics": metrics}
        fpr.finish(folder, record)
        records[stage] = record
        _say(f"[{i + 1}/{len(stages)}] {stage}: finished in {wall:.1f} s")
    _say(f"all stages done in {time.perf_counter() - t_all:.1f} s; report: "
         f"{root / 'report.md'}" if "report" in records else "done")
    return 0
