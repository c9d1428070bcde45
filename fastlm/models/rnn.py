"""Recurrent language models over torch's fused nn.LSTM / nn.GRU, chosen by ModelConfig.arch:

  lstm   token embedding -> dropout -> n_layer LSTM layers -> dropout -> head (char-rnn's model)
  gru    the same with GRU cells (3 gates instead of 4: ~3/4 of the recurrent weights and FLOPs)

The recurrence runs in torch's fused kernels (cuDNN on NVIDIA GPUs, oneDNN / the native loop on
CPU): one op for the whole (B, T) sequence and every layer, the well-kept fast path, so there is
no per-step Python and nothing for activation checkpointing to split (checkpoint_units() = []).

Training is truncated backpropagation through time (fastlm.train with `recurrent = True`): each
batch row reads its own contiguous stream of the text (TextCorpus/ShardCorpus.stream_batch), and
the hidden state at the end of one batch is the initial state of the next (detached, so the
gradient stops at the batch boundary while the context flows on).

Config keys read: vocab_size, n_layer (stacked recurrent layers), n_embd (embedding width = hidden
size, so the head can share the embedding table), dropout (after the embedding, between recurrent
layers and before the head), tie_embeddings, bias (the cells' biases). block_size only sets the
default training window (train.seq_len): the model itself has no length limit and generation
carries the state instead of re-running a window. n_head and the transformer-only keys are unused.

State: a tuple of (n_layer, B, C) tensors, (h, c) for lstm and (h,) for gru; None = zeros.
Shapes: B batch, T sequence, C = n_embd (embedding and hidden width), L n_layer, V vocabulary.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastlm.config import ModelConfig
from fastlm.models.base import LanguageModel, sample_next
from fastlm.models.registry import register

State = tuple[torch.Tensor, ...]


@register("lstm", "gru", summary="recurrent LM over torch's fused nn.LSTM / nn.GRU "
                                 "(truncated BPTT on contiguous streams)")
class RNNLM(LanguageModel):
    """Token ids (B, T) and an optional carried state -> next-token logits, loss, new state."""

    recurrent = True

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        C, L = config.n_embd, config.n_layer
        if config.arch not in ("lstm", "gru"):
            raise ValueError(f"RNNLM builds model.arch lstm or gru, not {config.arch!r}")
        cell = nn.LSTM if config.arch == "lstm" else nn.GRU
        self.wte = nn.Embedding(config.vocab_size, C)
        self.drop = nn.Dropout(config.dropout)
        # Hidden size = embedding width: the head reads the top layer's h directly and can share
        # the embedding table, with no projection in between (LSTM's proj_size would cost an
        # extra C x C matmul per step and does not help at these sizes).
        self.rnn = cell(C, C, num_layers=L, bias=config.bias, batch_first=True,
                        dropout=config.dropout if L > 1 else 0.0)  # torch warns on 1 layer
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # The cells keep torch's U(-1/sqrt(C), 1/sqrt(C)) weights, so a gate's input term has
        # about 1/3 of the variance of the embedding entries: the embedding starts at U(-1, 1)
        # (std 0.58) for the input to drive the gates about as much as the recurrent h in (-1, 1)
        # does. The word-LM habit U(-0.1, 0.1) left the input nearly silent: on tiny Shakespeare
        # the loss sat on the unigram plateau (~3.3) for 150 steps, where U(-1, 1) reached 2.2
        # (shakespeare-lstm, 150 steps at constant lr). The tied head's first logits stay near
        # uniform because h starts small; torch's N(0, 1) default learns as fast but does not.
        nn.init.uniform_(self.wte.weight, -1.0, 1.0)
        if not self.config.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        if self.config.bias and self.config.arch == "lstm":
            # Forget-gate bias 1 (Jozefowicz et al., 2015): the cell keeps its memory by default
            # at the start, so gradients reach further back. On 64-token windows it made no
            # clear difference in 150 steps (val 2.14 vs 2.09 with zero biases, one seed); it is
            # kept for longer windows. Gate order in torch: i, f, g, o.
            C = self.config.n_embd
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias"):
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        nn.init.ones_(p[C:2 * C])

    # -- sizes -------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), counting the matmuls: per layer and
        token the gates' input and recurrent products, 2 * G * (C*C + C*C) with G = 4 gates
        (lstm) or 3 (gru), plus the head, 2 * C * V; the backward costs twice the forward, so
        x3 overall = 6 * (matmul weights). Gate nonlinearities and biases (O(C) per token) are
        left out, as GPT leaves out its norms. Independent of seq_len: the cost per token of a
        recurrence does not grow with the context."""
        C, V, L = self.config.n_embd, self.config.vocab_size, self.config.n_layer
        gates = 4 if self.config.arch == "lstm" else 3
        return 6 * (L * gates * 2 * C * C + C * V)

    def checkpoint_units(self) -> list[nn.Module]:
        return []  # the fused recurrence is one op over all layers and steps: no blocks to split

    # -- the model ---------------------------------------------------------------------------
    def _initial(self, state: State | None, x: torch.Tensor):
        """The nn.LSTM / nn.GRU hx argument for input x (B, T, C) from our state tuple."""
        if state is None:
            return None  # zeros
        B, L, C = x.shape[0], self.config.n_layer, self.config.n_embd
        want = 2 if self.config.arch == "lstm" else 1
        if len(state) != want or any(s.shape != (L, B, C) for s in state):
            got = [tuple(s.shape) for s in state]
            raise ValueError(f"RNNLM({self.config.arch}): state must be {want} tensor(s) of "
                             f"shape (n_layer, B, n_embd) = {(L, B, C)}; got {got}")
        # A state from a bf16 autocast step fed to an fp32 step (or the reverse): the cell wants
        # its input's dtype; autocast, when on, casts both again.
        state = tuple(s.to(x.dtype) for s in state)
        return state if want == 2 else state[0]

    def _cells(self, x, hx):
        """self.rnn(x, hx). Under CPU autocast nn.LSTM / nn.GRU go to oneDNN's low-precision
        RNN, which cannot be built on CPUs without AVX-512 (a Zen 3 EPYC: "could not create a
        primitive descriptor"); there the cells run torch's own kernels, in float32, instead
        of failing."""
        data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
        if data.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return self.rnn(x, hx)
        dtype = torch.get_autocast_dtype("cpu")
        if _onednn_rnn_runs(dtype):
            return self.rnn(x, hx)
        with _without_onednn():
            return self.rnn(x, hx)

    @staticmethod
    def _as_state(hx) -> State:
        return tuple(hx) if isinstance(hx, tuple) else (hx,)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: State | None = None, return_state: bool = False,
                last_only: bool = False, return_logits: bool | None = None):
        """idx (B, T) int64 -> (logits, loss), or (logits, loss, state) with return_state.

        state: the carried hidden state (see the module docstring), None = zeros; the returned
        state is the one after the last token, still attached to the graph (the trainer
        detaches it). logits (B, T, V), or (B, 1, V) with last_only; with targets (B, T) the loss
        comes from fastlm.ops.linear_cross_entropy (no full logits; -100 entries ignored) and
        logits is None unless return_logits=True, as in GPT.forward.
        """
        x = self.drop(self.wte(idx))  # (B, T, C)
        h, hx = self._cells(x, self._initial(state, x))  # (B, T, C); hx: final state per layer
        h = self.drop(h)
        out = self.head_and_loss(h, targets, last_only, return_logits)
        return (*out, self._as_state(hx)) if return_state else out

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample max_new_tokens continuing idx (B, T0) -> (B, T0 + max_new_tokens): the prompt
        runs once, then each new token is one step of the recurrence from the carried state
        (O(1) per token, no window re-run and no context limit)."""
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
        if max_new_tokens <= 0:
            return idx
        logits, _, state = self(idx, state=None, return_state=True, last_only=True)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, generator)  # (B, 1)
            idx = torch.cat((idx, nxt), 1)
            if i + 1 < max_new_tokens:
                logits, _, state = self(nxt, state=state, return_state=True)  # (B, 1, V)
        return idx

    # -- the cached-decoding interface of fastlm.generate (GPT.forward_cached's counterpart) --
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> RNNCache:
        return RNNCache(batch, max_len)

    def forward_cached(self, idx: torch.Tensor, cache: RNNCache,
                       positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       last_only: bool = False) -> torch.Tensor:
        """Logits for new tokens idx (B, T) following the cache.length tokens whose state the
        cache holds -> (B, T, V), or (B, 1, V) with last_only; the cache takes the new state.
        Left padding (cache.set_padding before the prefill) is skipped, so a padded row's state
        is the one its real tokens give; positions and mask (attention's) are not needed."""
        T = idx.shape[1]  # idx: (B, T)
        if cache.length + T > cache.max_len:
            raise ValueError(f"RNNLM.forward_cached: {cache.length} cached + {T} new tokens "
                             f"exceed the cache's {cache.max_len} positions")
        pad = cache.take_padding(T)  # (B, T) bool or None
        x = self.drop(self.wte(idx))  # (B, T, C)
        if pad is None:
            h, hx = self._cells(x, self._initial(cache.state, x))  # (B, T, C)
        else:
            h, hx = self._run_left_padded(x, pad, cache.state)
        cache.state, cache.length = self._as_state(hx), cache.length + T
        return self.head_and_loss(self.drop(h), None, last_only, True)[0]

    def _run_left_padded(self, x: torch.Tensor, pad: torch.Tensor, state: State | None):
        """The recurrence over left-padded rows x (B, T, C), pad (B, T) True on the left: each
        row's real tokens are moved to the front and packed, so the state never sees padding;
        outputs go back to the padded layout (zeros at padding)."""
        T = x.shape[1]  # x: (B, T, C)
        lens = (~pad).sum(1)  # (B,)
        if bool((lens == 0).any()):
            raise ValueError("RNNLM.forward_cached: a row is all padding")
        ar = torch.arange(T, device=x.device)
        shift = (T - lens)[:, None]  # (B, 1) padding per row
        front = torch.gather(x, 1, ((ar[None] + shift) % T)[..., None].expand_as(x))
        packed = pack_padded_sequence(front, lens.cpu(), batch_first=True, enforce_sorted=False)
        h, hx = self._cells(packed, self._initial(state, x))
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=T)  # (B, T, C), real first
        back = torch.gather(h, 1, ((ar[None] - shift) % T)[..., None].expand_as(h))
        return back.masked_fill(pad[..., None], 0.0), hx


