"""Loss and learning-rate plot of a training run: `python -m fastlm.plot RUN_DIR [--out FILE]`.

Reads RUN_DIR/metrics.jsonl (fastlm.train) and writes RUN_DIR/loss.png: train and val loss
against the step (top) and the learning rate (bottom). Needs matplotlib (`pip install
matplotlib`); without it PlotUnavailable says so, and training goes on without a plot.
"""
from __future__ import annotations

import sys
from pathlib import Path

from fastlm.command import run_command
from fastlm.train import logs


class PlotUnavailable(RuntimeError):
    """matplotlib is missing or the run has nothing to plot."""


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotUnavailable(f"{path}: no such file (is {run_dir} a fastlm.train run directory?)")
    rows = logs.read_rows(path)

    def has(row: dict, *keys: str) -> bool:
        return all(isinstance(row.get(k), (int, float)) for k in keys)
    return ([r for r in rows if r.get("kind") == "train" and has(r, "loss", "lr")],
            [r for r in rows if r.get("kind") == "val" and has(r, "val_loss")])


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plot; returns its path."""
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    if not train and not val:
        raise PlotUnavailable(f"{run_dir / 'metrics.jsonl'} holds no train or val rows yet")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed (pip install matplotlib)") from None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         height_ratios=(3, 1))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(run_dir.name)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if train:
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or len(args) not in (1, 3) or (
            len(args) == 3 and args[1] != "--out"):
        print("usage: python -m fastlm.plot RUN_DIR [--out FILE.png]")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        print(plot_run(args[0], args[2] if len(args) == 3 else None))
    except PlotUnavailable as exc:
        print(f"fastlm.plot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
