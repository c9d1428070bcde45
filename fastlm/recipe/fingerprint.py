"""Stage records: what a stage was run with and what it made, so a rerun knows what to redo.

A stage's fingerprint is the sha256 of its settings (its recipe section, the device and seed)
and of its inputs: the records its upstream stages wrote (which hold the sha256 of the files
they made) and, for the data stage, each input file's size and modification time. A stage whose
fingerprint equals its finished record's is skipped; any other is redone, and so, through their
fingerprints, is everything downstream of it.

    DIR/<stage>/started.json  {"fingerprint"}: written when the stage starts (a stage that
                              resumes its own work, pretraining, checks it)
    DIR/<stage>/stage.json    {"stage", "fingerprint", "outputs", "metrics"}: written, atomically,
                              only when the stage finished
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

RECORD = "stage.json"
STARTED = "started.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_info(path: str | Path) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file a stage made (the report lists them)."""
    path = Path(path)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def fingerprint(settings: Any, upstream: dict[str, dict], files: list[str] = ()) -> str:
    """sha256 over settings, the upstream stages' outputs and (size, mtime) of input files."""
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([str(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"settings": settings,
                       "upstream": {name: rec.get("outputs") for name, rec in upstream.items()},
                       "files": stats}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read(stage_dir: Path, name: str = RECORD) -> dict | None:
    path = stage_dir / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent, or cut short by a crash: the stage did not finish


def mark_started(stage_dir: Path, fp: str) -> None:
    _write(stage_dir / STARTED, {"fingerprint": fp})


def finish(stage_dir: Path, record: dict) -> None:
    _write(stage_dir / RECORD, record)
