"""Decoder-only transformer in two flavours, chosen by ModelConfig.arch:

  gpt2   learned positions, LayerNorm (optional bias), GELU MLP, tied embeddings (GPT-2)
  llama  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention with n_kv_head heads (Llama 2/3)

Every norm goes through fastlm.ops.layer_norm / rms_norm, attention through fastlm.ops.attention
and the head + loss through fastlm.ops.linear_cross_entropy (chunked, no full logits), so a
backend switch (ops.set_backend, the FASTLM_BACKEND variable or the kernels.backend config)
changes every hot path of the model.

Shapes: B batch, T sequence, C = n_embd, H query heads, Hkv key/value heads, D = C // H head
size, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.config import ConfigError, ModelConfig
from fastlm.models.base import LanguageModel
from fastlm.models.registry import register


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with an optional bias, computed by fastlm.ops."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (no bias, no mean subtraction), computed by fastlm.ops."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return LayerNorm(cfg.n_embd, cfg.bias, cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE), rotating pairs (i, i + D/2) of each head's features.

    The cos/sin tables are buffers built for block_size positions; they are not saved in the
    state dict (they follow from the config) and stay float32 when the model is cast to a lower
    precision (a bf16 angle table is off by whole radians at late positions).
    """

    def __init__(self, head_dim: int, block_size: int, theta: float):
        super().__init__()
        self.head_dim, self.block_size, self.theta = head_dim, block_size, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(None)

    def _build(self, device: torch.device | None) -> None:
        d = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
        inv_freq = self.theta ** (-d / self.head_dim)  # (D/2,)
        pos = torch.arange(self.block_size, dtype=torch.float64, device=device)
        angles = torch.outer(pos, inv_freq)  # (T, D/2)
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:  # model.to(dtype) cast the tables: rebuild them
            self._build(self.cos.device)
        return self

    def forward(self, x: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, H, T, D) -> (B, H, T, D), positions offset .. offset + T - 1, or per-row
        # positions (B, T) (left-padded batches in fastlm.generate start each row at 0)
        T, half = x.shape[-2], x.shape[-1] // 2
        if positions is None:
            cos = self.cos[offset:offset + T]  # (T, D/2)
            sin = self.sin[offset:offset + T]
        else:
            cos = self.cos[positions].unsqueeze(1)  # (B, 1, T, D/2)
            sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with Hkv <= H key/value heads (Hkv == H: plain multi-head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        bias = cfg.bias and cfg.arch == "gpt2"
        # One matmul for q, k and v: C -> (H + 2 Hkv) D.
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias)
        self.proj.residual = True  # scaled init, see GPT._init_weights
        self.rotary = (Rotary(self.head_dim, cfg.block_size, cfg.rope_theta)
                       if cfg.arch == "llama" else None)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). kv = (k_buf, v_buf, start): this layer's preallocated
        cache buffers (B, Hkv, T_max, D) (fastlm.generate.kv_cache.KVCache); the new keys/values are
        written at start .. start + T - 1 and the queries attend to everything up to there.
        positions (B, T): per-row RoPE positions; mask (B, 1, T, start + T) bool: keys each
        query may see (left-padded batches), None = plain causal."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        start = kv[2] if kv is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, start, positions), self.rotary(k, start, positions)
        if kv is not None:  # write in place (no per-step allocation), read the filled prefix
            k_buf, v_buf, _ = kv
            if isinstance(start, torch.Tensor):  # (B,) per-row slots, T == 1 (SlotCache)
                rows = torch.arange(B, device=x.device)
                k_buf[rows, :, start] = k[:, :, 0]  # (B, Hkv, D) into each row's own slot
                v_buf[rows, :, start] = v[:, :, 0]
                end = mask.shape[-1]  # the longest row; the mask hides others' unused slots
            else:
                k_buf[:, :, start:start + T] = k
                v_buf[:, :, start:start + T] = v
                end = start + T
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, Hkv, end, D)
        if T == 1 and kv is not None and q.device.type == "cpu":
            # One query per row: causal needs no mask (it sees every cached key), padding or
            # per-row lengths use theirs. On the CPU, float32 SDPA on the strided cache (a
            # bf16/fp16 one upcast first) beats the C++ kernel, which copies it: fp32 2-5x,
            # bf16 1.3-3x faster (B 1..16, Tk 90..400, d64, 1 thread, 2-core EPYC), at the bf16
            # kernels' error; bf16 SDPA itself is slower than both.
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                               enable_gqa=H != Hkv).to(q.dtype)
        elif mask is None:
            y = ops.attention(q, k, v, causal=True)  # (B, H, T, D), bottom-right causal
        else:  # ops.attention has no padding mask: padded batches use SDPA with an explicit one
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama): C -> hidden -> C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.gelu = "none" if cfg.gelu == "exact" else "tanh"  # F.gelu's `approximate`
        bias = cfg.bias and not self.swiglu
        hidden = cfg.hidden
        # SwiGLU's gate and up projections share one matmul: C -> 2 * hidden.
        self.up = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias)
        self.down.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu)  # GPT-2's tanh GELU unless model.gelu=exact
        return self.dropout(self.down(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv=None, positions=None, mask=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), kv, positions, mask)  # extras: see Attention.forward
        return x + self.mlp(self.norm2(x))


