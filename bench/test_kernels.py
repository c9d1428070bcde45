"""pytest-benchmark over the same cases and providers as `python -m fastlm.bench`, for regression
tracking with pytest-benchmark's own storage and comparison:

    pytest bench/ --benchmark-only                       # time every (op, provider, mode)
    pytest bench/ --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%
    FASTLM_BENCH_SIZE=medium pytest bench/ --benchmark-only -k layer_norm

Every op of fastlm.ops.IMPLEMENTED is timed: its case comes from bench/bench_<op>.py (make_case +
providers, the first shape of the size), inputs rotate through the harness's cache-defeating sets,
and GPU calls are synchronised so the timer sees the kernel time. A new op needs no line here when
its bench follows the norms' layout (SHAPES, make_case(shape, dtype, device), providers(device));
collection fails loudly when it does not. linear_cross_entropy is left out: its bench measures
each provider's peak memory in a child process, which a pytest-benchmark round cannot do.
"""
import importlib
import itertools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

from fastlm.bench import bench_adamw_step, utils
from fastlm.ops.dispatch import IMPLEMENTED

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZE = os.environ.get("FASTLM_BENCH_SIZE", "small")


def _rows_case(module):
    """(make_case, providers) of a bench in the norms' layout: SHAPES presets of row shapes."""
    shape = module.SHAPES[SIZE][0]
    return (lambda: module.make_case(shape, DTYPE, DEVICE)), module.providers(DEVICE)


def _attention_case(module):
    """Attention's presets are T and D lists; the case is causal self-attention."""
    T, D = module.SIZES[SIZE]["T"][0], module.SIZES[SIZE]["D"][0]
    shape = module.shape_for(T, D, DEVICE)
    return (lambda: module.make_case(shape, DTYPE, True, DEVICE)), module.providers(DEVICE, True)


# Ops whose bench is not in the norms' layout: their case builder, or None where the op is timed
# elsewhere (adamw_step: test_adamw_step below) or not at all (see the module docstring).
OWN_LAYOUT = {"attention": _attention_case, "adamw_step": None, "linear_cross_entropy": None}


def _kernel_cases():
    """(op, make_case, providers) for the ops that go through utils.bench_kernel."""
    out = []
    for op in IMPLEMENTED:
        builder = OWN_LAYOUT.get(op, _rows_case)
        if builder is not None:
            out.append((op, *builder(importlib.import_module(f"fastlm.bench.bench_{op}"))))
    return out


KERNEL_PARAMS = [pytest.param(make, p, mode, id=f"{op}-{p.name}-{mode}")
                 for op, make, providers in _kernel_cases() for p in providers
                 for mode in utils.MODES]


def _timed(benchmark, fn):
    counter = itertools.count()

    def call():
        fn(next(counter))
        utils.synchronize(DEVICE)
    for _ in range(2):  # warm-up: torch.compile, autotuning, allocator (not timed)
        call()
    benchmark(call)


@pytest.mark.parametrize("make_case, provider, mode", KERNEL_PARAMS)
def test_kernel(benchmark, make_case, provider, mode):
    if provider.skip_reason:
        pytest.skip(provider.skip_reason)
    case = make_case()
    sets = utils.input_sets(case.make_inputs, case.bytes_moved["fwd"], DEVICE)
    benchmark.extra_info.update(shape=list(case.shape), dtype=str(DTYPE), mode=mode,
                                bytes_moved=case.bytes_moved[mode], device=str(DEVICE))
    _timed(benchmark, utils._runner(provider.fn, sets, mode))


ADAMW_NAMES = ["torch-foreach", "torch-fused", "fastlm-reference", "fastlm-cpu", "fastlm-cuda",
               "fastlm-triton"]


@pytest.mark.parametrize("name", ADAMW_NAMES)
def test_adamw_step(benchmark, name):
    shape = bench_adamw_step.SHAPES[SIZE][0]
    state = bench_adamw_step.make_state(shape, DTYPE, DEVICE)
    provider = next((p for p in bench_adamw_step.providers(DEVICE, state) if p.name == name),
                    None)
    if provider is None:
        pytest.skip(f"{name}: not available on {DEVICE.type}")
    if provider.skip_reason:
        pytest.skip(provider.skip_reason)
    benchmark.extra_info.update(shape=list(shape), dtype=str(DTYPE), device=str(DEVICE))
    with torch.no_grad():
        _timed(benchmark, lambda _: provider.fn())
