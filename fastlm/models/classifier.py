"""Sequence classifier: a fastlm GPT backbone with a linear head on the pooled hidden state.

Pooling takes the final-norm output at the last non-pad token of each sequence: in a causal
decoder that is the only position that has seen the whole text, and right-padding after it
cannot change it (attention never looks forward).

The hidden states come from a forward hook on the backbone's final norm (`gpt.norm_f`), and the
backbone runs its own GPT.forward with last_only=True (so the vocabulary head costs one position).
A hook was chosen over re-running the backbone's submodules here because it keeps every detail
of GPT.forward (position embeddings, dropout, future changes) in one place: this file only
relies on GPT having a `norm_f` module whose output is the (B, T, C) final hidden state.

A bidirectional encoder (a backbone whose `pooling` attribute is "first": fastlm's BERT) is
pooled BERT's way instead: a [CLS] token (the backbone's cls_id) goes in front of each text, the
padding is masked out of attention (lengths), and the head reads the [CLS] position of
backbone.encode(), which has seen every token of the text.

State-dict keys: "gpt.*" for the backbone, "head.*" for the classifier head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models.gpt import GPT


class Classifier(nn.Module):
    """(idx (B, T), lengths (B,)) -> class logits (B, K); forward(idx, targets) also returns the
    mean cross-entropy, so it plugs into the same evaluate() as the language model."""

    def __init__(self, gpt: GPT, n_classes: int, pad_id: int = 0):
        super().__init__()
        self.gpt = gpt
        self.pad_id = pad_id
        self.pooling = getattr(gpt, "pooling", "last")  # "first": [CLS] pooling (encoders)
        if self.pooling == "last" and not isinstance(getattr(gpt, "norm_f", None), nn.Module):
            raise ValueError(f"Classifier: model.arch={gpt.config.arch} has no final norm "
                             "(norm_f) whose hidden state could be pooled; classification "
                             "fine-tuning supports gpt2, llama, gcnn and bert")
        self.head = nn.Linear(gpt.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) of the backbone."""
        captured = []
        handle = self.gpt.norm_f.register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            self.gpt(idx, last_only=True)
        finally:
            handle.remove()
        if len(captured) != 1:  # the one assumption this module makes about GPT.forward
            raise RuntimeError(f"Classifier: expected GPT.forward to call norm_f once, it ran "
                               f"{len(captured)} times")
        return captured[0]

    def cls_hidden(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encoder pooling: [CLS] + idx (the last token dropped if that exceeds block_size),
        padding masked, -> the [CLS] position's final hidden state (B, C)."""
        cls = torch.full_like(idx[:, :1], self.gpt.cls_id)  # (B, 1)
        idx = torch.cat((cls, idx), dim=1)[:, :self.gpt.config.block_size]  # (B, <=T+1)
        lengths = (lengths + 1).clamp(max=idx.shape[1])
        return self.gpt.encode(idx, lengths=lengths)[:, 0]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) right-padded token ids; lengths (B,) real lengths (default: count of
        tokens != pad_id, which needs a pad id the texts never use); targets (B,) class ids."""
        if lengths is None:
            lengths = (idx != self.pad_id).sum(dim=1).clamp(min=1)
        if self.pooling == "first":
            pooled = self.cls_hidden(idx, lengths)  # (B, C)
        else:
            h = self.hidden(idx)  # (B, T, C)
            pooled = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        logits = self.head(pooled)  # (B, K)
        loss = F.cross_entropy(logits.float(), targets) if targets is not None else None
        return logits, loss