@register("llama", summary="Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention")
@register("gpt2", summary="GPT-2: learned positions, LayerNorm, GELU MLP")
class GPT(LanguageModel):
    """The language model: token ids (B, T) -> next-token logits (B, T, V) and the loss."""

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head "
                              f"({cfg.n_head})")
        if cfg.n_head % cfg.kv_heads:
            raise ConfigError(f"model.n_head ({cfg.n_head}) must be divisible by "
                              f"model.n_kv_head ({cfg.n_kv_head})")
        if cfg.arch == "llama" and cfg.head_dim % 2:
            raise ConfigError(f"model: RoPE needs an even head size, but n_embd/n_head = "
                              f"{cfg.n_embd}/{cfg.n_head} = {cfg.head_dim}")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (nn.Embedding(config.block_size, config.n_embd)
                    if config.arch == "gpt2" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init: N(0, 0.02) everywhere, and the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding leaves out the token and position
        tables, the count that scaling laws and flops_per_token use."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per non-embedding parameter (the
        output head included), plus attention scores and weighted sums, 12 * L * T * C."""
        T = seq_len or self.config.block_size
        n = self.num_params(non_embedding=True)
        if self.config.tie_embeddings:  # the head's matmul still runs on the shared table
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * self.config.n_layer * T * self.config.n_embd

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                last_only: bool = False, return_logits: bool | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 -> (logits, loss).

        logits: (B, T, V) in float32-or-model dtype; (B, 1, V) with last_only (generation needs
        only the last position). loss: mean cross-entropy against targets (B, T) (entries equal
        to -100 are ignored), or None without targets.
        With targets, the loss comes from fastlm.ops.linear_cross_entropy, which never forms the
        (B*T, V) logits, and logits is None unless return_logits=True (default: logits only
        without targets).
        """
        T = idx.shape[1]  # idx: (B, T)
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds model.block_size "
                             f"{self.config.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))  # + (T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.head_and_loss(self.norm_f(x), targets, last_only, return_logits)

    def forward_cached(self, idx: torch.Tensor, cache, positions: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for new tokens idx (B, T) that follow the cache.length tokens already held by
        `cache` (fastlm.generate.kv_cache.KVCache), which receives their keys/values -> (B, T, V), or
        (B, 1, V) with last_only. positions (B, T): per-row positions (default cache.length ..
        cache.length + T - 1); mask (B, 1, T, cache.length + T) bool: visible keys (None =
        causal). Used by fastlm.generate; forward() stays the training path."""
        T, start = idx.shape[1], cache.length  # int, or (B,) per-row lengths (SlotCache)
        held = start if isinstance(start, int) else int(start.max())
        if held + T > cache.max_len:
            raise ValueError(f"GPT.forward_cached: {held} cached + {T} new tokens exceed the "
                             f"cache's {cache.max_len} positions")
        if not isinstance(start, int) and positions is None:
            positions = start[:, None]  # (B, 1): each row continues at its own length
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            pos = positions if positions is not None else torch.arange(start, start + T,
                                                                       device=idx.device)
            x = x + self.wpe(pos)  # + (B, T, C) or (T, C)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, (cache.k[i], cache.v[i], start), positions, mask)  # (B, T, C)
        cache.length = start + T
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(x)
