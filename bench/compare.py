"""Compare two benchmark runs: which rows got slower (regressions) or faster.

    python -m fastlm.bench compare OLD.json NEW.json [--threshold 0.1]
    python -m fastlm.bench --ops layer_norm --compare OLD.json     (a fresh run against OLD)

Rows are matched by op, provider, shape, dtype and mode, plus the fields that tell cases of one
op apart (attention's causal flag, the tokenizer's kind, vocabulary and threads, the data
bench's workers). The time compared is median_ms (seconds for rows that only have seconds). A
row is a regression when new / old > 1 + threshold; the exit status is 1 when there is at least
one.
"""
from __future__ import annotations

import argparse
import json
import sys

KEY_FIELDS = ("op", "provider", "shape", "dtype", "mode")
CASE_FIELDS = ("causal", "kind", "vocab", "threads", "bench", "workers", "near_dedup")


def row_key(row: dict) -> tuple:
    key = []
    for name in KEY_FIELDS + CASE_FIELDS:
        value = row.get(name)
        key.append(tuple(value) if isinstance(value, list) else value)
    return tuple(key)


def row_time_ms(row: dict) -> float | None:
    if "median_ms" in row:
        return row["median_ms"]
    if "seconds" in row:
        return 1e3 * row["seconds"]
    return None


def load(path: str) -> list[dict]:
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise SystemExit(f"{path}: not a benchmark result (expected a JSON list of rows)")
    return rows


def compare(old: list[dict], new: list[dict], threshold: float = 0.10) -> list[dict]:
    """One entry per row timed in both runs: key, old_ms, new_ms, ratio (new / old) and status
    'regression', 'faster' or 'same'."""
    before = {row_key(r): r for r in old if row_time_ms(r)}
    out = []
    for r in new:
        t_new, prev = row_time_ms(r), before.get(row_key(r))
        if not t_new or prev is None:
            continue
        ratio = t_new / row_time_ms(prev)
        status = ("regression" if ratio > 1 + threshold
                  else "faster" if ratio < 1 / (1 + threshold) else "same")
        out.append({"op": r.get("op"), "provider": r.get("provider"), "shape": r.get("shape"),
                    "dtype": r.get("dtype"), "mode": r.get("mode"), "causal": r.get("causal"),
                    "old_ms": row_time_ms(prev), "new_ms": t_new, "ratio": ratio,
                    "status": status})
    return out


def _label(e: dict) -> str:
    shape = "x".join(map(str, e["shape"] or []))
    parts = [e["op"], e["provider"], shape + (" causal" if e.get("causal") else ""),
             e["dtype"], e["mode"]]
    return " ".join(str(p) for p in parts if p)


def report(old: list[dict], new: list[dict], threshold: float = 0.10, out=None) -> int:
    """Print the regressions (and a count of the rest); 1 if any row regressed, else 0."""
    out = out or sys.stdout
    entries = compare(old, new, threshold)
    devices = ({r.get("device") for r in old if "device" in r},
               {r.get("device") for r in new if "device" in r})
    if devices[0] and devices[1] and devices[0] != devices[1]:
        print(f"note: comparing across devices ({', '.join(sorted(map(str, devices[0])))} -> "
              f"{', '.join(sorted(map(str, devices[1])))})", file=out)
    if not entries:
        print("compare: no row of the new run matches a timed row of the old one", file=out)
        return 0
    bad = [e for e in entries if e["status"] == "regression"]
    faster = [e for e in entries if e["status"] == "faster"]
    print(f"\ncompare: {len(entries)} matched rows, {len(bad)} slower than "
          f"{100 * threshold:.0f}% (regressions), {len(faster)} faster", file=out)
    for e in sorted(bad, key=lambda e: -e["ratio"]):
        print(f"  REGRESSION {_label(e)}: {e['old_ms']:.4g} -> {e['new_ms']:.4g} ms "
              f"({e['ratio']:.2f}x)", file=out)
    for e in sorted(faster, key=lambda e: e["ratio"]):
        print(f"  faster     {_label(e)}: {e['old_ms']:.4g} -> {e['new_ms']:.4g} ms "
              f"({e['ratio']:.2f}x)", file=out)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="relative slow-down that counts as a regression (0.10 = 10%%)")
    a = p.parse_args(argv)
    return report(load(a.old), load(a.new), a.threshold)


if __name__ == "__main__":
    sys.exit(main())
