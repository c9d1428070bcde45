"""Data pipeline benchmark: prepare throughput (MB/s of raw text) and loader throughput (batches/s).

    python -m fastlm.bench --ops data [--sizes small|medium|large]
    python -m fastlm.bench.bench_data [--sizes ...] [--workers N] [--json PATH]

Corpus: the running interpreter's standard-library sources (fastlm.data.text.stdlib_files), real
text present on every machine: small = the first 4 MB of it in hash order, medium = all of it
(about 12 MB, tests excluded), large = every .py below the stdlib root, tests included.

prepare is timed end to end (read, clean, exact + near dedup, byte-tokenize, write shards and the
manifest) with 1 worker and with all cores, with and without MinHash near-dedup (its main cost).
The loader rows time BatchLoader.next() (gather B windows from memmapped shards into int64 tensors)
with and without the prefetch thread, next to the nanoGPT-style gather (random offsets into one
memmap, a torch.stack per batch) as the peer.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastlm.bench import utils
from fastlm.data import BatchLoader, DedupConfig, ShardDataset, prepare
from fastlm.data.text import stdlib_files

OP = "data"
CORPUS_BYTES = {"small": 4 << 20, "medium": None, "large": None}
LOADER_SHAPES = {"small": (8, 1024), "medium": (16, 1024), "large": (32, 1024)}


def corpus(size: str) -> list[str]:
    """File paths of the benchmark corpus (see the module docstring)."""
    if size == "large":
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(str(p) for p in root.rglob("*.py")
                      if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    root, files = stdlib_files()
    cap = CORPUS_BYTES[size]
    if cap is None:
        return [str(p) for p in files]
    # hash order, so that a cap samples the whole library rather than its first folders
    ordered = sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode())
                     .digest())
    out, total = [], 0
    for p in ordered:
        if total >= cap:
            break
        out.append(str(p))
        total += p.stat().st_size
    return sorted(out)


def bench_prepare(files: list[str], workers: int, near: bool, out: Path, env: dict) -> dict:
    t0 = time.perf_counter()
    m = prepare(files, out, workers=workers, dedup=DedupConfig(near=near), shard_tokens=4_000_000,
                progress=False, overwrite=True)
    seconds = time.perf_counter() - t0
    mb = m["cleaning"]["bytes_in"] / 1e6
    return {"op": OP, "bench": "prepare", "provider": "fastlm", "workers": workers,
            "near_dedup": near, "files": len(files), "mb": round(mb, 2),
            "tokens": m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"],
            "documents_out": m["cleaning"]["documents_out"], "seconds": seconds,
            "mb_per_s": mb / seconds, **env}


def bench_loader(data: Path, size: str, budget: float, env: dict) -> list[dict]:
    B, T = LOADER_SHAPES[size]
    ds = ShardDataset(data, "train")
    rows = []
    cpu = torch.device("cpu")
    for name, prefetch in (("fastlm-prefetch", 2), ("fastlm-no-prefetch", 0)):
        loader = BatchLoader(ds, B, T, seed=0, prefetch=prefetch)
        timing = utils.time_call(lambda _: loader.next(), cpu, budget_s=budget)
        loader.close()
        rows.append(_loader_row(name, B, T, timing, env))
    tokens = np.concatenate([np.asarray(s) for s in ds.shards])  # nanoGPT keeps one memmap
    rng = np.random.default_rng(0)

    def nanogpt(_):
        ix = rng.integers(0, tokens.size - T - 1, B)
        x = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    rows.append(_loader_row("nanogpt-style", B, T, utils.time_call(nanogpt, cpu, budget_s=budget),
                            env))
    return rows


def _loader_row(provider: str, B: int, T: int, timing: utils.Timing, env: dict) -> dict:
    per_s = 1e3 / timing.median_ms
    return {"op": OP, "bench": "loader", "provider": provider, "shape": [B, T],
            "median_ms": timing.median_ms, "min_ms": timing.min_ms, "max_ms": timing.max_ms,
            "runs": timing.runs, "batches_per_s": per_s, "tokens_per_s": per_s * B * T, **env}


def run(args) -> list[dict]:
    size = getattr(args, "sizes", None) or "small"
    all_workers = getattr(args, "workers", None) or os.cpu_count() or 1
    budget = getattr(args, "budget", 1.0)
    env = utils.environment(torch.device("cpu"))
    files = corpus(size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastlm-bench-data-") as tmp:
        out = Path(tmp) / "data"
        for near in (True, False):
            for workers in sorted({1, all_workers}):
                rows.append(bench_prepare(files, workers, near, out, env))
                print(f"prepare workers={workers} near_dedup={near}: "
                      f"{rows[-1]['mb_per_s']:.2f} MB/s", file=sys.stderr, flush=True)
        rows += bench_loader(out, size, budget, env)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["bench"] == "prepare":
            lines.append(f"prepare  workers={r['workers']:<3} near_dedup={str(r['near_dedup']):<5} "
                         f"{r['mb']:8.2f} MB  {r['seconds']:7.2f} s  {r['mb_per_s']:7.2f} MB/s")
        else:
            lines.append(f"loader   {r['provider']:<20} B,T={r['shape']}  {r['median_ms']:8.3f} ms  "
                         f"{r['batches_per_s']:9.1f} batches/s  {r['tokens_per_s'] / 1e6:7.2f} "
                         f"Mtok/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench.bench_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", choices=utils.SIZES, default="small")
    p.add_argument("--workers", type=int, default=None, help="the 'all cores' worker count")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed loader runs per row")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    if args.json:
        utils.write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