class RNNCache:
    """The decoding state of an RNNLM for fastlm.generate, in place of a KV cache: the carried
    hidden state (constant size, whatever the length) and the cache interface BatchDecoder uses
    (length, max_len, batch, set_padding, mask, reset)."""

    def __init__(self, batch: int, max_len: int):
        if batch < 1 or max_len < 1:
            raise ValueError(f"RNNCache: batch and max_len must be >= 1, got {batch}, {max_len}")
        self.batch, self.max_len = batch, max_len
        self.state: State | None = None
        self.length = 0
        self.padded = False
        self._pad: torch.Tensor | None = None

    def reset(self) -> None:
        self.state, self.length, self.padded, self._pad = None, 0, False, None

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.state or ())

    def set_padding(self, pad: torch.Tensor) -> None:
        """pad (B, T) bool: True where the next T tokens are left padding (prefill only)."""
        if self.length:
            raise ValueError("RNNCache: padding is only supported in the first (prefill) call")
        if bool(pad.any()):
            self._pad, self.padded = pad, True

    def take_padding(self, T: int) -> torch.Tensor | None:
        pad, self._pad = self._pad, None
        if pad is not None and pad.shape[1] != T:
            raise ValueError(f"RNNCache: padding for {pad.shape[1]} tokens, but {T} came")
        return pad

    def mask(self, T: int) -> None:
        return None  # no attention: padding is handled by packing (RNNLM.forward_cached)


@functools.cache
def _onednn_rnn_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN builds an LSTM/GRU under autocast to dtype (probed once)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            for cell in (nn.LSTM(8, 8, batch_first=True), nn.GRU(8, 8, batch_first=True)):
                cell(torch.zeros(1, 2, 8))
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _without_onednn():
    # torch.backends.mkldnn.flags() would also reset (and warn about) oneDNN's TF32 setting
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)
