"""pytest-benchmark over the same cases and providers as `python -m fastlm.bench`, for regression
tracking with pytest-benchmark's own storage and comparison:

    pytest bench/ --benchmark-only                       # time every (op, provider, mode)
    pytest bench/ --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%
    FASTLM_BENCH_SIZE=medium pytest bench/ --benchmark-only -k layer_norm

Cases come from each bench_<op>.py (make_case + providers, the first shape of the size), inputs
rotate through the harness's cache-defeating sets, and GPU calls are synchronised so the timer
sees the kernel time. linear_cross_entropy is left out: its bench measures each provider's peak
memory in a child process, which a pytest-benchmark round cannot do.
"""
import itertools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark")

from fastlm.bench import (
    bench_adamw_step,
    bench_attention,
    bench_cross_entropy,
    bench_layer_norm,
    bench_rms_norm,
    utils,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZE = os.environ.get("FASTLM_BENCH_SIZE", "small")


def _kernel_cases():
    """(op, case, providers) for the ops that go through utils.bench_kernel."""
    out = []
    for module in (bench_layer_norm, bench_rms_norm, bench_cross_entropy):
        shape = module.SHAPES[SIZE][0]
        out.append((module.OP, lambda m=module, s=shape: m.make_case(s, DTYPE, DEVICE),
                    module.providers(DEVICE)))
    T, D = bench_attention.SIZES[SIZE]["T"][0], bench_attention.SIZES[SIZE]["D"][0]
    shape = bench_attention.shape_for(T, D, DEVICE)
    out.append(("attention", lambda: bench_attention.make_case(shape, DTYPE, True, DEVICE),
                bench_attention.providers(DEVICE, True)))
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
