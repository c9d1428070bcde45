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
  4. DISPATCH below: the fastest available backend for the device, as measured in bench/.
A forced backend that is implemented for the op but unavailable here raises an error that says
why (not built, wrong device, triton missing) and lists what is available.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from fastlm import native, reference

BACKENDS = ("reference", "torch", "cpu", "cuda", "triton")

# Which backends each op has at all.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "layer_norm": ("reference", "torch", "cpu", "cuda", "triton"),
    "rms_norm": ("reference", "torch", "cpu", "cuda", "triton"),
    "attention": ("reference", "torch"),
    "cross_entropy": ("reference", "torch"),
    "adamw_step": ("reference", "torch"),
}

# Preference per op and device type: the first available backend wins. Each row is justified by
# a bench/ measurement (README, "Dispatch"); change a row only with a number. Triton on CPU is
# the interpreter (a test tool), so it is never chosen automatically there.
DISPATCH: dict[str, dict[str, tuple[str, ...]]] = {
    "layer_norm": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "rms_norm": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")},
    "attention": {"cpu": ("torch",), "cuda": ("torch",)},
    "cross_entropy": {"cpu": ("torch",), "cuda": ("torch",)},
    "adamw_step": {"cpu": ("torch",), "cuda": ("torch",)},
}
_OTHER_DEVICES = ("torch", "reference")  # mps, xpu, ...: PyTorch's own ops

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


def select_backend(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that will run `op` on `device` (see the module docstring for the rules)."""
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
    for candidate in DISPATCH[op].get(device.type, _OTHER_DEVICES) + ("reference",):
        if unavailable_reason(op, candidate, device) is None:
            return candidate
    raise AssertionError("unreachable: the reference backend is always available")


def _check_op(op: str) -> None:
    if op not in IMPLEMENTED:
        raise ValueError(f"unknown op '{op}'; ops are {', '.join(IMPLEMENTED)}")


def _native(op: str, backend: str, direction: str = "fwd"):
    """torch.ops handle of a native backend: fastlm::<op>_<dir> (C++) or ..._triton."""
    if backend == "triton":
        native.triton_kernels(op)  # registers fastlm::<op>_*_triton on first use
        return getattr(torch.ops.fastlm, f"{op}_{direction}_triton")
    return getattr(torch.ops.fastlm, f"{op}_{direction}")


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
    return _sdpa(q, k, v, causal, scale, window)


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
# Cross-entropy (native kernels come with the kernels issue; the torch row is F.cross_entropy)
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """logits (N, V), target (N,) int64 -> scalar ("mean", "sum") or (N,) ("none")."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError("fastlm.ops.cross_entropy: logits must be (N, V) and target (N,), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fastlm.ops.cross_entropy: reduction must be mean, sum or none, "
                         f"got '{reduction}'")
    impl = select_backend("cross_entropy", logits.device, backend)
    if impl == "reference":
        return reference.cross_entropy(logits, target, ignore_index, reduction)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# AdamW step (native kernels come with the kernels issue; the torch row is torch's fused AdamW)
@torch.no_grad()
def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], step: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               backend: str | None = None) -> None:
    """One AdamW update, in place, of every tensor in `params` (decoupled weight decay, bias
    correction for `step`, which counts from 1). Lists are parallel and on one device."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("fastlm.ops.adamw_step: params, grads, exp_avgs and exp_avg_sqs must have "
                         "equal lengths")
    if step < 1:
        raise ValueError(f"fastlm.ops.adamw_step: step counts from 1, got {step}")
    if not params:
        return
    impl = select_backend("adamw_step", params[0].device, backend)
    if impl == "torch":
        steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False)
        return
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        pf, gf = p.float(), g.float()
        pf.mul_(1 - lr * weight_decay)
        m.lerp_(gf.to(m.dtype), 1 - beta1)
        v.mul_(beta2).addcmul_(gf.to(v.dtype), gf.to(v.dtype), value=1 - beta2)
        denom = (v.float().sqrt() / math.sqrt(bias2)).add_(eps)
        pf.addcdiv_(m.float(), denom, value=-lr / bias1)
        p.copy_(pf)
