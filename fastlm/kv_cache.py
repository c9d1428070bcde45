"""The key/value cache of cached decoding: one preallocated buffer pair per layer.

Grouped-query aware: a layer stores Hkv (not H) heads, (B, Hkv, T_max, D), so a Llama model with
n_kv_head < n_head keeps n_head / n_kv_head times less. The buffers are allocated once, zero
filled (never-written slots stay finite, so a masked-out slot cannot leak NaN into the attention's
weighted sum), and written in place by fastlm.models.gpt.Attention; decoding never reallocates.

Left-padded batches (prompts of different lengths, see fastlm.generate) record which slots hold
real tokens in `valid` (B, T_max); a batch without padding leaves mask() returning None so the
attention takes the plain causal path through fastlm.ops.attention.
"""
from __future__ import annotations

import torch

from fastlm.config import ModelConfig


class KVCache:
    """k[i], v[i]: layer i's (B, Hkv, T_max, D) buffers; length: slots filled so far (shared by
    every row: rows of a batch are aligned on the right, padding on the left)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"KVCache: max_len must be in 1..block_size ({cfg.block_size}), "
                             f"got {max_len}")
        if batch < 1:
            raise ValueError(f"KVCache: batch must be >= 1, got {batch}")
        shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, T_max, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # (B, T_max)
        self.padded = False
        self.max_len = max_len
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset(self) -> None:
        """Forget the tokens (the buffers are reused as they are)."""
        self.length = 0
        self.valid.fill_(True)
        self.padded = False

    def set_padding(self, pad: torch.Tensor) -> None:
        """pad (B, T) bool: True where the next T slots hold left padding, not tokens."""
        T = pad.shape[1]
        self.valid[:, self.length:self.length + T] = ~pad
        self.padded = self.padded or bool(pad.any())

    def mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, length + T) bool for T new queries: causal (bottom-right aligned) and only
        real keys; None when no row is padded. A padding query sees at least itself, so its
        softmax row is never empty (its output is discarded anyway)."""
        if not self.padded:
            return None
        Tk = self.length + T
        i = torch.arange(T, device=self.valid.device)[:, None] + self.length  # query slots
        j = torch.arange(Tk, device=self.valid.device)[None, :]  # key slots
        allowed = (j <= i) & self.valid[:, None, :Tk]  # (B, T, Tk)
        allowed = allowed | (j == i)
        return allowed.unsqueeze(1)  # (B, 1, T, Tk)
