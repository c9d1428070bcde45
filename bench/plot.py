"""PNG plots of benchmark rows: time against problem size, one line per provider.

    python -m fastlm.bench --ops layer_norm --sizes medium --plot plots/
    python -m fastlm.bench plot bench/results/<device>/*.json --out plots/

One file per op (<op>.png), one panel per (dtype, mode); the x axis is the problem size (number
of elements of the shape, or the parameter count for adamw_step), both axes logarithmic, each
point labelled by its shape on the axis. matplotlib is optional: without it plot_rows raises
MissingMatplotlib with the install command.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict


class MissingMatplotlib(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("plots need matplotlib, which is not installed: "
                                "pip install matplotlib (or pip install -e '.[dev]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def problem_size(row: dict) -> float:
    if "params" in row:
        return float(row["params"])
    return float(math.prod(row["shape"]))


def series_name(row: dict) -> str:
    return row["provider"] + (" (causal)" if row.get("causal") else "")


def plot_rows(rows: list[dict], out_dir: str) -> list[str]:
    """Write <out_dir>/<op>.png for every op with timed rows; returns the paths written."""
    timed = [r for r in rows if "median_ms" in r and r.get("shape") and "provider" in r]
    if not timed:
        return []
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    by_op = defaultdict(list)
    for r in timed:
        by_op[r["op"]].append(r)
    paths = []
    for op, op_rows in by_op.items():
        panels = sorted({(r.get("dtype", ""), r.get("mode", "")) for r in op_rows})
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
        for ax, (dtype, mode) in zip(axes.flat, panels):
            series = defaultdict(dict)  # name -> size -> (ms, shape label)
            for r in op_rows:
                if (r.get("dtype", ""), r.get("mode", "")) == (dtype, mode):
                    label = "x".join(map(str, r["shape"]))
                    series[series_name(r)][problem_size(r)] = (r["median_ms"], label)
            ticks = {}
            for name, points in sorted(series.items()):
                xs = sorted(points)
                ax.plot(xs, [points[x][0] for x in xs], marker="o", label=name)
                ticks.update({x: points[x][1] for x in xs})
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], rotation=30,
                          fontsize=7)
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_title(f"{op} {dtype} {mode}".strip())
            ax.set_xlabel("shape (by size)")
            ax.set_ylabel("median ms (lower is better)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        device = op_rows[0].get("device", "")
        fig.suptitle(f"{op} on {device}" if device else op)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
