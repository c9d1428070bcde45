"""fastlm's public ops: argument checks, then the backend that fastlm.ops.dispatch picks.

Each op takes `backend=` to force one (see fastlm.ops.dispatch for the rules); the reference
backend is fastlm.ops.reference, the native ones are torch.library ops (fastlm.ops.native loads
the C++ module, native_op below the Triton kernels; fastlm.ops.autograd holds their fake kernels
and autograd).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.ops import autograd as opdefs
from fastlm.ops import reference
from fastlm.ops.dispatch import SMALL_LOGITS_BYTES, select_backend


def native_op(op: str, backend: str, direction: str = "fwd"):
    """torch.ops handle of a native backend: fastlm::<op>_<dir> (C++) or ..._triton; direction
    "" for single ops without a backward (fastlm::adamw_step, fastlm::adamw_step_triton)."""
    name = f"{op}_{direction}" if direction else op
    if backend == "triton":
        # Registers every fastlm::<op>_*_triton on first use (triton is optional and slow to
        # import). A plain import statement on purpose: torch.compile traces it, while it
        # refuses importlib.
        import fastlm.kernels  # noqa: F401
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
    return native_op("layer_norm", impl)(x, weight, bias, eps)[0]


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
    return native_op("rms_norm", impl)(x, weight, eps)[0]


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
    return native_op("attention", impl)(q, k, v, causal, scale, window or 0)[0]


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
    losses, _lse = native_op("cross_entropy", impl)(logits, target, ignore_index,
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
        return native_op("cross_entropy", impl, "fwd_inplace")(x, target, s, ignore_index,
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
    loss, _dh, _dw = native_op("linear_cross_entropy", impl)(h, weight, target, scale, ignore_index,
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
        native_op("adamw_step", impl, "capturable")(params, grads, exp_avgs, exp_avg_sqs,
                                                   master_params or [], list(step), lr, *hyper)
    elif master_params is not None:
        native_op("adamw_step", impl, "master")(params, grads, exp_avgs, exp_avg_sqs, master_params,
                                               float(step), lr, *hyper)
    else:
        native_op("adamw_step", impl, "")(params, grads, exp_avgs, exp_avg_sqs, float(step), lr,
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
