"""python -m fastlm.recipe run RECIPE.toml [--out DIR] [--from STAGE] [--only STAGE] [--nproc N]
   python -m fastlm.recipe list

run: every stage of the recipe into DIR (default runs/recipe-<name>); a rerun skips the stages
already done with the same settings and inputs, redoes those whose inputs changed, and continues
a stopped run at its first unfinished stage. --from STAGE redoes STAGE and everything after it;
--only STAGE redoes just STAGE (the stages before it must be done). --nproc N pretrains under
torchrun with N processes. RECIPE is a file or the name of a shipped recipe (list shows them).
"""
from __future__ import annotations

import argparse
import sys

from fastlm.command import run_command
from fastlm.recipe.runner import run
from fastlm.recipe.spec import SHIPPED, STAGES, RecipeError, parse, tomllib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe's stages (resumable)")
    r.add_argument("recipe", help="recipe TOML file or shipped recipe name (e.g. cpu-tiny)")
    r.add_argument("--out", help="run folder (default runs/recipe-<name>)")
    r.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help=f"redo from this stage on ({', '.join(STAGES)})")
    r.add_argument("--only", metavar="STAGE", help="redo only this stage")
    r.add_argument("--nproc", type=int, help="pretraining processes under torchrun")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("list", help="the shipped recipes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        for path in sorted(SHIPPED.glob("*.toml")):
            about = tomllib.loads(path.read_text()).get("recipe", {}).get("description", "")
            print(f"{path.stem:<12} {about}")
        return 0
    if args.from_stage and args.only:
        print("fastlm.recipe: error: --from and --only go separately", file=sys.stderr)
        return 2
    try:
        recipe = parse(args.recipe, args.nproc)
        out = args.out or f"runs/recipe-{recipe.recipe.name}"
        return run(recipe, out, args.from_stage, args.only, progress=not args.quiet)
    except RecipeError as exc:
        print(f"fastlm.recipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_command(main))
