"""`python -m fastlm recipe run RECIPE.toml`: one road from raw text to a served chat model.

Stages (fastlm.recipe.spec.STAGES), each writing DIR/<stage>/ with a fingerprint of its settings
and inputs (fastlm.recipe.fingerprint): data, tokenizer, pretrain, eval, sft, eval-sft, export,
serve-check, report. The runner (runner.py) skips what is done, redoes what changed and resumes
a killed run at its first unfinished stage; the report card is DIR/report.md and report.json.
Shipped recipes live in fastlm/recipes/ (cpu-tiny, gpu-gpt2, gpu-llama).
"""
from fastlm.recipe.runner import run
from fastlm.recipe.spec import STAGES, RecipeError, parse

__all__ = ["STAGES", "RecipeError", "parse", "run"]
