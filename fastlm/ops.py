"""fastlm's public ops and the one place that picks a backend per op and device.

Backends:
  reference  fastlm.reference: plain PyTorch in float32, the test oracle
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
import math
import os

import torch
import torch.nn.functional as F

from fastlm import native, opdefs, reference

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
# a bench/ measurement (README, "Dispatch"); change a row only with a number. Triton on CPU is
# the interpreter (a test tool), so it is never chosen automatically there.
DISPATCH: dict[str, dict[str, tuple[str, ...]]] = {
    # cpu rows: C++ norms beat F.layer_norm / F.rms_norm fwd+bwd on CPU (README, "Dispatch").
    # cuda rows: torch first until a GPU run of the CUDA and Triton norms (built and compiled for
    # sm_80/sm_90, never yet run) passes the cuda tests and wins in bench/results.
    "layer_norm": {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda", "triton")},
    "rms_norm": {"cpu": ("cpu", "torch"), "cuda": ("torch", "cuda", "triton")},
    # C++ attention fwd+bwd 1.4-2.3x torch SDPA on CPU (T 512..2048, d64, fp32, 1 thread,
    # bench/bench_attention.py); Triton on CUDA awaits a GPU measurement.
    "attention": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    # cpu rows: bench/results/cpu-amd-epyc (2 cores): C++ cross_entropy 1.6-1.8x F.cross_entropy
    # fwd+bwd, linear_cross_entropy 3.5x faster at 0.11x the peak memory of the materialised path,
    # adamw_step at or above torch's fused AdamW. cuda rows: torch first until a GPU run of the
    # native kernels (tested and benched on a GPU) justifies them.
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
    return native.triton_unavailable_reason(device)


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


def _native(op: str, backend: str, direction: str = "fwd"):
    """torch.ops handle of a native backend: fastlm::<op>_<dir> (C++) or ..._triton; direction
    "" for single ops without a backward (fastlm::adamw_step, fastlm::adamw_step_triton)."""
    name = f"{op}_{direction}" if direction else op
    if backend == "triton":
        native.load_triton_kernels()  # registers fastlm::<op>_*_triton on first use
        return getattr(torch.ops.fastlm, f"{name}_triton")
    return getattr(torch.ops.fastlm, name)


# ---------------------------------------------------------------------------------------------
# Norms
def _check_norm_args(op: str, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> None:
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fastlm.ops.{op}: x must have a non-empty last (feature) dimension, "
                         f"got shape {tuple(x.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in floats:
            raise TypeError(f"fastlm.ops.{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"fastlm.ops.{op}: {name} is on {t.device} but x is on {x.device}")
        if name != "x" and tuple(t.shape) != (x.shape[-1],):
            raise ValueError(f"fastlm.ops.{op}: {name} must have shape ({x.shape[-1]},) to match "
                             f"x's last dimension, got {tuple(t.shape)}")


def _native_dtype_ok(op: str, backend: str, x: torch.Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError(f"fastlm.ops.{op}: the '{backend}' backend supports float32, bfloat16 and "
                        "float16; use backend='reference' (or 'torch') for float64")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension: x (..., C), weight (C,), bias (C,) or None -> (..., C).

    Statistics are computed in float32 for every input dtype; weight and bias may be float32
    while x is bf16/fp16 (mixed precision), and their gradients come back in their own dtype.
    """
    _check_norm_args("layer_norm", x, weight, bias)
    impl = select_backend("layer_norm", x.device, backend)
    if impl == "reference":
        return reference.layer_norm(x, weight, bias, eps)
    if impl == "torch":
        b = None if bias is None else bias.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), b, eps)
    _native_dtype_ok("layer_norm", impl, x)
    return _native("layer_norm", impl)(x, weight, bias, eps)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension: x (..., C), weight (C,) -> (..., C); float32 statistics."""
    _check_norm_args("rms_norm", x, weight)
    impl = select_backend("rms_norm", x.device, backend)
    if impl == "reference":
        return reference.rms_norm(x, weight, eps)
    if impl == "torch":
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    _native_dtype_ok("rms_norm", impl, x)
    return _native("rms_norm", impl)(x, weight, eps)[0]


# ---------------------------------------------------------------------------------------------
# Attention (native kernels come with the attention issue; the torch row is SDPA)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, window: int | None = None,
              backend: str | None = None) -> torch.Tensor:
    """q: (B, H, Tq, D), k and v: (B, H_kv, Tk, D), H % H_kv == 0 -> (B, H, Tq, D).

    With causal=True and Tq < Tk (decoding with a KV cache) the queries are the last Tq
    positions: query i sees keys j <= i + (Tk - Tq). window limits each query to the last
    `window` keys (sliding-window attention).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("fastlm.ops.attention: q, k, v must be (B, H, T, D), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError("fastlm.ops.attention: k and v must have equal shapes and share B and D "
                         f"with q, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fastlm.ops.attention: query heads ({q.shape[1]}) must be a multiple of "
                         f"key/value heads ({k.shape[1]})")
    if window is not None and window < 1:
        raise ValueError(f"fastlm.ops.attention: window must be >= 1, got {window}")
    impl = select_backend("attention", q.device, backend)
    if impl == "reference":
        return reference.attention(q, k, v, causal, scale, window)
    if impl == "torch":
        return _sdpa(q, k, v, causal, scale, window)
    _native_dtype_ok("attention", impl, q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fastlm.ops.attention: the '{impl}' backend needs q, k, v in one dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _native("attention", impl)(q, k, v, causal, scale, window or 0)[0]


def _sdpa(q, k, v, causal, scale, window):
    Tq, Tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    # SDPA's is_causal aligns queries top-left; fastlm's (like FlashAttention's) align
    # bottom-right, which KV-cache decoding needs. An explicit mask says it exactly.
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    allowed = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (j > i - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
def _check_targets(op: str, target: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"fastlm.ops.{op}: target must hold integer class indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"fastlm.ops.{op}: target is on {target.device} but the inputs are on "
                         f"{device}")
    if target.numel() != rows:
        raise ValueError(f"fastlm.ops.{op}: target must have {rows} entries (one per row), got "
                         f"shape {tuple(target.shape)}")
    return target.reshape(rows).long()


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fastlm.ops.{op}: reduction must be mean, sum or none, got '{reduction}'")


def _reduce_rows(losses: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 reduction: str) -> torch.Tensor:
    """Per-row losses (N,) float32, 0 on ignored rows -> the reduction. Plain torch ops, so each
    reduction's gradient is autograd's ("mean" divides by the non-ignored rows, as torch does)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  backend: str | None = None, inplace_backward: bool = False) -> torch.Tensor:
    """logits (N, V), target (N,) integers -> float32 scalar ("mean", "sum") or (N,) ("none").

    Per row: (1 - label_smoothing) * nll + label_smoothing * (cross-entropy against the uniform
    distribution, torch's definition) + z_loss * logsumexp^2 (PaLM's z-loss). Rows whose target
    is ignore_index contribute 0 and get a zero gradient. Computed in float32 for every dtype.

    inplace_backward=True saves the (N, V) gradient buffer: the forward also computes the
    gradient and writes it over the logits' own storage, and the backward only scales it by the
    upstream gradient. The caller gives the logits up: after the call they hold the gradient,
    not logits, so nothing else may need them (autograd's version counter makes any other node
    that saved them fail in its backward). The logits must require grad, be contiguous and not
    be a leaf or a view of one (a parameter or a user's input would be overwritten); one
    backward only, and a second call on the same logits is refused. Not traced by torch.compile.
    """
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError("fastlm.ops.cross_entropy: logits must be (N, V) with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"fastlm.ops.cross_entropy: logits must be floating-point, got {logits.dtype}")
    target = _check_targets("cross_entropy", target, logits.shape[0], logits.device)
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fastlm.ops.cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"fastlm.ops.cross_entropy: z_loss must be >= 0, got {z_loss}")
    impl = select_backend("cross_entropy", logits.device, backend)
    if inplace_backward:
        return _cross_entropy_inplace(logits, target, ignore_index, reduction,
                                      float(label_smoothing), float(z_loss), impl)
    if impl == "reference":
        return reference.cross_entropy(logits, target, ignore_index, reduction, label_smoothing,
                                       z_loss)
    if impl == "torch":
        x = logits.float()
        if not z_loss:
            return F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing)
        losses = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none",
                                 label_smoothing=label_smoothing)
        losses = losses + z_loss * x.logsumexp(-1).square() * (target != ignore_index)
        return _reduce_rows(losses, target, ignore_index, reduction)
    _native_dtype_ok("cross_entropy", impl, logits)
    losses, _lse = _native("cross_entropy", impl)(logits, target, ignore_index,
                                                  float(label_smoothing), float(z_loss))
    return _reduce_rows(losses, target, ignore_index, reduction)


# Rows per chunk of the torch backend's in-place cross-entropy: its float32 temporaries are a
# few (rows, V) tensors, ~64 MiB each at 16M elements, instead of (N, V) ones.
_INPLACE_CHUNK_ELEMENTS = 1 << 24

def _cross_entropy_inplace(logits, target, ignore_index, reduction, label_smoothing, z_loss,
                           impl):
    where = "fastlm.ops.cross_entropy(inplace_backward=True)"
    if not (torch.is_grad_enabled() and logits.requires_grad):
        raise ValueError(f"{where}: the logits do not require grad (or grad mode is off), so "
                         "there is no gradient to write over them; call without "
                         "inplace_backward")
    if logits.is_leaf or (logits._base is not None and logits._base.is_leaf):
        raise ValueError(f"{where}: the logits are a leaf tensor or a view of one (a parameter "
                         "or a user's input): overwriting them would destroy data someone else "
                         "owns; pass logits computed by the model (e.g. the output head's "
                         "result), or call without inplace_backward")
    if not logits.is_contiguous():
        raise ValueError(f"{where}: the logits must be contiguous (strides {logits.stride()}); a "
                         "contiguous copy would cost the memory this option saves; call "
                         "without inplace_backward")
    if opdefs.CrossEntropyInplace.holds_gradient(logits):
        raise RuntimeError(f"{where}: these logits already hold the gradient written by an "
                           "earlier inplace_backward call (their values are no longer logits); "
                           "compute the logits again")
    if impl not in ("reference", "torch"):
        _native_dtype_ok("cross_entropy", impl, logits)
    valid = (target != ignore_index).sum()
    if reduction == "mean":
        scale = valid.float().reciprocal()  # 0-dim on the device: no sync
    else:
        scale = torch.ones((), device=logits.device)

    def fused(x, s):  # (N, V), () -> (N,): losses, s * gradient written over x
        if impl == "reference":
            return reference.cross_entropy_grad_(x, target, s, ignore_index, label_smoothing,
                                                 z_loss)
        if impl == "torch":  # plain torch ops, a chunk of rows at a time
            rows = max(1, _INPLACE_CHUNK_ELEMENTS // x.shape[1])
            return torch.cat([
                reference.cross_entropy_grad_(x[i:i + rows], target[i:i + rows], s,
                                              ignore_index, label_smoothing, z_loss).float()
                for i in range(0, x.shape[0], rows)]) if x.shape[0] else x.new_zeros(0).float()
        return _native("cross_entropy", impl, "fwd_inplace")(x, target, s, ignore_index,
                                                             label_smoothing, z_loss)

    def reduce(losses):
        return _reduce_rows(losses, target, ignore_index, reduction)

    return opdefs.CrossEntropyInplace.apply(logits, fused, reduce, scale, reduction == "none")


# ---------------------------------------------------------------------------------------------
# Linear cross-entropy: the output head and its loss without the (N, V) logits
def linear_cross_entropy_chunk_rows(N: int, V: int, D: int, device_type: str = "cuda") -> int:
    """Rows per chunk: the (rows, V) float32 logits of a chunk about as big as hidden (N, D) in
    float32, so the loss adds little beyond what the model already holds (Liger-Kernel's rule),
    as a power of two for GEMM-friendly shapes, at most N. At least 16 rows on a GPU; at least
    256 on a CPU, where thinner GEMMs lose much of their speed (N=2048, D=768, V=50304 on 2
    cores: 15.5 s per step with 32-row chunks, 9.4 s with 256, against 11.7 s materialised)."""
    rows = math.ceil(N / max(1, math.ceil(V / D)))
    floor = 256 if device_type == "cpu" else 16
    return max(1, min(N, max(floor, 1 << (rows - 1).bit_length())))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         backend: str | None = None,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight^T, target): hidden (..., D), weight (V, D), target (...) ->
    float32 scalar ("mean", "sum") or (N,) ("none", N rows of hidden).

    The cpu and triton backends never form the (N, V) logits: chunks of chunk_rows rows (default
    linear_cross_entropy_chunk_rows) are projected, turned into their gradient in place and
    multiplied back, accumulating the gradients of hidden and weight in float32 during the
    forward. "none" instead recomputes each chunk in the backward (activation checkpointing).
    Chosen automatically, logits of at most SMALL_LOGITS_BYTES take torch's materialised path
    (faster there), unless chunk_rows is given.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError("fastlm.ops.linear_cross_entropy: hidden must be (..., D) and weight "
                         f"(V, D), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("fastlm.ops.linear_cross_entropy: weight has no rows (classes)")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"fastlm.ops.linear_cross_entropy: {name} must be floating-point, "
                            f"got {t.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"fastlm.ops.linear_cross_entropy: weight is on {weight.device} but "
                         f"hidden is on {hidden.device}")
    _check_reduction("linear_cross_entropy", reduction)
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    N, D, V = h.shape[0], h.shape[1], weight.shape[0]
    target = _check_targets("linear_cross_entropy", target, N, h.device)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"fastlm.ops.linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    small = chunk_rows is None and N * V * 4 <= SMALL_LOGITS_BYTES  # SMALL_DISPATCH
    impl = select_backend("linear_cross_entropy", h.device, backend, small)
    if impl == "reference":
        return reference.linear_cross_entropy(h, weight, target, ignore_index, reduction)
    if impl == "torch":
        logits = F.linear(h, weight.to(h.dtype)).float()  # (N, V): the materialised path
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    _native_dtype_ok("linear_cross_entropy", impl, h)
    _native_dtype_ok("linear_cross_entropy", impl, weight)
    rows = chunk_rows or linear_cross_entropy_chunk_rows(N, V, D, h.device.type)
    if reduction == "none":
        return _linear_cross_entropy_rows(h, weight, target, ignore_index, rows, impl)
    valid = (target != ignore_index).sum()
    scale = (1.0 / valid.float()) if reduction == "mean" else torch.ones((), device=h.device)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _dh, _dw = _native("linear_cross_entropy", impl)(h, weight, target, scale, ignore_index,
                                                           rows, with_grad)
    return loss


def _linear_cross_entropy_rows(h, weight, target, ignore_index, rows, impl):
    """Per-row losses (N,) chunk by chunk; each chunk's logits are recomputed in the backward
    (torch.utils.checkpoint), so only one chunk's (rows, V) logits is alive at a time."""
    ce = "cpu" if impl == "cpu" else "triton"

    def chunk(hc, w, tc):  # (n, D), (V, D), (n,) -> (n,)
        return cross_entropy(hc @ w.to(hc.dtype).t(), tc, ignore_index, "none", backend=ce)

    return torch.cat([torch.utils.checkpoint.checkpoint(
        chunk, h[s:s + rows], weight, target[s:s + rows], use_reentrant=False)
        for s in range(0, h.shape[0], rows)])


# ---------------------------------------------------------------------------------------------
# AdamW step
@torch.no_grad()
def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               step: int | list[torch.Tensor], lr: float | torch.Tensor, beta1: float,
               beta2: float, eps: float, weight_decay: float, backend: str | None = None,
               master_params: list[torch.Tensor] | None = None) -> None:
    """One AdamW update, in place, of every tensor in `params` (decoupled weight decay, bias
    correction for `step`, which counts from 1). Lists are parallel and on one device; states
    are float32 or the parameter's dtype (the native kernels compute in float32 either way).

    Capturable form: `step` a list of one-element float32 tensors on the parameters' device, one
    per parameter and already incremented (torch.optim.AdamW's state["step"] when capturable),
    and `lr` a float or a one-element tensor on that device. The kernels read them on the
    device, so the call needs no host sync and can be captured in a CUDA graph.

    master_params: None, or one float32 tensor per parameter (float32 states required): the
    update is applied to the master copy and each parameter receives it rounded to its own
    dtype (float32 master weights for bf16/fp16 parameters).
    """
    n = len(params)
    if not (n == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("fastlm.ops.adamw_step: params, grads, exp_avgs and exp_avg_sqs must have "
                         "equal lengths")
    capturable = isinstance(step, (list, tuple))
    if capturable and len(step) != n:
        raise ValueError(f"fastlm.ops.adamw_step: step as tensors needs one per parameter, got "
                         f"{len(step)} for {n} parameters")
    if not capturable and isinstance(lr, torch.Tensor):
        raise TypeError("fastlm.ops.adamw_step: lr is a tensor but step is an int; pass step as "
                        "a list of tensors too (the capturable form), or lr as a float")
    if not capturable and step < 1:
        raise ValueError(f"fastlm.ops.adamw_step: step counts from 1, got {step}")
    if master_params is not None and len(master_params) != n:
        raise ValueError(f"fastlm.ops.adamw_step: master_params needs one tensor per parameter, "
                         f"got {len(master_params)} for {n} parameters")
    if not params:
        return
    device = params[0].device
    if capturable and not isinstance(lr, torch.Tensor):
        lr = torch.full((), lr, dtype=torch.float64, device=device)  # a fill kernel, no copy
    impl = select_backend("adamw_step", device, backend)
    if impl == "reference":
        reference.adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                             weight_decay, master_params)
        return
    if impl == "torch":
        _torch_adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                          weight_decay, master_params)
        return
    for p in params:
        _native_dtype_ok("adamw_step", impl, p)
    hyper = (beta1, beta2, eps, weight_decay)
    if capturable:
        _native("adamw_step", impl, "capturable")(params, grads, exp_avgs, exp_avg_sqs,
                                                   master_params or [], list(step), lr, *hyper)
    elif master_params is not None:
        _native("adamw_step", impl, "master")(params, grads, exp_avgs, exp_avg_sqs, master_params,
                                               float(step), lr, *hyper)
    else:
        _native("adamw_step", impl, "")(params, grads, exp_avgs, exp_avg_sqs, float(step), lr,
                                        *hyper)


def _torch_adamw_step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                      weight_decay, master_params):
    """torch's fused AdamW kernel (the peer); with master weights it updates the float32 masters
    from float32 copies of the gradients and copies them, rounded, into the parameters."""
    steps = (list(step) if isinstance(step, (list, tuple))
             else [torch.tensor(float(step), device=params[0].device)] * len(params))
    targets, grads_in = params, grads
    if master_params is not None:
        targets, grads_in = master_params, [g.float() for g in grads]
    torch._fused_adamw_(targets, grads_in, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                        maximize=False)
    if master_params is not None:
        torch._foreach_copy_(params, master_params)
