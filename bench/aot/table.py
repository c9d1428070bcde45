"""The Triton side of the check: record every launch, compile what the launchers can pick for
sm_80 and sm_90, and turn the results into rows with a verdict."""
from __future__ import annotations

import os
import time

from fastlm.bench.aot import check
from fastlm.bench.aot.capture import ARCHS, Launch, Recorder
from fastlm.bench.aot.compile import Resources, cache_key
from fastlm.bench.aot.pool import compile_all
from fastlm.bench.aot.triton_cases import CASES


def attention_prune(tuner, named_args: dict, kwargs: dict, arch: int) -> list:
    """What kernels.attention's pruner keeps on sm_<arch> for this launch."""
    from fastlm.kernels import attention

    kernel = tuner.fn.__name__.split("_")[-2]  # _attention_{fwd,bwd_dkdv,bwd_dq}_kernel
    try:
        return attention.kept_configs(kernel, tuner.configs, kwargs["BLOCK_D"],
                                      named_args["q_ptr"].element_size(), ARCHS[arch])
    except RuntimeError:  # none kept: every config is listed as pruned (and the CI fails)
        return []


def record(ops=tuple(CASES)) -> Recorder:
    recorder = Recorder(prune=attention_prune)
    with recorder.active():
        for op in ops:
            for case in CASES[op]():
                case()
    return recorder


def constexprs(launch: Launch) -> dict:
    """The launch's compile-time constants by argument name."""
    names = [name for name, _ in launch.signature]
    return {names[path[0]]: value for path, value in launch.constexprs}


def describe(launch: Launch) -> dict:
    """Kernel name, dtype and configuration of a launch, for the table."""
    names = [name for name, _ in launch.signature]
    consts = constexprs(launch)
    div16 = [names[path[0]] for path, attr in launch.attrs
             if attr and not names[path[0]].endswith("_ptr")]
    # The dtype: the first floating-point pointer's (integer ones are tables or targets).
    pointers = [ty for _, ty in launch.signature if ty.startswith(("*fp", "*bf"))]
    config = " ".join(f"{k}={v}" for k, v in consts.items())
    return dict(kernel=launch.kernel.rsplit(".", 1)[-1].strip("_").removesuffix("_kernel"),
                dtype=pointers[0][1:] if pointers else "-",
                config=config + (f" 16|{','.join(div16)}" if div16 else ""),
                num_warps=launch.num_warps, num_stages=launch.num_stages)


def make_row(arch: int, desc: dict, res: Resources | str, pruned: bool,
             seconds: float | None, cached: bool = False) -> dict:
    """A table row from a compile's Resources (or its error message), with its verdict."""
    error = res if isinstance(res, str) else None
    row = dict(arch=f"sm_{arch}", **desc, shared=None if error else res.shared,
               limit=ARCHS[arch], registers=None if error else res.registers,
               spill=None if error else res.spill, stack=None if error else res.stack)
    row["status"] = check.verdict(arch, row["shared"], row["spill"], error, pruned)
    if error:
        row["error"] = error
    row["seconds"] = None if seconds is None else round(seconds, 2)  # of its compile
    row["cached"] = cached
    return row


def triton_table(all_configs: bool = False, processes: int = 2, ops=tuple(CASES),
                 log=print, cache: str | None = None, no_compile: bool = False) -> list[dict]:
    """One row per (launch, arch). Pruned autotune configs are compiled only with
    all_configs (to see what they would need); the CI verdict ignores them either way.
    no_compile: rows only for what `cache` holds, the rest listed as not compiled."""
    recorder = record(ops)
    jobs, rows = [], []
    for launch in recorder.launches:
        for arch in ARCHS:
            pruned = arch in recorder.pruned.get(launch, ())
            if pruned and not all_configs:
                rows.append(dict(arch=f"sm_{arch}", **describe(launch), shared=None,
                                 limit=ARCHS[arch], registers=None, spill=None, stack=None,
                                 status=check.PRUNED, seconds=None, cached=False))
            else:
                jobs.append((launch, arch, True))
    for launch, arch in recorder.none_kept:
        rows.append(dict(arch=f"sm_{arch}", **describe(launch), shared=None, limit=ARCHS[arch],
                         registers=None, spill=None, stack=None, status=check.ERROR,
                         error="the pruner keeps no config for this call", seconds=None,
                         cached=False))
    if no_compile:  # the table from the cache alone: what is not in it is listed, not compiled
        kept = []
        for launch, arch, usage in jobs:
            path = os.path.join(cache, cache_key(launch, arch) + ".json")
            if os.path.exists(path):
                kept.append((launch, arch, usage))
            else:
                rows.append(dict(arch=f"sm_{arch}", **describe(launch), shared=None,
                                 limit=ARCHS[arch], registers=None, spill=None, stack=None,
                                 status=check.NOT_COMPILED, seconds=None, cached=False))
        jobs = kept
    log(f"{len(recorder.launches)} launches recorded; compiling {len(jobs)} for "
        f"sm_{'/sm_'.join(map(str, ARCHS))} on {processes} processes")
    start = time.perf_counter()
    for i, (launch, arch, res, seconds, cached) in enumerate(
            compile_all(jobs, processes, cache)):
        row = make_row(arch, describe(launch), res, arch in recorder.pruned.get(launch, ()),
                       seconds, cached)
        rows.append(row)
        if (i + 1) % 100 == 0 or row["status"] in check.FAILING:
            log(f"[{i + 1}/{len(jobs)} {time.perf_counter() - start:.0f} s] {row['arch']} "
                f"{row['kernel']} {row['dtype']} {row['config']} w{row['num_warps']}: "
                f"{row['status']}")
    return rows
