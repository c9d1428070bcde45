"""Compile many launches on a process pool (compiles are single-threaded CPU work).

Each worker compiles with its own empty Triton cache, so the PTX-only artefacts (the cubin step
is skipped) never land in the cache a real GPU run reads. With a results cache folder, a launch
whose cache_key (the kernel's source hash, triton and ptxas versions, arch, options) was
compiled before is read from there instead: an edited kernel always recompiles.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from fastlm.bench.aot.capture import Launch
from fastlm.bench.aot.compile import Resources, cache_key, compile_launch


def _init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlm-aot-")


def _one(job: tuple[Launch, int, bool, str | None]
         ) -> tuple[Launch, int, Resources | str, float | None, bool]:
    launch, arch, usage, cache = job
    start = time.perf_counter()
    path = os.path.join(cache, cache_key(launch, arch) + ".json") if cache else None
    if path and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)  # Resources, then the seconds its compile took
        return launch, arch, Resources(*data[:4]), data[4] if len(data) > 4 else None, True
    try:
        res: Resources | str = compile_launch(launch, arch, usage)
    except Exception as exc:  # noqa: BLE001  (a failed compile is a table row, not a crash)
        return launch, arch, (f"{type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}")[:300], None, False
    seconds = time.perf_counter() - start
    if path and usage:
        with tempfile.NamedTemporaryFile("w", dir=cache, delete=False) as f:
            json.dump([*res, round(seconds, 2)], f)
        os.replace(f.name, path)
    return launch, arch, res, seconds, False


def compile_all(jobs: Iterable[tuple[Launch, int, bool]], processes: int = 2,
                cache: str | None = None
                ) -> Iterator[tuple[Launch, int, Resources | str, float | None, bool]]:
    """(launch, arch, usage) jobs -> (launch, arch, Resources or the compile error, seconds the
    compile took (None if unknown), whether it was read from `cache`), in the jobs' order."""
    if cache:
        os.makedirs(cache, exist_ok=True)
    with ProcessPoolExecutor(processes, initializer=_init) as pool:
        yield from pool.map(_one, [(*job, cache) for job in jobs], chunksize=1)
