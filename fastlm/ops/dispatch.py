"""The one op list (IMPLEMENTED) and the one place that picks a backend per op and device (DISPATCH).

Backends:
  reference  fastlm.ops.reference: plain PyTorch in float32, the test oracle
  torch      PyTorch's own fused op (F.layer_norm, SDPA, fused AdamW, ...): the peer to beat
  cpu        C++ kernels in fastlm._C (CPU tensors)
  cuda       CUDA kernels in fastlm._C (CUDA tensors, built where CUDA torch + nvcc exist)
  triton     Triton kernels in fastlm.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)

Choosing one, first match wins:
  1. the `backend=` argument of the call (strict: an unavailable backend raises);
  2. the environment variable FASTLM_BACKEND, either one name for every op that implements it
     ("triton") or per op ("layer_norm=cpu,rms_norm=triton"), or both ("cpu,attention=torch");
  3. set_backend(...) (what the training config's `kernels.backend` calls), same syntax;
  4. DISPATCH below: the fastest available backend for the device, as measured in bench/;
     SMALL_DISPATCH first for calls too small for a kernel's savings to pay (ops say which).
A forced backend that is implemented for the op but unavailable here raises an error that says
why (not built, wrong device, triton missing) and lists what is available.
"""
from __future__ import annotations

import functools
import os

import torch

from fastlm.ops import native, triton_support

BACKENDS = ("reference", "torch", "cpu", "cuda", "triton")

# Which backends each op has at all.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "layer_norm": ("reference", "torch", "cpu", "cuda", "triton"),
    "rms_norm": ("reference", "torch", "cpu", "cuda", "triton"),
    "attention": ("reference", "torch", "cpu", "triton"),
    "cross_entropy": ("reference", "torch", "cpu", "cuda", "triton"),
    "linear_cross_entropy": ("reference", "torch", "cpu", "triton"),
    "adamw_step": ("reference", "torch", "cpu", "cuda", "triton"),
}

