"""`python -m fastlm.bench dispatch RESULTS.json [...]`: bench rows -> proposed DISPATCH rows.

    python -m fastlm.bench dispatch OUT/b.json [more.json ...] [--mode full] [--tests FILE]

Reads kernel bench rows (what `python -m fastlm.bench --json` and `bench/gpu_check.sh --stage b`
write) and, per op, device type and dtype, names the fastest backend fastlm.ops can dispatch to
with the number behind it: its median time and its speed-up over the backend DISPATCH picks
today. Then it prints each measured op's DISPATCH line, ready to paste into
fastlm/ops/dispatch.py: the measured backends fastest first (by the geometric mean of their
speed-up over today's choice across the dtypes and shapes measured), then the backends it did
not measure in today's order, so a fallback is never lost.

Only rows that are dispatchable count: `torch` (torch's own op; for adamw_step the fused AdamW,
`torch-fused`) and `fastlm-<backend>`. Peers fastlm cannot dispatch to (torch.compile, Liger,
variants such as `-inplace`) are shown for context. `--tests` takes the junit XML of a test run or
the summary.json of `bench/gpu_check.sh --stage a`: a backend with a failed test on that device
type is never proposed (fastest *correct* backend), and the output says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

from fastlm.ops.dispatch import BACKENDS, DISPATCH, IMPLEMENTED

# The bench provider that is the `torch` backend of an op, where it is not called "torch".
TORCH_PROVIDER = {"adamw_step": "torch-fused"}
DEFAULT_MODE = "full"  # forward + backward: what training runs


def backend_of(op: str, provider: str) -> str | None:
    """The fastlm.ops backend a bench provider measures, or None for a peer it cannot dispatch to
    (and for the reference, the test oracle, which DISPATCH never lists)."""
    if provider == TORCH_PROVIDER.get(op, "torch"):
        return "torch"
    name = provider.removeprefix("fastlm-")
    if provider.startswith("fastlm-") and name in IMPLEMENTED.get(op, ()) and name != "reference":
        return name
    return None


def load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"dispatch: cannot read bench rows from {path}: {exc}")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise SystemExit(f"dispatch: {path} is not a list of bench rows (JSON objects)")
        rows += data
    return rows


def timed(rows: list[dict]) -> list[dict]:
    """Rows of fastlm's ops that carry a time (skipped providers carry a reason instead); of
    rows measuring the same thing (op, provider, device, dtype, shape, mode) the newest by date
    wins, so a re-run supersedes an older file."""
    newest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("op") not in IMPLEMENTED or "skipped" in r or not isinstance(
                r.get("median_ms"), (int, float)) or r["median_ms"] <= 0:
            continue
        key = (r["op"], r.get("provider"), r.get("device_type", "cpu"), r.get("device"),
               r.get("dtype"), str(r.get("shape")), r.get("mode"))
        if key not in newest or str(r.get("date", "")) >= str(newest[key].get("date", "")):
            newest[key] = r
    return list(newest.values())


def pick_mode(rows: list[dict], op: str, wanted: str) -> str | None:
    """The mode whose rows decide `op`: `wanted` when measured, else the op's only mode (e.g.
    adamw_step's 'step')."""
    modes = {r.get("mode") for r in rows if r["op"] == op}
    if wanted in modes:
        return wanted
    return next(iter(modes)) if len(modes) == 1 else None


# ---------------------------------------------------------------------------------------------
# Test results: which (op, device type, backend) failed
def failed_backends(path: str) -> dict[tuple[str, str], set[str]]:
    """(op, device type) -> backends with a failed or erroring test, from a junit XML file or a
    gpu_check summary.json (whose stage a lists its failed test ids)."""
    if path.endswith(".json"):
        with open(path) as f:
            summary = json.load(f)
        ids = [t["id"] for run in summary.get("a", {}).get("tests", [])
               for t in run.get("failures", [])]
    else:
        ids = []
        for case in ET.parse(path).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                module = case.get("classname", "").rpartition(".")[2]
                ids.append(f"{module}.py::{case.get('name', '')}")
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for test_id in ids:
        parsed = parse_test_id(test_id)
        if parsed:
            op, device, backends = parsed
            out[(op, device)].update(backends)
    return out


