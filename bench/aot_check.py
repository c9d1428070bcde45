"""Ahead-of-time resource check of every GPU kernel, without a GPU.

Triton: every launch fastlm's launchers can make (each block config their heuristics pick, each
dtype, each autotune config) compiled with triton.compile for sm_80 (A100) and sm_90 (H100);
shared memory from the compiled kernel, registers and spill bytes from ptxas -v. CUDA: every
csrc/*/*_cuda.cu compiled by nvcc -Xptxas -v for both, one row per kernel instantiation.

    python -m fastlm.bench.aot_check --ci --out bench/results/aot   # what CI runs
    python -m fastlm.bench.aot_check --all --out DIR   # also compile the pruned attention configs
    ... --cache ~/.cache/fastlm-aot   # reuse results of unchanged kernels (source-hash keyed)

--ci exits 1 if a configuration a launcher can pick spills registers, needs more shared memory
than the architecture gives one block, or does not compile. Autotune configs that the kernel's
pruner drops before launch are listed as pruned and not compiled (with --all they are compiled
and shown, never failed). Writes triton.json/.md, cuda.json/.md and summary.json into --out.
Run with TRITON_INTERPRET unset: interpreter functions cannot be compiled.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from fastlm.bench.aot import check, report
from fastlm.bench.aot.capture import ARCHS
from fastlm.bench.aot.triton_cases import CASES


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cross_entropy_fused_ptx(dtype: str, block_v: int, num_warps: int, arch: int) -> str:
    """PTX of the fused in-place cross-entropy kernel (loss, then gradient over the logits) as
    its launcher compiles it for rows of block_v classes (tests read its barriers)."""
    import torch
    from fastlm.bench.aot.capture import Recorder
    from fastlm.bench.aot.compile import compile_to_ptx
    from fastlm.kernels import cross_entropy

    recorder = Recorder()
    with recorder.active():
        x = torch.randn(2, block_v).to(getattr(torch, dtype))
        cross_entropy.cross_entropy_fwd_inplace_triton(x, torch.zeros(2, dtype=torch.long),
                                                       torch.ones(()), -100, 0.0, 0.0)
    launch = next(iter(recorder.launches))
    assert launch.num_warps == num_warps, (launch.num_warps, num_warps)
    return compile_to_ptx(launch, arch).asm["ptx"]


def run(out: str, all_configs: bool, processes: int, ops: tuple, cuda: bool,
        cache: str | None = None, no_compile: bool = False) -> int:
    import triton
    from fastlm.bench.aot import cuda as cuda_aot
    from fastlm.bench.aot import table

    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    rows = table.triton_table(all_configs, processes, ops,
                              log=lambda msg: print(msg, file=sys.stderr, flush=True),
                              cache=cache, no_compile=no_compile)
    triton_s = time.perf_counter() - start
    cuda_rows, cuda_s = [], 0.0
    if cuda:
        start = time.perf_counter()
        cuda_rows = cuda_aot.cuda_table(tuple(ARCHS), processes, cache)
        for r in cuda_rows:
            r["limit"] = ARCHS[int(r["arch"][3:])]
            r["status"] = check.verdict(int(r["arch"][3:]), r["shared"], r["spill"])
        cuda_s = time.perf_counter() - start
    failed = check.failures(rows) + check.failures(cuda_rows)
    summary = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=_commit(), triton_version=triton.__version__,
        nvcc_version=cuda_aot.nvcc_version() if cuda else None,
        archs=[f"sm_{a}" for a in ARCHS], limits={f"sm_{a}": v for a, v in ARCHS.items()},
        processes=processes, cpu_count=os.cpu_count(), ops=list(ops), all_configs=all_configs,
        cached=sum(1 for r in rows if r["cached"]),
        # What a run without the cache would take: the compiles' own seconds over the pool.
        compile_seconds=round(sum(r["seconds"] or 0.0 for r in rows)),
        not_compiled=sum(1 for r in rows if r["status"] == check.NOT_COMPILED),
        triton_seconds=round(triton_s), cuda_seconds=round(cuda_s),
        triton=report.counts(rows), cuda=report.counts(cuda_rows), failures=len(failed))
    for name, data in (("triton.json", rows), ("cuda.json", cuda_rows)):
        with open(os.path.join(out, name), "w") as f:  # a row a line: small, readable diffs
            f.write("[\n" + ",\n".join(json.dumps(r) for r in data) + "\n]\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "triton.md"), "w") as f:
        f.write(report.triton_markdown(rows, summary))
    with open(os.path.join(out, "cuda.md"), "w") as f:
        f.write(report.cuda_markdown(cuda_rows, summary))
    print(report.summary_markdown(summary))
    for r in failed:
        print(f"FAIL {r['arch']} {r['kernel']} {r.get('dtype', '')} {r.get('config', '')} "
              f"{r['status']}: shared {r['shared']} B (limit {r['limit']}), spill {r['spill']} B "
              f"{r.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm.bench.aot_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true",
                        help="exit 1 on any spill, over-limit or compile error in a config a "
                             "launcher can pick (without it: list them, exit 0)")
    parser.add_argument("--all", action="store_true", dest="all_configs",
                        help="also compile the autotune configs the pruners drop")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "aot"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--ops", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--no-compile", action="store_true",
                        help="write the tables from --cache alone, listing what it lacks as "
                             "'not compiled' (a partial table; not with --ci)")
    parser.add_argument("--cache", help="folder of earlier results, keyed by a hash of each "
                        "kernel's source (and what it calls or includes), compiler versions and "
                        "options: an edited kernel always recompiles; none by default")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the check compiles the kernels for a GPU")
    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in CASES]
    if args.no_compile and (args.ci or not args.cache):
        parser.error("--no-compile needs --cache and cannot be a --ci run")
    if unknown or args.processes < 1:
        parser.error(f"unknown --ops {unknown} (known: {', '.join(CASES)})" if unknown
                     else "--processes must be >= 1")
    status = run(args.out, args.all_configs, args.processes, ops, not args.no_cuda, args.cache,
                 args.no_compile)
    return status if args.ci else 0


if __name__ == "__main__":
    sys.exit(main())
