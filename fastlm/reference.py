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
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (N, V) against integer targets (N,).

    Rows whose target is ignore_index contribute nothing; "mean" divides by the number of the
    other rows (NaN when there are none, as torch does), "sum" adds them, "none" returns (N,).
    """
    logp = logits.to(_compute_dtype(logits)).log_softmax(dim=-1)  # (N, V)
    valid = target != ignore_index  # (N,)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid  # (N,)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum()