def parse_test_id(test_id: str) -> tuple[str, str, set[str]] | None:
    """'tests/test_layer_norm.py::test_matches_reference[cuda-triton-torch.bfloat16-(1, 7)]' ->
    ('layer_norm', 'cuda', {'triton'}). The device fixture comes first in the parameters; a test
    named after a backend (test_triton_matches_reference) names it too."""
    path, _, name = test_id.partition("::")
    op = os.path.basename(path).removeprefix("test_").removesuffix(".py")
    if op not in IMPLEMENTED:
        return None
    func, _, params = name.partition("[")
    tokens = params.rstrip("]").split("-") if params else []
    devices = [t for t in tokens if t in ("cpu", "cuda")]
    if not devices:
        return None
    device = devices[0]
    tokens.remove(device)
    backends = {t for t in tokens if t in BACKENDS}
    backends |= {b for b in BACKENDS if f"test_{b}_" in func + "_"}
    return op, device, backends & set(IMPLEMENTED[op])


# ---------------------------------------------------------------------------------------------
# The proposal
def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def propose(rows: list[dict], mode: str = DEFAULT_MODE,
            failed: dict[tuple[str, str], set[str]] | None = None) -> list[dict]:
    """One proposal per (op, device type) that has timed dispatchable rows:
    {op, device, mode, current, row, cases: [...], excluded: {backend: why}, peers: [...]}."""
    failed = failed or {}
    rows = timed(rows)
    proposals = []
    for op in IMPLEMENTED:
        chosen = pick_mode(rows, op, mode)
        if chosen is None:
            continue
        by_device: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["op"] == op and r.get("mode") == chosen:
                by_device[r.get("device_type", "cpu")].append(r)
        for device, dev_rows in sorted(by_device.items()):
            p = _propose_one(op, device, chosen, dev_rows, failed.get((op, device), set()))
            if p:
                proposals.append(p)
    return proposals


def _propose_one(op, device, mode, rows, failed) -> dict | None:
    current_row = DISPATCH[op].get(device, ("torch",))
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)  # (dtype, shape) -> backend -> ms
    peers: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        key = (r.get("dtype"), "x".join(map(str, r.get("shape", []))))
        backend = backend_of(op, r["provider"])
        target = cases if backend else peers
        name = backend or r["provider"]
        target[key][name] = r["median_ms"]
    excluded = {b: "a test failed on this device" for b in failed
                if any(b in c for c in cases.values())}
    measured = {b for c in cases.values() for b in c} - set(excluded)
    if not measured:
        return None
    # Today's choice among what was measured: the first of DISPATCH's row that has times.
    current = next((b for b in current_row if b in measured), None)
    speedups: dict[str, list[float]] = defaultdict(list)
    per_case = []
    for (dtype, shape), times in sorted(cases.items()):
        ok = {b: ms for b, ms in times.items() if b in measured}
        if not ok:
            continue
        best = min(ok, key=ok.get)
        base = ok.get(current)
        if base is not None:
            for b, ms in ok.items():
                speedups[b].append(base / ms)
        peer_times = peers.get((dtype, shape), {})
        best_peer = min(peer_times, key=peer_times.get) if peer_times else None
        per_case.append({"dtype": dtype, "shape": shape, "best": best, "best_ms": ok[best],
                         "current": current, "current_ms": base,
                         "speedup_vs_current": None if base is None else base / ok[best],
                         "times": ok, "best_peer": best_peer,
                         "best_peer_ms": peer_times.get(best_peer)})
    score = {b: geomean(v) for b, v in speedups.items()}
    ranked = sorted(measured, key=lambda b: (-score.get(b, 0.0), current_row.index(b)
                                             if b in current_row else len(BACKENDS)))
    unmeasured = [b for b in current_row if b not in ranked and b not in excluded]
    return {"op": op, "device": device, "mode": mode, "current": current,
            "current_row": list(current_row), "row": ranked + unmeasured,
            "speedup_geomean": score, "cases": per_case, "excluded": excluded}


