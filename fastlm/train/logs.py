"""A training run's logs: RUN_DIR/metrics.jsonl and the same rows as TensorBoard scalars.

MetricsLog appends each row (a dict with kind, step and fields) to metrics.jsonl and hands it to
a TensorBoardLog when there is one. There every numeric field except step and time_s becomes the
scalar KIND/FIELD at that step: train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/mfu (GPU runs; a null MFU, unknown, is left out rather than written as 0), train/skipped,
val/val_loss, val/val_bpb. The event files go to RUN_DIR/tensorboard/ (rank 0 only), so

    tensorboard --logdir runs/

shows every run under its directory name. read_rows() reads metrics.jsonl back, skipping a line
a kill tore (the last one, half-written); trim() drops the rows a resumed run will write again.
Optional: it needs the tensorboard package
(`pip install tensorboard`), whose writer torch.utils.tensorboard wraps; without it training
goes on and says once why there is no TensorBoard log. Switched off with
--train.tensorboard=false.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_NOT_SCALARS = ("step", "time_s")  # the x axis, and wall time (TensorBoard records its own)


def unavailable_reason() -> str | None:
    """None if TensorBoard event files can be written here, else why not."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:  # torch raises this when the tensorboard package is missing
        return f"{exc} (pip install tensorboard)"
    return None


class TensorBoardLog:
    """Writes metrics rows as scalars; flushes every few seconds and on close()."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # flush_secs: a run that is killed loses at most the last few seconds of scalars
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=5)

    def write(self, row: dict) -> None:
        kind, step = row.get("kind", "train"), row["step"]
        for key, value in row.items():
            if key in _NOT_SCALARS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):  # NaN/inf too: a diverging norm shows
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def open_log(run_dir: str | Path, enabled: bool) -> tuple[TensorBoardLog | None, str]:
    """(the writer or None, one line for the run's header saying where it writes or why not)."""
    if not enabled:
        return None, "off (--train.tensorboard=false)"
    reason = unavailable_reason()
    if reason is not None:
        return None, f"skipped: {reason}"
    log = TensorBoardLog(Path(run_dir) / "tensorboard")
    return log, str(log.log_dir)


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (rank 0; others pass None).
    Each write opens and closes the file, so a crash never loses a line or a handle. The same
    rows go to TensorBoard when a TensorBoardLog is given."""

    def __init__(self, path: Path | None, tensorboard: TensorBoardLog | None = None):
        self.path = path
        self.tensorboard = tensorboard

    def write(self, **row) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(row)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl: JSON objects with an integer step; a line that is not one
    (torn by a kill mid-write, or edited) is skipped rather than failing the plot or resume."""
    rows = []
    for line in Path(path).read_bytes().decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def trim(path: str | Path, through_step: int | None) -> None:
    """Keep the rows up to through_step (None: none), written whole through a rename: a resumed
    run rewrites the steps after its checkpoint, and a torn last line must not swallow the
    next row appended to it."""
    path = Path(path)
    if not path.exists():
        return
    keep = [] if through_step is None else [r for r in read_rows(path)
                                            if r["step"] <= through_step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