# Preference per op and device type: the first available backend wins. Each row is justified by
# a bench/ measurement (the JSON under bench/results/<device>/, summarised in bench/RESULTS.md and
# README "Measured numbers"); change a row only with a number. Triton on CPU is
# the interpreter (a test tool), so it is never chosen automatically there.
DISPATCH: dict[str, dict[str, tuple[str, ...]]] = {
    # cpu rows: C++ norms beat F.layer_norm / F.rms_norm fwd+bwd on CPU (README, "Measured
    # numbers"; bench/results/cpu-amd-epyc).
    # cuda rows: torch first until a GPU run of the CUDA and Triton norms (built and compiled for
    # sm_80/sm_90, never yet run) passes the cuda tests and wins in bench/results.
    "layer_norm": {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda", "triton")},
    "rms_norm": {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda", "triton")},
    # C++ attention fwd+bwd 1.4-2.3x torch SDPA on CPU (T 512..2048, d64, fp32, 1 thread,
    # bench/bench_attention.py). cuda: torch only. Triton awaits a GPU measurement: its pruner
    # now keeps only configs that compile without spills or shared-memory overflow on sm_80 and
    # sm_90 for every dtype and head dim (bench/results/aot, `python -m fastlm.bench.aot_check`),
    # but none has been timed against SDPA's flash kernel yet.
    "attention": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    # cpu rows: bench/results/cpu-amd-epyc (2 cores): C++ cross_entropy 1.6-1.8x F.cross_entropy
    # fwd+bwd, linear_cross_entropy 3.5x faster at 0.11x the peak memory of the materialised path,
    # adamw_step at or above torch's fused AdamW. cuda rows: torch first until a GPU run of the
    # native kernels (tested and benched on a GPU) justifies them: unmeasured on a GPU, not known
    # slower. What issue 23 found against them is fixed ahead of that run: cross_entropy's CUDA
    # and Triton kernels use 16-byte loads/stores for every V, odd ones (GPT-2's 50257)
    # included (checked in their sm_90 PTX by tests/test_cross_entropy.py); confirm with
    # `python -m fastlm.bench --ops cross_entropy` (its rows have V = 50257 and 50304). The
    # Triton adamw_step launches once per dtype group (was once per tensor); it stays out of the
    # cuda row until `--ops adamw_step` (GPT-2 124M's tensors) times it against torch's fused.
    # linear_cross_entropy's Triton dweight no longer takes a (V, D) float32 temporary per chunk.
    "cross_entropy": {"cpu": ("cpu", "torch"), "cuda": ("torch", "triton", "cuda")},
    "linear_cross_entropy": {"cpu": ("cpu", "torch"), "cuda": ("torch", "triton")},
    "adamw_step": {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda")},
}
_OTHER_DEVICES = ("torch", "reference")  # mps, xpu, ...: PyTorch's own ops

# Calls whose op reports them small (see each op) try these rows before DISPATCH's.
# linear_cross_entropy with (N, V) float32 logits of at most SMALL_LOGITS_BYTES: materialising them
# costs little memory, and torch's single GEMM + cross-entropy beats the chunked C++ kernel there
# (2-core CPU, 1 thread, fwd+bwd, D=128: N=768 V=256 fp32 1.2x, bf16 10x; V=1024 1.1x / 3.8x; at
# 12 MiB of logits fp32 the C++ kernel wins, 0.84x). It is the head of nanoGPT's CPU Shakespeare
# run (bench/bench_train.py).
SMALL_DISPATCH: dict[str, dict[str, tuple[str, ...]]] = {
    "linear_cross_entropy": {"cpu": ("torch",)},
}
SMALL_LOGITS_BYTES = 4 << 20

_configured: str = ""  # set_backend(); same syntax as FASTLM_BACKEND


class BackendUnavailableError(RuntimeError):
    """A backend was forced (argument, FASTLM_BACKEND or config) but cannot run here."""


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on tensors of `device`, else why not."""
    if backend not in IMPLEMENTED[op]:
        return f"{op} has no '{backend}' backend (it has: {', '.join(IMPLEMENTED[op])})"
    if backend in ("reference", "torch"):
        return None
    if backend == "cpu":
        return native.cpu_unavailable_reason(device)
    if backend == "cuda":
        return native.cuda_unavailable_reason(device)
    return triton_support.unavailable_reason(device)


def available_backends(op_name: str, device: torch.device | str) -> list[str]:
    """Backends that can run `op_name` on `device`, in BACKENDS order."""
    _check_op(op_name)
    device = torch.device(device)
    return [b for b in IMPLEMENTED[op_name] if unavailable_reason(op_name, b, device) is None]


def set_backend(spec: str) -> None:
    """Force backends from code or config: "" (automatic), "cpu", or "layer_norm=triton,...".
    FASTLM_BACKEND and the backend= argument still take precedence."""
    global _configured
    _parse_spec(spec, "set_backend")  # validate now, not at the first op call
    _configured = spec


@functools.cache
def _parse_spec(spec: str, source: str) -> tuple[str | None, dict[str, str]]:
    """"cpu,attention=torch" -> ("cpu", {"attention": "torch"})."""
    default, per_op = None, {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, backend = item.rpartition("=")
        if backend not in BACKENDS:
            raise ValueError(f"{source}: unknown backend '{backend}' in '{spec}'; "
                             f"choose from {', '.join(BACKENDS)}")
        if not op:
            default = backend
        elif op not in IMPLEMENTED:
            raise ValueError(f"{source}: unknown op '{op}' in '{spec}'; "
                             f"ops are {', '.join(IMPLEMENTED)}")
        else:
            per_op[op] = backend
    return default, per_op


def _forced(op: str) -> str | None:
    for spec, source in ((os.environ.get("FASTLM_BACKEND", ""), "FASTLM_BACKEND"),
                         (_configured, "the kernels.backend config")):
        default, per_op = _parse_spec(spec, source)
        if op in per_op:
            return per_op[op]
        if default in IMPLEMENTED[op]:  # a global choice applies to the ops that have it
            return default
    return None


def select_backend(op: str, device: torch.device, backend: str | None = None,
                   small: bool = False) -> str:
    """The backend that will run `op` on `device` (see the module docstring for the rules);
    small: the call is small by its op's SMALL_DISPATCH rule (only used when nothing is forced)."""
    forced = backend or _forced(op)
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"fastlm.ops.{op}: unknown backend '{forced}'; "
                             f"choose from {', '.join(BACKENDS)}")
        reason = unavailable_reason(op, forced, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"fastlm.ops.{op}: backend '{forced}' cannot run here: {reason}. "
                f"Available for {device}: {', '.join(available_backends(op, device))}")
        return forced
    rows = DISPATCH[op].get(device.type, _OTHER_DEVICES)
    if small:
        rows = SMALL_DISPATCH.get(op, {}).get(device.type, ()) + rows
    for candidate in rows + ("reference",):
        if unavailable_reason(op, candidate, device) is None:
            return candidate
    raise AssertionError("unreachable: the reference backend is always available")


def _check_op(op: str) -> None:
    if op not in IMPLEMENTED:
        raise ValueError(f"unknown op '{op}'; ops are {', '.join(IMPLEMENTED)}")
