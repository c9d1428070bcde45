"""PNG plots of benchmark rows: time against problem size, one line per provider.

    python -m fastlm.bench --ops layer_norm --sizes medium --plot plots/
    python -m fastlm.bench plot bench/results/<device>/*.json --out plots/

One file per op (<op>.png), one panel per (dtype, mode); the x axis is the problem size (number
of elements of the shape, the parameter count for adamw_step, the sequence length T for
attention, whose lines are per provider, head size and mask), both axes logarithmic, each point
labelled by its shape on the axis. matplotlib is optional: without it plot_rows raises
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
    if row.get("op") == "attention":  # (B, H, T, D) at constant B*T and H*D on a GPU: x = T
        return float(row["shape"][2])
    if "params" in row:
        return float(row["params"])
    return float(math.prod(row["shape"]))


def series_name(row: dict) -> str:
    """One line per provider, and per case that is not a size (attention: head size, mask)."""
    name = row["provider"]
    if row.get("op") == "attention":
        name += f" d{row['shape'][3]}"
    return name + (" causal" if row.get("causal") else "")


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
        mode_order = {m: i for i, m in enumerate(("fwd", "bwd", "full", "step"))}
        panels = sorted({(r.get("dtype", ""), r.get("mode", "")) for r in op_rows},
                        key=lambda p: (p[0], mode_order.get(p[1], 9), p[1]))
        providers = sorted({r["provider"] for r in op_rows})
        colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(providers)}
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(7.5 * cols, 4.5 * nrows), squeeze=False)
        for ax, (dtype, mode) in zip(axes.flat, panels):
            series = defaultdict(dict)  # name -> size -> (ms, shape label)
            style = {}  # name -> colour by provider, dashed for causal, marker by head size
            for r in op_rows:
                if (r.get("dtype", ""), r.get("mode", "")) == (dtype, mode):
                    label = "x".join(map(str, r["shape"]))
                    name = series_name(r)
                    series[name][problem_size(r)] = (r["median_ms"], label)
                    style[name] = {"color": colors[r["provider"]],
                                   "linestyle": "--" if r.get("causal") else "-",
                                   "marker": "s" if r["op"] == "attention"
                                   and r["shape"][3] > 64 else "o"}
            ticks = {}
            for name, points in sorted(series.items()):
                xs = sorted(points)
                ax.plot(xs, [points[x][0] for x in xs], label=name, markersize=4, **style[name])
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
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
