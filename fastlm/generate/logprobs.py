"""Log-probabilities of given tokens, with the most likely alternatives at each position: what the
server reports for `logprobs` and `echo` (OpenAI's completions and chat shapes are built from it
in fastlm.serve).

One forward over the whole sequence (prompt and answer) scores every position, so a prompt token
is scored exactly as fastlm.eval.core.loglikelihood (and lm_eval's `hf` model on the export)
scores it: log_softmax over the model's whole vocabulary, float32 logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scored:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids at this position, most likely first


@torch.no_grad()
def token_logprobs(model, ids: Sequence[int], start: int, top: int) -> list[Scored]:
    """Scored(ids[i], log p(ids[i] | ids[:i]), `top` alternatives) for i in start..len(ids)-1
    (start >= 1: the first token has nothing to be scored from). len(ids) - 1 inputs must fit
    the model's context."""
    if not 1 <= start <= len(ids):
        raise ValueError(f"token_logprobs: start {start} outside 1..{len(ids)}")
    if start == len(ids):
        return []
    device = next(model.parameters()).device
    x = torch.tensor([list(ids[:-1])], dtype=torch.long, device=device)
    logp = F.log_softmax(model(x)[0][0, start - 1:].float(), dim=-1)  # (n, V)
    tgt = torch.tensor(list(ids[start:]), device=device)
    chosen = logp[torch.arange(len(tgt), device=device), tgt].tolist()
    if top:
        vals, idx = logp.topk(top, dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        alts = [[] for _ in chosen]
    return [Scored(t, lp, a) for t, lp, a in zip(tgt.tolist(), chosen, alts)]
