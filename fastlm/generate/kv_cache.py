"""The key/value cache of cached decoding: one preallocated buffer pair per layer.

Grouped-query aware: a layer stores Hkv (not H) heads, (B, Hkv, T_max, D), so a Llama model with
n_kv_head < n_head keeps n_head / n_kv_head times less. The buffers are allocated once, zero
filled (never-written slots stay finite, so a masked-out slot cannot leak NaN into the attention's
weighted sum), and written in place by fastlm.models.gpt.Attention; decoding never reallocates.

Left-padded batches (prompts of different lengths, see fastlm.generate) record which slots hold
real tokens in `valid` (B, T_max); a batch without padding leaves mask() returning None so the
attention takes the plain causal path through fastlm.ops.attention.

SlotCache is the other layout, for continuous batching (fastlm.serve): every row has its own
length, rows join and leave between steps, and a step writes each row's key at its own slot.
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


class CacheView:
    """Rows of a SlotCache as GPT.forward_cached sees a cache: k, v (L, n, Hkv, T_max, D) views
    of the slot buffers (writes land in the SlotCache), length an int (a prefill from slot
    position 0) or the rows' (n,) lengths (a decode step), max_len."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length, max_len: int):
        self.k, self.v, self.length, self.max_len = k, v, length, max_len


class SlotCache:
    """The cache of continuous batching (fastlm.generate.decode.ContinuousDecoder): `slots` rows, each
    with its own length, so a request can join while others are mid-answer and leave when done.

    Rows 0 .. active - 1 are in use, kept packed at the front (a leaving row's slot takes the
    last active row) so a decode step reads k[:, :active], a view, never a gather. Each row's
    keys sit at slots 0 .. lengths[r] - 1; a step writes row r's new key at lengths[r] and
    mask() hides every slot past each row's own length (stale keys of an earlier occupant
    included: they are finite, written by real tokens, and masked)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if slots < 1:
            raise ValueError(f"SlotCache: slots must be >= 1, got {slots}")
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"SlotCache: max_len must be in 1..block_size ({cfg.block_size}), "
                             f"got {max_len}")
        shape = (cfg.n_layer, slots, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, S, Hkv, T_max, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (S,)
        self.max_len, self.slots, self.active = max_len, slots, 0
        self._keys = torch.arange(max_len, device=device)  # (T_max,) slot positions, for masks

    def claim(self) -> tuple[int, CacheView]:
        """The next free row and a view of it for its prefill (length 0)."""
        if self.active == self.slots:
            raise RuntimeError(f"SlotCache: all {self.slots} slots are in use")
        r = self.active
        self.active += 1
        self.lengths[r] = 0
        return r, CacheView(self.k[:, r:r + 1], self.v[:, r:r + 1], 0, self.max_len)

    def set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length

    def decode_view(self) -> CacheView:
        """The active rows, for one decode step (write its new length back with commit())."""
        n = self.active
        return CacheView(self.k[:, :n], self.v[:, :n], self.lengths[:n], self.max_len)

    def commit(self, view: CacheView) -> None:
        self.lengths[:self.active] = view.length

    def mask(self) -> torch.Tensor:
        """(n, 1, 1, Tk) bool for a decode step: row r's query sees slots 0 .. lengths[r] (its
        cached keys and the one it writes), Tk = the longest active row + 1."""
        lengths = self.lengths[:self.active]
        Tk = int(lengths.max()) + 1
        return (self._keys[None, :Tk] <= lengths[:, None])[:, None, None, :]

    def release(self, row: int) -> int | None:
        """Free row; the last active row moves into it. Returns the index that moved (now
        `row`), or None when row was the last one."""
        last = self.active - 1
        self.active = last
        if row == last:
            return None
        n = int(self.lengths[last])
        self.k[:, row, :, :n] = self.k[:, last, :, :n]  # only the filled prefix is copied
        self.v[:, row, :, :n] = self.v[:, last, :, :n]
        self.lengths[row] = n
        return last
