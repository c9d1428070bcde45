"""Build bench/RESULTS.md from the JSON committed under bench/results/.

    python -m fastlm.bench report [--results bench/results] [--out bench/RESULTS.md]

For every device folder: the latest table of each op (the result file whose rows for that op
carry the newest date), with its date, commit, versions and threads, and the latest profiler
report (`python -m fastlm.profile --json`) per preset, dtype and compile setting. The output
depends only on the JSON files, so regenerating without new results changes nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import defaultdict

from fastlm.bench import utils
from fastlm.ops.dispatch import IMPLEMENTED

HERE = os.path.dirname(os.path.abspath(__file__))
AOT = "aot"  # results/aot/: the ahead-of-time resource check (bench/aot_check.py), not a device
KERNEL_COLUMNS = ("provider", "shape", "dtype", "mode", "median ms", "spread", "throughput",
                  "roofline", "vs torch")


def load_results(root: str) -> dict[str, list[tuple[str, object]]]:
    """device folder -> [(path relative to root, parsed JSON)], unreadable files skipped with a
    warning (a half-written file must not stop the report)."""
    out = defaultdict(list)
    for device in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, device)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    out[device].append((os.path.relpath(path, root), json.load(f)))
            except (OSError, json.JSONDecodeError) as exc:
                print(f"report: skipping {path}: {exc}", file=sys.stderr)
    return out


def latest_per_op(files) -> dict[str, tuple[str, list[dict]]]:
    """op -> (file, that file's rows of the op) for the newest file holding the op."""
    best = {}
    for rel, data in files:
        if not isinstance(data, list):
            continue
        by_op = defaultdict(list)
        for r in data:
            if isinstance(r, dict) and "op" in r:
                by_op[r["op"]].append(r)
        for op, rows in by_op.items():
            date = max(str(r.get("date", "")) for r in rows)
            if op not in best or (date, rel) > best[op][0]:
                best[op] = ((date, rel), rel, rows)
    return {op: (rel, rows) for op, (_, rel, rows) in best.items()}


def latest_profiles(files) -> list[tuple[str, dict]]:
    best = {}
    for rel, data in files:
        if isinstance(data, dict) and "tokens_per_s" in data:
            key = (data.get("preset"), data.get("dtype"), data.get("compile"))
            if key not in best or (data.get("date", ""), rel) > (best[key][1].get("date", ""),
                                                                 best[key][0]):
                best[key] = (rel, data)
    return [best[k] for k in sorted(best, key=str)]


def _md_table(header, body) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return lines


def kernel_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        head = [r.get("provider", ""), utils.case_label(r), r.get("dtype", ""), r.get("mode", "")]
        if "median_ms" not in r:
            body.append(head + [f"skipped: {r.get('skipped', '')[:70]}", "", "", "", ""])
            continue
        speed = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else ""
        body.append(head + [f"{r['median_ms']:.4g}", utils.spread(r), utils.throughput(r),
                            utils.roofline_pct(r), speed])
    return _md_table(KERNEL_COLUMNS, body)


def op_section(op: str, rel: str, rows: list[dict]) -> list[str]:
    first = rows[0]
    facts = [f"date {max(str(r.get('date', '')) for r in rows)}",
             f"commit {first.get('commit') or 'unknown'}", f"torch {first.get('torch')}",
             f"threads {first.get('threads')}"]
    if first.get("cuda"):
        facts.append(f"CUDA {first['cuda']}")
    if first.get("driver"):
        facts.append(f"driver {first['driver']}")
    copy = next((r["copy_bw_gbps"] for r in rows if "copy_bw_gbps" in r), None)
    if copy is None:
        copy = next((r["roofline_copy_gbps"] for r in rows if "roofline_copy_gbps" in r), None)
    if copy:
        facts.append(f"copy {copy:.1f} GB/s")
    mm = next((r["matmul_tflops"] for r in rows if "matmul_tflops" in r), None)
    if mm:
        facts.append(f"matmul {mm:.3g} TFLOP/s")
    lines = [f"### {op}", "", f"`{rel}` · " + " · ".join(facts), ""]
    try:  # benches with their own table (tokenizer, data) render it
        module = importlib.import_module(f"fastlm.bench.bench_{op}")
    except ImportError:
        module = None
    custom = getattr(module, "format_table", None)
    if custom is not None:
        lines += ["```", custom(rows), "```"]
    else:
        lines += kernel_table(rows)
    return lines + [""]


def profile_section(profiles) -> list[str]:
    def fmt(v, spec, scale=1.0):
        return "" if v is None else f"{v * scale:{spec}}"

    body = []
    for rel, p in profiles:
        body.append([p.get("preset"), f"{p.get('batch')}x{p.get('seq_len')}", p.get("dtype"),
                     "yes" if p.get("compile") else "no", fmt(p.get("tokens_per_s"), ",.0f"),
                     fmt(p.get("step_ms"), ".1f"), fmt(p.get("mfu"), ".1f", 100),
                     fmt(p.get("peak_memory_bytes"), ",.0f", 2 ** -20),
                     fmt(p.get("power_w"), ".0f"), fmt(p.get("energy_j_per_token"), ".3g"),
                     str(p.get("date", ""))[:10], p.get("commit") or ""])
    header = ("preset", "batch x T", "dtype", "compile", "tokens/s", "step ms", "MFU %",
              "peak MiB", "power W", "J/token", "date", "commit")
    return ["### training steps (`python -m fastlm.profile`)", ""] + _md_table(header, body) + [""]


def aot_section(root: str) -> list[str]:
    """The summary of the ahead-of-time resource check (results/aot/, written by
    `python -m fastlm.bench.aot_check`), if one is committed."""
    path = os.path.join(root, AOT, "summary.json")
    if not os.path.exists(path):
        return []
    from fastlm.bench.aot import report as aot_report

    with open(path) as f:
        summary = json.load(f)
    return ["## Ahead-of-time resource check (sm_80, sm_90; no GPU)", "",
            f"Folder `bench/results/{AOT}/`: full tables in `triton.md` and `cuda.md`.", "",
            aot_report.summary_markdown(summary)]


def build(root: str) -> str:
    lines = ["# Benchmark results", "",
             "Generated by `python -m fastlm.bench report` from the JSON files under "
             "`bench/results/`; do not edit by hand. Each table is the latest run of that op on "
             "that device. Columns: median time, spread (interquartile range / 2 as a share of "
             "the median, or min..max), throughput (GB/s, or TFLOP/s for compute-bound ops), "
             "share of the roofline measured in the same run (copy bandwidth or dense matmul) "
             "and speed-up over the torch provider.", ""]
    results = load_results(root)
    results.pop(AOT, None)  # not a device: its own section below
    if not results:
        lines.append(f"No results yet under {root}.")
    order = {op: i for i, op in enumerate(IMPLEMENTED)}  # fastlm's ops first, in its order
    for device, files in results.items():
        per_op = latest_per_op(files)
        profiles = latest_profiles(files)
        name = next((r.get("device") for _, rows in per_op.values() for r in rows), None)
        if name is None and profiles:
            name = profiles[0][1].get("device")
        lines += [f"## {name or device}", "", f"Folder `bench/results/{device}/`.", ""]
        for op in sorted(per_op, key=lambda o: (order.get(o, len(order)), o)):
            rel, rows = per_op[op]
            lines += op_section(op, rel, rows)
        if profiles:
            lines += profile_section(profiles)
    lines += aot_section(root)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    a = p.parse_args(argv)
    text = build(a.results)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
