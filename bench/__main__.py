"""`python -m fastlm.bench`: run the benchmarks, print a table, write JSON (and plots), compare.

    python -m fastlm.bench [--ops layer_norm,rms_norm] [--sizes quick|small|medium|large|SHAPES]
                           [--dtypes float32,bfloat16] [--modes fwd,bwd,full]
                           [--providers torch,fastlm-cpu] [--budget S] [--json PATH]
                           [--plot DIR] [--compare OLD.json [--threshold 0.1]]
    python -m fastlm.bench compare OLD.json NEW.json [--threshold 0.1]
    python -m fastlm.bench plot RESULTS.json [...] --out DIR
    python -m fastlm.bench report [--results bench/results] [--out bench/RESULTS.md]
    python -m fastlm.bench dispatch RESULTS.json [...] [--mode full] [--tests JUNIT.xml]

On a CPU the default is --sizes quick: one representative shape per op (QUICK_SHAPES), the main
peers only (torch eager or fused and fastlm's native backends), a 0.25 s budget per row and
float32 (bfloat16 too where precision=auto would train in it), so a first table comes in
minutes; small/medium/large are the full grids. Every run prints an
estimate of its duration first (rows x (warm-up + budget) + the ceilings: a lower bound, as rows
whose 5 minimum runs outlast the budget take longer) and shows a progress bar over the rows.

Each op is a module bench/bench_<op>.py with run(args) -> rows. --sizes takes a preset or
explicit shapes in the op's own layout, e.g. `--ops layer_norm --sizes 256x64,1024x768` (rows x
features) or `--ops attention --sizes 256x64` (T x D). Without --json the rows go to
bench/results/<device>/<op-list>-<size>-<date>.json when run from a checkout (else only printed).
Every run also measures this machine's ceilings (a large copy and a large matmul) and stores them
in each row (roofline_copy_gbps, roofline_matmul_tflops). --compare exits with status 1 when a
row got slower than the threshold allows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import time

import torch
from tqdm import tqdm

from fastlm.bench import compare, dispatch, plot, report, utils
from fastlm.command import run_command
from fastlm.ops.dispatch import IMPLEMENTED

KERNEL_OPS = tuple(IMPLEMENTED)  # the default set: fastlm's ops (kernels and peers), in its order
SUBCOMMANDS = ("compare", "dispatch", "plot", "report")
# --sizes quick: one shape per op in the op's own layout (attention: T x D), each a typical
# training shape small enough for a CPU (linear_cross_entropy: GPT-2's vocabulary, fewer tokens)
QUICK_SHAPES = {"layer_norm": (2048, 768), "rms_norm": (2048, 768), "attention": (512, 64),
                "cross_entropy": (256, 50257), "linear_cross_entropy": (256, 768, 50304),
                "adamw_step": (1, 512, 8192)}
QUICK_PROVIDERS = frozenset({"torch", "torch-fused", "torch-foreach", "fastlm-cpu",
                             "fastlm-cuda", "fastlm-triton"})  # the peers users pick; no compile
QUICK_BUDGET_S = 0.25
WARMUP_S = 0.1  # time_call's default warm-up per row


def available_benches() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([here])
                  if m.name.startswith("bench_"))


def bench_module(op: str):
    return importlib.import_module(f"fastlm.bench.bench_{op}")


# ---------------------------------------------------------------------------------------------
# Explicit shapes
def parse_shapes(text: str) -> list[tuple[int, ...]] | None:
    """'256x64,1024x768' -> [(256, 64), (1024, 768)]; None when text is not a shape list."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+(x\d+)*", p) for p in parts):
        return None
    shapes = [tuple(int(n) for n in p.split("x")) for p in parts]
    if any(n == 0 for s in shapes for n in s):
        raise ValueError(f"--sizes: every dimension must be > 0, got {text}")
    return shapes


def shape_layout(module) -> tuple[int, str] | None:
    """(numbers per shape, example) for a bench that takes explicit shapes, else None. Kernel
    benches keep presets in SHAPES (size -> list of tuples); attention in SIZES (size -> T and
    D lists), whose explicit shape is T x D."""
    shapes = getattr(module, "SHAPES", None)
    if isinstance(shapes, dict) and shapes.get("small"):
        first = shapes["small"][0]
        return len(first), "x".join(map(str, first))
    sizes = getattr(module, "SIZES", None)
    if isinstance(sizes, dict) and {"T", "D"} <= set(sizes.get("small", {})):
        return 2, f"{sizes['small']['T'][0]}x{sizes['small']['D'][0]} (T x D)"
    return None


