"""The interface every fastlm language model offers to the trainer, evaluation and checkpoints.

The training loop never asks which architecture it runs; it asks the model:

  forward(idx, targets=None) -> (logits, loss)   the loss is the model's own objective
  objective                "causal" (predict the next token) or "masked" (predict masked tokens)
  make_batch(x, y, gen)    turns a loader batch (x, next tokens y) into (inputs, targets) for
                           that objective; the masked objective draws its mask from `gen`, the
                           trainer's checkpointed generator, so resume replays the same masks
  recurrent                True: forward(..., state=s, return_state=True) -> (logits, loss, s')
                           carries a hidden state across consecutive batches (truncated BPTT)
  num_params / flops_per_token(seq_len)   throughput and MFU
  param_groups(weight_decay)              decay matrices only (param_groups below)
  checkpoint_units()       the repeated blocks: units of activation checkpointing and FSDP
  generate(idx, n, ...)    sampling for the text the trainer prints

Subclasses register under one or more `model.arch` names in fastlm.models.registry.
"""
from __future__ import annotations

import torch
from torch import nn

from fastlm import ops
from fastlm.config import ModelConfig


_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices of linear layers decay; norms, biases and embeddings do not.

    Decaying a norm's gain or a bias pulls it towards 0, which only fights the model; embeddings
    are lookup tables whose rows see few updates each. A weight shared between modules (tied
    embedding and output head) is an embedding and appears once. Frozen parameters (LoRA's base
    weights) are left out.
    """
    no_decay_ids = set()
    for module in model.modules():
        is_norm = isinstance(module, _NO_DECAY_MODULES) or type(module).__name__.endswith("Norm")
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or isinstance(module, nn.Embedding) or p.dim() < 2:
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # deduplicates shared parameters
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class LanguageModel(nn.Module):
    objective: str = "causal"
    recurrent: bool = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config

    # -- sizes -------------------------------------------------------------------------------
    def embedding_params(self) -> int:
        """Parameters of the lookup tables (token, position, type embeddings), which
        num_params(non_embedding=True) leaves out. Override when the model has them."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, shared (tied) tensors once."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding_params() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward)."""
        raise NotImplementedError(f"{type(self).__name__} must define flops_per_token")

    # -- training hooks ----------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    def make_batch(self, x: torch.Tensor, y: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for this model's objective from a loader batch; x, y: (B, T)."""
        return x, y

    def checkpoint_units(self) -> list[nn.Module]:
        """Repeated blocks for activation checkpointing and FSDP sharding ([] = none)."""
        blocks = getattr(self, "blocks", None)
        return list(blocks) if blocks is not None else []

    # -- output head ---------------------------------------------------------------------------
    def head_and_loss(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                      last_only: bool = False, return_logits: bool | None = None,
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final hidden states x (B, T, C) through self.lm_head -> (logits, loss).

        logits: (B, T, V), or (B, 1, V) with last_only; by default only without targets.
        loss: mean cross-entropy against targets (B, T) (-100 ignored) from
        fastlm.ops.linear_cross_entropy: the head's matmul fused with the loss chunk by chunk,
        because the (B*T, V) float32 logits are the largest activation of a small model and
        are never needed whole.
        """
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if return_logits is None:
            return_logits = targets is None
        logits = self.lm_head(x) if return_logits else None  # (B, T, V)
        loss = None
        if targets is not None:
            h, w = x.reshape(-1, x.shape[-1]), self.lm_head.weight  # (B*T, C), (V, C)
            dev = x.device.type
            if torch.is_autocast_enabled(dev):  # the op takes one dtype: autocast's, made here
                dtype = torch.get_autocast_dtype(dev)
                h, w = h.to(dtype), w.to(dtype)
            with torch.autocast(dev, enabled=False):  # its inner matmuls keep that dtype
                loss = ops.linear_cross_entropy(h, w, targets.reshape(-1))
        return logits, loss

    # -- sampling ----------------------------------------------------------------------------
    @property
    def generation_window(self) -> int:
        """Tokens of context generate() runs again at each step."""
        return self.config.block_size

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample max_new_tokens continuing idx (B, T0) -> (B, T0 + max_new_tokens), running
        the last generation_window tokens again each step (fastlm.generate is the fast path)."""
        if self.objective != "causal":
            raise ValueError(f"{type(self).__name__} is a {self.objective} model: it does not "
                             "generate text left to right")
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.generation_window:]  # (B, <=window)
            logits, _ = self(context, last_only=True)
            idx = torch.cat((idx, sample_next(logits[:, -1], temperature, top_k, generator)), 1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """One sampled token per row from last-position logits (B, V) -> (B, 1)."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
