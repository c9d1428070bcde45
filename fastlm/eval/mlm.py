"""Evaluation of masked-LM encoders (fastlm.models.bert): masked-token accuracy and
pseudo-perplexity. `python -m fastlm.eval --checkpoint RUN_DIR [--text PATH]` calls mlm_scores
for a model whose objective is "masked" (causal models get perplexity and bits per byte).

  masked accuracy   windows of `context` tokens are corrupted exactly as in training (15%
                    chosen; 80% [MASK] / 10% random / 10% kept, fixed seed); the share of chosen
                    positions whose argmax is the original token, and the mean NLL there
                    ("masked_loss", comparable with fastlm.train's val loss of the same model).
  pseudo-perplexity Salazar et al. (2020): each token of a window is masked in turn, alone, and
                    scored given all the others; PPPL = exp(mean NLL). It costs one forward per
                    token, so it runs on a few short windows (ppl_windows x ppl_context tokens).
                    pseudo_bits_per_byte = that NLL in bits per UTF-8 byte of the scored tokens.
                    Neither is a perplexity in the causal sense: a masked token sees both sides,
                    so the numbers are lower than a causal model's and do not compare with them.

Windows are spread evenly over the text (not only its beginning). Shapes: W windows, T tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def even_windows(ids: Sequence[int], context: int, count: int) -> torch.Tensor:
    """Up to `count` non-overlapping windows (W, T) of `context` tokens spread evenly over ids
    (one shorter window when ids is shorter than context)."""
    if not ids:
        raise ValueError("mlm_eval: no tokens to score")
    if context < 2:
        raise ValueError(f"mlm_eval: context must be >= 2 tokens, got {context}")
    n = len(ids) // context
    if n == 0:
        return torch.tensor([list(ids)], dtype=torch.long)  # (1, len(ids))
    picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(min(count, n))})
    return torch.tensor([list(ids[p * context:(p + 1) * context]) for p in picks],
                        dtype=torch.long)  # (W, T)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def masked_accuracy(model, windows: torch.Tensor, seed: int = 0,
                    batch_size: int = 16) -> dict:
    """Training-style corruption of windows (W, T) -> masked accuracy and mean NLL."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    device = _device(model)
    correct, nll, count = 0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size]
        inputs, targets = model.make_batch(x, x, gen)  # (b, T) each
        h = model.encode(inputs.to(device))  # (b, T, C)
        where = targets != IGNORE  # (b, T)
        logits = model.mlm_logits(h[where.to(device)]).float()  # (M, V)
        gold = targets[where].to(device)  # (M,)
        correct += int((logits.argmax(-1) == gold).sum())
        nll += float(F.cross_entropy(logits, gold, reduction="sum"))
        count += int(gold.numel())
    return {"masked_accuracy": correct / count, "masked_loss": nll / count,
            "masked_tokens": count}


@torch.no_grad()
def pseudo_nll(model, window: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """NLL (T,) of each token of one window (T,) when it alone is replaced by [MASK]."""
    model.eval()
    device = _device(model)
    T = window.shape[0]
    window = window.to(device)
    out = torch.empty(T, dtype=torch.float32, device=device)
    for s in range(0, T, batch_size):
        pos = torch.arange(s, min(T, s + batch_size), device=device)  # (b,) masked positions
        x = window.repeat(pos.shape[0], 1)  # (b, T)
        x[torch.arange(pos.shape[0], device=device), pos] = model.mask_id
        h = model.encode(x)[torch.arange(pos.shape[0], device=device), pos]  # (b, C)
        logp = F.log_softmax(model.mlm_logits(h).float(), dim=-1)  # (b, V)
        out[s:s + pos.shape[0]] = -logp.gather(1, window[pos, None]).squeeze(1)
    return out


def mlm_scores(model, tokenizer, text: str, context: int | None = None, windows: int = 64,
               ppl_context: int = 64, ppl_windows: int = 4, seed: int = 0,
               batch_size: int = 16) -> dict:
    """Masked accuracy on up to `windows` windows of `context` tokens (default block_size) and
    pseudo-perplexity on `ppl_windows` windows of `ppl_context` tokens of text."""
    if getattr(model, "objective", "causal") != "masked":
        raise ValueError(f"mlm_eval: {type(model).__name__} is not a masked-LM model")
    ids = tokenizer.encode_ordinary(text)
    block = model.config.block_size
    context = min(context or block, block)
    scores = masked_accuracy(model, even_windows(ids, context, windows), seed, batch_size)
    nll, scored_bytes = [], 0
    for w in even_windows(ids, min(ppl_context, block), ppl_windows):
        nll.append(pseudo_nll(model, w, max(batch_size, 1)))
        scored_bytes += len(tokenizer.decode_bytes(w.tolist()))
    nll_all = torch.cat(nll)
    mean = float(nll_all.mean())
    scores.update(pseudo_perplexity=math.exp(mean), pseudo_nll=mean,
                  pseudo_bits_per_byte=float(nll_all.sum()) / math.log(2) / scored_bytes,
                  pseudo_tokens=int(nll_all.numel()), context=context)
    return scores