@contextlib.contextmanager
def custom_size(module, shape: tuple[int, ...]):
    """Run the module's unchanged run(args) on one explicit shape: it is installed as the preset
    'custom' of the module's own table for the duration (rms_norm shares layer_norm's table, so
    the table is updated in place and the key removed afterwards)."""
    if isinstance(getattr(module, "SHAPES", None), dict):
        table, value = module.SHAPES, [shape]
    else:
        table, value = module.SIZES, {"T": [shape[0]], "D": [shape[1]]}
    table["custom"] = value
    try:
        yield "custom"
    finally:
        table.pop("custom", None)


# ---------------------------------------------------------------------------------------------
# Provider selection
@contextlib.contextmanager
def only_providers(module, names: set[str] | None):
    """Time only the named providers. bench_kernel() checks the harness's filter; benches with
    their own loop are narrowed by wrapping their providers() or PROVIDERS; anything else is
    filtered after the run (see main)."""
    if names is None:
        yield
        return
    utils.set_provider_filter(names)
    saved = {}
    if callable(getattr(module, "providers", None)):
        saved["providers"] = original = module.providers
        module.providers = lambda *a, **k: [p for p in original(*a, **k) if p.name in names]
    if isinstance(getattr(module, "PROVIDERS", None), tuple):
        saved["PROVIDERS"] = module.PROVIDERS
        module.PROVIDERS = tuple(p for p in module.PROVIDERS if p in names)
    try:
        yield
    finally:
        utils.set_provider_filter(None)
        for key, value in saved.items():
            setattr(module, key, value)


# ---------------------------------------------------------------------------------------------
# Arguments
def parse_args(argv=None) -> argparse.Namespace:
    known = available_benches()
    p = argparse.ArgumentParser(prog="python -m fastlm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(o for o in KERNEL_OPS if o in known),
                   help=f"comma-separated, from: {', '.join(known)} (default: the kernel ops)")
    p.add_argument("--sizes", default=None,
                   help="quick, small, medium, large, or explicit shapes like 256x64,1024x768 "
                        "in the op's layout (default: large on a GPU, quick on a CPU)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated from float32,bfloat16,float16 "
                        "(default: bfloat16 on a GPU, float32,bfloat16 on a CPU)")
    p.add_argument("--modes", default="fwd,bwd,full", help="comma-separated from fwd,bwd,full")
    p.add_argument("--providers", default=None,
                   help="comma-separated provider names to time, e.g. torch,fastlm-cpu "
                        "(default: all; keep torch for the speed-up column)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of timed runs per row (default 1, {QUICK_BUDGET_S} for quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every provider (torch.set_num_threads; recorded in the "
                        "rows). On a shared machine 1 thread gives the steadiest ratios")
    p.add_argument("--json", default=None, help="where to write the rows")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write PNG plots (time vs size per provider) into DIR (needs matplotlib)")
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="after the run, list rows slower than in OLD.json")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="--compare: relative slow-down that counts as a regression (0.10 = 10%%)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in args.ops:
        if op not in known:
            p.error(f"--ops: no benchmark named '{op}' (available: {', '.join(known)})")
    args.shapes = None
    if args.sizes is None:
        args.sizes = "large" if gpu else "quick"
    args.quick = args.sizes == "quick"
    if args.budget is None:
        args.budget = QUICK_BUDGET_S if args.quick else 1.0
    if args.quick:
        args.sizes = "small"  # what benches without a quick shape run
    elif args.sizes not in utils.SIZES:
        try:
            args.shapes = parse_shapes(args.sizes)
        except ValueError as exc:
            p.error(str(exc))
        if args.shapes is None:
            p.error(f"--sizes: '{args.sizes}' is neither one of {', '.join(utils.SIZES)} nor "
                    "a list of shapes like 256x64,1024x768")
        for op in args.ops:
            layout = shape_layout(bench_module(op))
            if layout is None:
                p.error(f"--sizes: the {op} benchmark takes only {', '.join(utils.SIZES)}")
            wrong = [s for s in args.shapes if len(s) != layout[0]]
            if wrong:
                p.error(f"--sizes: {op} shapes have {layout[0]} numbers (e.g. {layout[1]}), "
                        f"got {'x'.join(map(str, wrong[0]))}")
    args.dtype_note = None
    if args.dtypes is None and args.quick:
        args.dtypes, args.dtype_note = quick_dtypes(torch.device(args.device))
    names = (args.dtypes or ("bfloat16" if gpu else "float32,bfloat16")).split(",")
    bad = [n for n in names if n not in utils.DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad} (choose from {', '.join(utils.DTYPES)})")
    args.dtypes = [utils.DTYPES[n] for n in names]
    args.modes = args.modes.split(",")
    if any(m not in utils.MODES for m in args.modes):
        p.error(f"--modes: choose from {', '.join(utils.MODES)}")
    if args.providers is not None:
        args.providers = {n.strip() for n in args.providers.split(",") if n.strip()}
        if not args.providers:
            p.error("--providers: give at least one provider name")
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.threshold < 0:
        p.error(f"--threshold must be >= 0, got {args.threshold}")
    if args.compare and not os.path.isfile(args.compare):
        p.error(f"--compare: no such file {args.compare}")
    return args


