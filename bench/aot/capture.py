"""Record the kernel launches fastlm's Triton launchers make, without running them.

The launchers are called on small CPU tensors with the interpreter off; every
`kernel[grid](...)` they reach is recorded as a Launch (the signature, constexprs, alignment
attributes and options Triton would compile for those arguments on a GPU) instead of being
compiled and run. The configurations compiled ahead of time are therefore the ones the launchers
pick, read from the launchers themselves, never a copy of their heuristics. Autotuned kernels
are recorded once per autotune config (the autotuner's own list) with `pruned` saying whether
the kernel's pruner would drop it on the target.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

# Shared memory one block may use (opt-in maximum), bytes: A100 (sm_80) and H100 (sm_90).
ARCHS = {80: 163 * 1024, 90: 227 * 1024}


class Launch(NamedTuple):
    """One compile: kernel function, its specialisation and options (hashable: the dedup key)."""
    kernel: str        # module.name of the @triton.jit function
    signature: tuple   # ((arg name, type), ...)
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple       # ((path, attribute), ...): 16-byte divisibility Triton specialises on
    num_warps: int
    num_stages: int
    autotune: str      # the autotune config ("" if the kernel is not autotuned)


def _freeze(x: Any) -> Any:
    """Dicts and lists (Triton's constexpr and attribute maps) as nested sorted tuples."""
    if isinstance(x, dict):
        return tuple(sorted((k if not isinstance(k, list) else tuple(k), _freeze(v))
                            for k, v in x.items()))
    if isinstance(x, list):
        return tuple(_freeze(v) for v in x)
    return x


class Recorder:
    """Patches JITFunction.run and Autotuner.run while active; `launches` collects what the
    launchers asked for, with the pruner's verdict per target arch for autotuned kernels."""

    def __init__(self, prune: Callable[[Autotuner, dict, dict, int], list] | None = None):
        """prune(autotuner, named args, constexpr kwargs, arch) -> the configs kept on sm_<arch>
        (None: keep all)."""
        self.launches: dict[Launch, None] = {}  # ordered set
        self.pruned: dict[Launch, set] = {}     # launch -> archs whose pruner drops it
        self.none_kept: list = []  # (a launch, arch) where the pruner keeps no config at all
        self._prune = prune
        # Any CUDA target gives the same binder (specialisation is arch-independent).
        self._backend = make_backend(GPUTarget("cuda", 90, 32))
        self._binders: dict[int, Any] = {}

    def _record(self, fn: JITFunction, args, kwargs, autotune: str = "") -> Launch:
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = self._binders[id(fn)] = create_function_from_signature(
                fn.signature, fn.params, self._backend)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self._backend, kwargs, bound, specialization, options)
        launch = Launch(f"{fn.module}.{fn.__name__}", tuple(signature.items()),
                        _freeze(constexprs), _freeze(attrs), options.num_warps,
                        options.num_stages, autotune)
        self.launches.setdefault(launch)
        return launch

    def _autotuned(self, tuner: Autotuner, args, kwargs):
        named = dict(zip(tuner.arg_names, args))
        kept = {arch: self._prune(tuner, named, kwargs, arch) if self._prune else tuner.configs
                for arch in ARCHS}
        for i, config in enumerate(tuner.configs):
            launch = self._record(tuner.fn, args, {**kwargs, **config.all_kwargs()}, str(config))
            for arch in ARCHS:
                if config not in kept[arch]:
                    self.pruned.setdefault(launch, set()).add(arch)
                if i == 0 and not kept[arch]:
                    self.none_kept.append((launch, arch))

    @contextlib.contextmanager
    def active(self):
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("fastlm.bench.aot compiles kernels: unset TRITON_INTERPRET")
        from fastlm.ops import triton_support

        recorder = self
        saved = JITFunction.run, Autotuner.run, triton_support.unavailable_reason

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder._record(fn, args, kwargs)

        def tuner_run(tuner, *args, **kwargs):
            recorder._autotuned(tuner, args, {k: v for k, v in kwargs.items() if k != "grid"})

        JITFunction.run, Autotuner.run = jit_run, tuner_run
        triton_support.unavailable_reason = lambda device: None  # CPU tensors stand in for GPU ones
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run, triton_support.unavailable_reason = saved