# ---------------------------------------------------------------------------------------------
# Output
def _fmt_ms(ms: float) -> str:
    return f"{ms:.4g} ms"


def dispatch_line(op: str, rows_by_device: dict[str, list[str]]) -> str:
    """A DISPATCH entry in dispatch.py's own style: '"op": {"cpu": ("cpu", "torch"), ...},'."""
    parts = []
    for device, row in rows_by_device.items():
        inner = ", ".join(f'"{b}"' for b in row) + ("," if len(row) == 1 else "")
        parts.append(f'"{device}": ({inner})')
    return f'    "{op}": {{{", ".join(parts)}}},'


def render(proposals: list[dict], rows: list[dict], sources: list[str]) -> str:
    env = next((r for r in timed(rows)), {})
    files = sources[0] if len(sources) == 1 else f"{len(sources)} files"
    lines = [(f"# Proposed from {files}: {len(timed(rows))} timed rows on "
              f"{env.get('device', '?')} (torch {env.get('torch', '?')}, triton "
              f"{env.get('triton', '?')}, commit {env.get('commit', '?')}, "
              f"{env.get('date', '?')})")]
    by_op: dict[str, list[dict]] = defaultdict(list)
    for p in proposals:
        by_op[p["op"]].append(p)
    for op, props in by_op.items():
        lines.append("")
        for p in props:
            changed = "unchanged" if p["row"] == p["current_row"] else \
                f"was {tuple(p['current_row'])}"
            lines.append(f"    # {op} on {p['device']}, mode {p['mode']} ({changed}):")
            for c in p["cases"]:
                vs = "" if c["speedup_vs_current"] is None or c["best"] == c["current"] else \
                    f", {c['speedup_vs_current']:.2f}x {c['current']} ({_fmt_ms(c['current_ms'])})"
                peer = "" if c["best_peer"] is None else \
                    f"; fastest other provider {c['best_peer']} {_fmt_ms(c['best_peer_ms'])}"
                lines.append(f"    #   {c['dtype']} {c['shape']}: {c['best']} "
                             f"{_fmt_ms(c['best_ms'])}{vs}{peer}")
            for b, why in sorted(p["excluded"].items()):
                lines.append(f"    #   {b} left out: {why}")
        rows_by_device = {d: list(r) for d, r in DISPATCH[op].items()}
        for p in props:
            rows_by_device[p["device"]] = p["row"]
        lines.append(dispatch_line(op, rows_by_device))
    if not proposals:
        lines.append("# no timed rows of fastlm's ops with a dispatchable provider "
                     f"(torch or fastlm-<backend>); ops: {', '.join(IMPLEMENTED)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.bench dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="bench JSON files (lists of rows)")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=("fwd", "bwd", "full"),
                   help="which mode decides (default full: forward + backward); an op measured "
                        "in one mode only (adamw_step: step) uses that one")
    p.add_argument("--tests", default=None, metavar="JUNIT.xml|summary.json",
                   help="leave out backends with a failed test on the device")
    p.add_argument("--json", default=None, help="also write the proposals as JSON here")
    a = p.parse_args(argv)
    rows = load_rows(a.files)
    failed = None
    if a.tests:
        if not os.path.isfile(a.tests):
            p.error(f"--tests: no such file {a.tests}")
        try:
            failed = failed_backends(a.tests)
        except (ET.ParseError, json.JSONDecodeError, KeyError, TypeError) as exc:
            p.error(f"--tests: {a.tests} is neither junit XML nor a gpu_check summary: {exc}")
    proposals = propose(rows, a.mode, failed)
    print(render(proposals, rows, a.files))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(proposals, f, indent=1)
    return 0 if proposals else 1


if __name__ == "__main__":
    sys.exit(main())