def default_json_path(args) -> str | None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = os.path.join(repo, "bench", "results")
    if not os.path.isdir(results):  # an installed copy: no results folder to write into
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = utils.device_slug(torch.device(args.device))
    size = "quick" if args.quick else args.sizes if args.shapes is None else "custom"
    return os.path.join(results, slug, f"{'-'.join(args.ops)}-{size}-{stamp}.json")


# ---------------------------------------------------------------------------------------------
# Running
def run_op(op: str, args) -> list[dict]:
    module = bench_module(op)
    rows = []
    shapes, names = op_shapes(op, args), op_providers(op, args)
    with only_providers(module, names):
        if shapes is None:
            rows += module.run(args)
        else:
            for shape in shapes:
                with custom_size(module, shape) as size:
                    rows += module.run(argparse.Namespace(**{**vars(args), "sizes": size}))
    if names is not None:  # benches that time their providers together
        rows = [r for r in rows if r.get("provider") in names]
    return rows


# ---------------------------------------------------------------------------------------------
# The quick preset, the duration estimate and the progress bar
def op_shapes(op: str, args) -> list[tuple[int, ...]] | None:
    """Explicit shapes this run gives op (--sizes SHAPES, or quick's one shape); None: the
    op's own preset table."""
    if args.shapes is not None:
        return args.shapes
    if args.quick and op in QUICK_SHAPES:
        return [QUICK_SHAPES[op]]
    return None


def op_providers(op: str, args) -> set[str] | None:
    """The providers timed for op: --providers, else quick's main peers for kernel ops."""
    if args.providers is not None:
        return args.providers
    return set(QUICK_PROVIDERS) if args.quick and op in QUICK_SHAPES else None


def quick_dtypes(device: torch.device) -> tuple[str, str | None]:
    """quick's dtypes on a CPU: float32, and bfloat16 only where precision=auto would train in
    it (the CPU computes bf16 natively and fast). Emulated bf16 is no quick look: torch's bf16
    linear cross-entropy took 75 s a call on a Zen 3 EPYC without avx512_bf16. Returns the
    --dtypes value and, when bfloat16 is left out, why (printed with the estimate)."""
    from fastlm.precision import resolve_precision

    choice, reason = resolve_precision("auto", device)
    if choice == "bf16":
        return "float32,bfloat16", None
    return "float32", f"bfloat16 left out ({reason}; --dtypes float32,bfloat16 times it)"


def planned_rows(op: str, args) -> int | None:
    """Rows a run of op will make (timed or skipped), from its shape table and its providers;
    None for benches that do not publish them (data, tokenizer, eval, ...)."""
    module, device = bench_module(op), torch.device(args.device)
    names = op_providers(op, args)

    def count(providers) -> int:
        return sum(1 for p in providers if names is None or p in names)

    shapes = op_shapes(op, args)
    if shapes is None:
        table = getattr(module, "SHAPES", None) or getattr(module, "SIZES", None)
        entry = table.get(args.sizes) if isinstance(table, dict) else None
        if isinstance(entry, list):
            shapes = entry
        elif isinstance(entry, dict) and {"T", "D"} <= set(entry):
            shapes = [(T, D) for D in entry["D"] for T in entry["T"]]
        else:
            return None
    modes = [m for m in args.modes if m in getattr(module, "MODES", utils.MODES)]
    per_dtype = len(shapes) * len(modes)  # MODES: a bench's own modes (forward-only ops)
    if isinstance(getattr(module, "PROVIDERS", None), tuple):  # one "full" row per provider
        return len(shapes) * len(args.dtypes) * count(module.PROVIDERS)
    if not callable(getattr(module, "providers", None)):
        return None
    params = list(inspect.signature(module.providers).parameters)
    if params == ["device"]:
        return per_dtype * len(args.dtypes) * count(p.name for p in module.providers(device))
    if params == ["device", "causal"]:  # attention: causal and not, per shape
        return 2 * per_dtype * len(args.dtypes) * count(p.name for p in
                                                        module.providers(device, True))
    if params == ["device", "state"] and hasattr(module, "make_state"):  # one row per step
        return sum(len(shapes) * count(p.name for p in module.providers(
            device, module.make_state((1, 8, 8), dtype, device))) for dtype in args.dtypes)
    return None


