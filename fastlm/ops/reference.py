"""Pure-PyTorch reference of every fastlm op: the test oracle and the last fallback backend.

Written for clarity, not speed: each op computes in float32 whatever its input dtype (float64 in
gradchecks, where the caller passes float64) and returns the input's dtype. Autograd through
these plain expressions is the reference gradient every native backward is compared with.
"""
from __future__ import annotations

import math

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension.

    x: (..., C), weight: (C,), bias: (C,) or None -> (..., C) in x.dtype.
    y = (x - mean) / sqrt(var + eps) * weight + bias, var biased (divided by C).
    A native backward saves mean and rstd = 1/sqrt(var + eps) per row, (...,) in float32.
    """
    dt = _compute_dtype(x)
    xf = x.to(dt)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension (Llama's norm).

    x: (..., C), weight: (C,) -> (..., C) in x.dtype.
    y = x / sqrt(mean(x^2) + eps) * weight. A native backward saves rstd per row, (...,) float32.
    """
    dt = _compute_dtype(x)
    xf = x.to(dt)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(dt)).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Scaled dot-product attention, materialising the (T, T) scores.

    q: (B, H, T, D), k and v: (B, H_kv, T, D) with H % H_kv == 0 -> (B, H, T, D) in q.dtype.
    causal: query i sees keys j <= i. window: if set, query i also sees only keys j > i - window.
    """
    dt = _compute_dtype(q)
    n_rep = q.shape[1] // k.shape[1]
    kf = k.to(dt).repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
    vf = v.to(dt).repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(dt) @ kf.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    Tq, Tk = q.shape[-2], k.shape[-2]
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)  # align query i with key positions
    j = torch.arange(Tk, device=q.device)[None, :]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits (N, V) against integer targets (N,), in float32.

    Per row, with lse = logsumexp(logits) and eps = label_smoothing:
        loss = (1 - eps) * (lse - x[target]) + eps * (lse - mean(x)) + z_loss * lse^2
    (the smoothed term is torch's: the cross-entropy against the uniform distribution; the z-loss
    term is PaLM's, pulling lse towards 0). Rows whose target is ignore_index contribute nothing;
    "mean" divides by the number of the other rows (NaN when there are none, as torch does),
    "sum" adds them, "none" returns (N,). A native backward saves lse per row, (N,) float32.
    """
    x = logits.to(_compute_dtype(logits))  # (N, V)
    lse = x.logsumexp(dim=-1)  # (N,)
    valid = target != ignore_index  # (N,)
    nll = lse - x.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N,)
    loss = nll
    if label_smoothing:
        loss = (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                        ignore_index: int = -100, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> torch.Tensor:
    """The loss of each row (N,) in float32, with scale * dloss_r/dlogits_r written over logits
    (N, V) in place (what cross_entropy(..., inplace_backward=True) does). scale: a 0-dim tensor,
    the upstream gradient of every row's loss. With p = softmax(x), per row (0 if ignored):

        dloss/dx_j = p_j * (1 + 2 z_loss lse) - label_smoothing / V - (1 - label_smoothing) [j == t]

    Written out rather than taken from autograd, so tests compare it with autograd's gradient.
    The reference computes in full float32 before copying back: it saves no memory.
    """
    x = logits.to(_compute_dtype(logits))  # (N, V)
    V = x.shape[-1]
    loss = cross_entropy(x, target, ignore_index, "none", label_smoothing, z_loss)  # (N,)
    lse = x.logsumexp(dim=-1, keepdim=True)  # (N, 1)
    grad = torch.exp(x - lse) * (1 + 2 * z_loss * lse) - label_smoothing / V
    grad.scatter_add_(-1, target.clamp(min=0).unsqueeze(-1),
                      torch.full_like(lse, -(1 - label_smoothing)))
    grad = grad * ((target != ignore_index).unsqueeze(-1) * scale.to(x.dtype))
    logits.copy_(grad)
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight^T, target): the output head and its loss in one op.

    hidden (N, D), weight (V, D), target (N,) -> scalar or (N,), in float32. The reference
    materialises the (N, V) logits in float32; the native backends never do (they work on chunks
    of rows and accumulate the gradients of hidden and weight in float32).
    """
    dt = _compute_dtype(hidden)
    logits = hidden.to(dt) @ weight.to(dt).t()  # (N, V)
    return cross_entropy(logits, target, ignore_index, reduction)


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               step: int | list[torch.Tensor], lr: float | torch.Tensor, beta1: float,
               beta2: float, eps: float, weight_decay: float,
               master_params: list[torch.Tensor] | None = None) -> None:
    """One AdamW update in place (torch.optim.AdamW's formula, amsgrad and maximize off):

        p   <- p * (1 - lr * weight_decay)                  (decoupled weight decay)
        m   <- beta1 * m + (1 - beta1) * g
        v   <- beta2 * v + (1 - beta2) * g^2
        p   <- p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    Computed in float32 (float64 for float64 tensors) and stored back in each tensor's dtype.
    step counts from 1: an int, or one 0-dim tensor per parameter (the capturable form, as
    torch.optim.AdamW keeps state["step"]); lr a float or a 0-dim tensor. master_params: None, or
    one float32 tensor per parameter that stands for p in the formula (float32 master weights);
    the parameter then receives the updated master copy rounded to its dtype.
    """
    steps = step if isinstance(step, (list, tuple)) else [step] * len(params)
    masters = master_params if master_params is not None else [None] * len(params)
    for p, g, m, v, s, w in zip(params, grads, exp_avgs, exp_avg_sqs, steps, masters):
        dt = _compute_dtype(p)
        s = s.double() if isinstance(s, torch.Tensor) else s  # bias corrections in double
        bias1, bias2 = 1 - beta1 ** s, 1 - beta2 ** s
        pf = (p if w is None else w).to(dt)
        gf, mf, vf = g.to(dt), m.to(dt), v.to(dt)
        pf = pf * (1 - lr * weight_decay)
        mf = beta1 * mf + (1 - beta1) * gf
        vf = beta2 * vf + (1 - beta2) * gf * gf
        pf = pf - (lr / bias1) * mf / (vf.sqrt() / bias2 ** 0.5 + eps)
        if w is not None:
            w.copy_(pf)
        p.copy_(pf)
        m.copy_(mf)
        v.copy_(vf)
