"""The verdict on each compiled configuration, and which verdicts fail the CI check.

A configuration fails when its launcher can pick it and, compiled for the architecture, it
spills registers to local memory, needs more shared memory than one block may use, or does not
compile. Configurations an autotuner's pruner drops before launch are listed, not failed.
"""
from __future__ import annotations

from fastlm.bench.aot.capture import ARCHS

OK, SPILL, OVER, ERROR, PRUNED = "ok", "SPILL", "OVER-LIMIT", "ERROR", "pruned"
NOT_COMPILED = "not compiled"  # only in a table written from the cache alone (--no-compile)
FAILING = (SPILL, OVER, ERROR)


def verdict(arch: int, shared: int | None, spill: int | None, error: str | None = None,
            pruned: bool = False) -> str:
    """One configuration's verdict on sm_<arch> (spill: bytes per thread, -1 if not measured)."""
    if pruned:
        return PRUNED
    if error:
        return ERROR
    if shared is not None and shared > ARCHS[arch]:
        return OVER
    if spill is not None and spill > 0:
        return SPILL
    return OK


def failures(rows: list[dict]) -> list[dict]:
    """The rows that fail the check (each row carries its "status" from verdict)."""
    return [r for r in rows if r["status"] in FAILING]