def estimate(args) -> tuple[dict[str, int | None], float, str]:
    """(planned rows per op, estimated seconds, the line saying how long the run should take)."""
    planned = {op: planned_rows(op, args) for op in args.ops}
    rows = sum(n or 0 for n in planned.values())
    unknown = [op for op, n in planned.items() if n is None]
    ceilings = 2.0  # measured once per run: a copy and a matmul of 0.5 s each, warm-up, set-up
    seconds = rows * (WARMUP_S + args.budget) + ceilings
    return planned, seconds, (f"estimate: {rows} rows x ({WARMUP_S:g} s warm-up + {args.budget:g} s "
                     f"budget) + ~{ceilings:g} s of ceilings = ~{seconds:.0f} s"
                     + (f", plus {', '.join(unknown)} (not estimated)" if unknown else "")
                     + "; rows whose 5 runs outlast the budget take longer")


def add_ceilings(rows: list[dict], device: torch.device) -> dict:
    """Measure this machine's ceilings once per run and put them on every row; rows that report
    TFLOP/s without a share of the peak get one against a matmul at their own dtype."""
    ceilings = {"roofline_copy_gbps": utils.copy_bandwidth_gbps(device),
                "roofline_matmul_tflops": utils.matmul_tflops(device),
                "roofline_matmul_dtype": str(utils.default_matmul_dtype(device)).removeprefix(
                    "torch.")}
    for r in rows:
        r.update(ceilings)
        if "tflop_per_s" in r and "pct_of_matmul_peak" not in r and r.get("dtype") in utils.DTYPES:
            peak = utils.matmul_tflops(device, utils.DTYPES[r["dtype"]])
            r["matmul_tflops"] = peak
            r["pct_of_matmul_peak"] = 100 * r["tflop_per_s"] / peak
    return ceilings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0], argv[1:])
    args = parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("--threads: must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    planned, seconds, line = estimate(args)
    print(f"fastlm.bench: --sizes {'quick' if args.quick else args.sizes} on {device}; {line}",
          file=sys.stderr, flush=True)
    if args.dtype_note:
        print(f"fastlm.bench: {args.dtype_note}", file=sys.stderr, flush=True)
    rows = []
    bar = tqdm(total=sum(n or 0 for n in planned.values()), unit="row", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    utils.set_progress(bar)
    try:
        for op in args.ops:
            bar.set_description(op)
            before = bar.n
            op_rows = run_op(op, args)
            add_ceilings(op_rows, device)  # measured once per run (cached), before the table
            if planned[op] is not None:  # benches that time rows their own way: catch up
                bar.update(max(0, before + planned[op] - bar.n))
            # Kernel benches share the harness's table; others (data, tokenizer) bring theirs.
            bar.clear()
            print(f"== {op}", flush=True)
            print(getattr(bench_module(op), "format_table", utils.format_table)(op_rows),
                  flush=True)
            rows += op_rows
    finally:
        utils.set_progress(None)
        bar.close()
    if args.providers is not None:
        seen = {r.get("provider") for r in rows}
        missing = sorted(args.providers - seen)
        if missing:
            print(f"warning: --providers: no row from {', '.join(missing)} (providers of these "
                  "ops: see a run without --providers)", file=sys.stderr)
    ceilings = add_ceilings([], device)
    print(f"fastlm.bench: {time.perf_counter() - t_start:.0f} s (estimated ~{seconds:.0f} s)",
          file=sys.stderr)
    print(f"\nceilings measured in this run: copy {ceilings['roofline_copy_gbps']:.1f} GB/s, "
          f"matmul {ceilings['roofline_matmul_tflops']:.3g} TFLOP/s "
          f"({ceilings['roofline_matmul_dtype']})")
    path = args.json or default_json_path(args)
    if path:
        utils.write_json(rows, path)
        print(f"wrote {len(rows)} rows to {path}")
    status = 0
    if args.plot:
        status |= _plot(rows, args.plot)
    if args.compare:
        status |= compare.report(compare.load(args.compare), rows, args.threshold)
    return status


def _plot(rows, out_dir) -> int:
    try:
        paths = plot.plot_rows(rows, out_dir)
    except plot.MissingMatplotlib as exc:
        print(f"--plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} plot(s) to {out_dir}")
    return 0


def subcommand(name: str, argv: list[str]) -> int:
    if name == "compare":
        return compare.main(argv)
    if name == "report":
        return report.main(argv)
    if name == "dispatch":
        return dispatch.main(argv)
    p = argparse.ArgumentParser(prog="python -m fastlm.bench plot",
                                description="PNG plots (time vs size per provider) of bench JSON")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    a = p.parse_args(argv)
    rows = []
    for f in a.files:
        with open(f) as fh:
            rows += json.load(fh)
    return _plot(rows, a.out)


if __name__ == "__main__":
    sys.exit(run_command(main))
