"""`python -m fastlm.bench`: run the kernel benchmarks, print a table, write JSON.

    python -m fastlm.bench [--ops layer_norm,rms_norm] [--sizes small|medium|large]
                           [--dtypes float32,bfloat16] [--modes fwd,bwd,full] [--json PATH]

Each op is a module bench/bench_<op>.py with run(args) -> rows. Without --json the rows go to
bench/results/<device>/<op-list>-<date>.json when run from a checkout (else only printed).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import pkgutil
import sys

import torch

from fastlm.bench import utils

KERNEL_OPS = ("layer_norm", "rms_norm", "attention", "cross_entropy", "linear_cross_entropy",
              "adamw_step")  # the default set: ops with kernels and peers


def available_benches() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([here])
                  if m.name.startswith("bench_"))


def parse_args(argv=None) -> argparse.Namespace:
    known = available_benches()
    p = argparse.ArgumentParser(prog="python -m fastlm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(o for o in KERNEL_OPS if o in known),
                   help=f"comma-separated, from: {', '.join(known)}")
    p.add_argument("--sizes", default=None, choices=utils.SIZES,
                   help="problem sizes (default: large on a GPU, small on a CPU)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated from float32,bfloat16,float16 "
                        "(default: bfloat16 on a GPU, float32,bfloat16 on a CPU)")
    p.add_argument("--modes", default="fwd,bwd,full", help="comma-separated from fwd,bwd,full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per row")
    p.add_argument("--json", default=None, help="where to write the rows")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in args.ops:
        if op not in known:
            p.error(f"--ops: no benchmark named '{op}' (available: {', '.join(known)})")
    args.sizes = args.sizes or ("large" if gpu else "small")
    names = (args.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    bad = [n for n in names if n not in utils.DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad} (choose from {', '.join(utils.DTYPES)})")
    args.dtypes = [utils.DTYPES[n] for n in names]
    args.modes = args.modes.split(",")
    if any(m not in utils.MODES for m in args.modes):
        p.error(f"--modes: choose from {', '.join(utils.MODES)}")
    return args


def default_json_path(args) -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(repo, "bench", "results")
    if not os.path.isdir(results):  # an installed copy: no results folder to write into
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = utils.device_slug(torch.device(args.device))
    return os.path.join(results, slug, f"{'-'.join(args.ops)}-{args.sizes}-{stamp}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for op in args.ops:
        module = importlib.import_module(f"fastlm.bench.bench_{op}")
        print(f"== {op}", file=sys.stderr, flush=True)
        op_rows = module.run(args)
        # Kernel benches share the harness's table; others (data, tokenizer) bring their own.
        print(getattr(module, "format_table", utils.format_table)(op_rows), flush=True)
        rows += op_rows
    path = args.json or default_json_path(args)
    if path:
        utils.write_json(rows, path)
        print(f"\nwrote {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
