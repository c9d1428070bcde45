"""Gated convolutional language model (Dauphin et al. 2017, "Language Modeling with Gated
Convolutional Networks"), registered as model.arch = "gcnn".

    tokens (B, T) -> embedding (B, T, C)
      -> n_layer residual blocks:  x + GLU(causal_conv(norm(x)))
      -> norm -> tied head (V, C) -> logits / loss (fastlm.ops.linear_cross_entropy)

Each block is one causal 1-D convolution of width k = model.conv_kernel over the full channel
width C = model.n_embd, producing 2C channels that a gated linear unit halves back to C:
GLU(a, b) = a * sigmoid(b). Causality comes from padding k - 1 zeros on the left only, so the
output at position t sees inputs t - k + 1 .. t of its block; no position embedding is needed (the
convolution knows order; the zeros mark the window's start).

Design choice: plain blocks, no bottleneck. The paper's bottleneck blocks (1x1 down, k-wide conv,
1x1 up) pay off at widths in the thousands; at the ~0.1-1M parameters this project trains on a CPU
the extra 1x1 layers cost more per-op overhead than they save in multiply-adds, and a plain block
keeps "one conv = one layer" so the receptive field formula below is exact. The norm is pre-norm
LayerNorm through fastlm.ops.layer_norm (with model.bias), like the gpt2 flavour; the paper used
weight normalisation, which a pre-norm residual stack does not need.

Receptive field: the output at position t depends on tokens t - R + 1 .. t with
R = n_layer * (k - 1) + 1 (each block widens it by k - 1). Windows longer than R are fine (the
model just never looks further back); block_size only sets the training window, so no check on it.
Generation therefore runs only the last R tokens per step (the same logits as the whole context,
see generate below).

Config keys read: vocab_size, block_size (default sequence length only), n_layer, n_embd,
conv_kernel, dropout, bias, norm_eps, tie_embeddings. n_head/n_kv_head/mlp_hidden are ignored.

Shapes: B batch, T sequence, C = n_embd, k = conv_kernel, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.config import ModelConfig
from fastlm.models.base import LanguageModel
from fastlm.models.gpt import LayerNorm
from fastlm.models.registry import register


class GatedConvBlock(nn.Module):
    """Pre-norm residual gated convolution: x + dropout(GLU(causal_conv_k(norm(x))))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kernel = cfg.conv_kernel
        self.norm = LayerNorm(cfg.n_embd, cfg.bias, cfg.norm_eps)
        # One convolution gives both halves of the GLU: C -> 2C (value, gate).
        self.conv = nn.Conv1d(cfg.n_embd, 2 * cfg.n_embd, cfg.conv_kernel, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).transpose(1, 2)  # (B, C, T): Conv1d wants channels first
        h = F.pad(h, (self.kernel - 1, 0))  # (B, C, k - 1 + T): zeros on the left only
        h = self.conv(h)  # (B, 2C, T): output t reads inputs t - k + 1 .. t
        h = F.glu(h, dim=1).transpose(1, 2)  # (B, T, C): value * sigmoid(gate)
        return x + self.dropout(h)


@register("gcnn", summary="gated CNN (Dauphin et al. 2017): causal convolutions with GLUs")
class GatedCNN(LanguageModel):
    """Token ids (B, T) -> next-token logits (B, T, V) and the loss, through gated causal convs."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(GatedConvBlock(config) for _ in range(config.n_layer))
        self.norm_f = LayerNorm(config.n_embd, config.bias, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Embedding/head N(0, 0.02) as in the gpt2 flavour. Each conv writes straight into the
        # residual stream, so its weights get std 1/sqrt(fan_in * 2 * n_layer): each block adds
        # a GLU output of roughly unit-over-sqrt(2L) size and the stream's variance stays O(1)
        # at any depth (the same reason GPT scales its residual projections).
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, 0.02)
        fan_in = self.config.n_embd * self.config.conv_kernel
        std = 1.0 / math.sqrt(fan_in * 2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.conv.weight, 0.0, std)
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)

    @property
    def receptive_field(self) -> int:
        """Tokens the output at one position depends on: n_layer * (conv_kernel - 1) + 1."""
        return self.config.n_layer * (self.config.conv_kernel - 1) + 1

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per non-embedding parameter plus the
        head's matmul on the (tied) table. Every conv weight is one multiply-add per output
        position, exactly like a linear layer, so 6N is exact up to the norms and GLUs
        (elementwise, O(C) per token). No term grows with seq_len: a convolution's cost per
        token does not depend on the context length."""
        n = self.num_params(non_embedding=True)
        if self.config.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                last_only: bool = False, return_logits: bool | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 -> (logits, loss), with the same contract as GPT.forward: logits
        (B, T, V) ((B, 1, V) with last_only) when asked (default: only without targets), loss
        the mean cross-entropy against targets (B, T) (-100 ignored) by
        fastlm.ops.linear_cross_entropy, which never forms the full logits."""
        x = self.drop(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head_and_loss(self.norm_f(x), targets, last_only, return_logits)

    @property
    def generation_window(self) -> int:
        """Sampling runs only the last receptive_field tokens: the last position's output
        depends on nothing earlier, and with at least R tokens in the window the left zero
        padding reaches none of its inputs, so the logits equal those of the whole context (and
        of training windows, whose positions >= R - 1 see no padding either)."""
        return self.receptive_field
