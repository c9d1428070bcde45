"""BERT-style bidirectional encoder trained with the masked-LM objective (model.arch = "bert").

    python -m fastlm.train --model.preset=tiny-bert --data PATH

Architecture (the layout of Hugging Face's BertForMaskedLM, so fastlm.export_bert maps it tensor
for tensor and transformers' logits equal fastlm's):
  embeddings   token + learned position + token type (segment) embeddings, LayerNorm, dropout;
               the position table starts as sinusoids (see sinusoids(): measured, not taste)
  blocks       post-LN: x = LN(x + attn(x)), x = LN(x + mlp(x)); attention is bidirectional
               (fastlm.ops.attention(..., causal=False)); the MLP uses the exact (erf) GELU
  MLM head     dense C -> C, GELU, LayerNorm, then a decoder tied to the token embedding (unless
               model.tie_embeddings=false) plus a per-token bias
Post-LN (not the pre-LN of fastlm's GPT) because it is what BERT is: a pre-LN encoder could not be
exported as BertForMaskedLM. Post-LN needs a warmup, which every fastlm schedule has.

Special tokens: the model reserves four ids ABOVE the tokenizer's vocabulary, so no tokenizer
(byte tokens, or any trained BPE file) has to change and no real token is given up:

    [PAD] = vocab_size, [CLS] = vocab_size + 1, [SEP] = vocab_size + 2, [MASK] = vocab_size + 3

model.vocab_size stays the tokenizer's size (fastlm.train's resolve_vocab sets it as for any
model); the embedding and the MLM decoder have vocab_size + 4 rows (`self.n_tokens`), so forward's
logits are (..., vocab_size + 4). Only [MASK] (pretraining) and [CLS] (classification pooling) are
used; [PAD] and [SEP] are reserved so an exported model has BERT's full set. Tokenizer.byte(SPECIALS)
is the matching byte tokenizer (its specials get exactly these ids), used for the HF export.

Masked LM (make_batch): each position is chosen with probability model.mlm_probability (at least
one per row); of the chosen, 80% become [MASK], 10% a random token drawn from the tokenizer's ids
0 .. vocab_size - 1 (never one of the reserved specials), 10% stay. Targets are the original ids
at chosen positions, -100 elsewhere. The loss runs the MLM head on the chosen rows only (gathered;
never the full (B, T, V) logits) through fastlm.ops.cross_entropy.

Config keys read: vocab_size, block_size, n_layer, n_head, n_embd, mlp_hidden (0 = 4 * n_embd),
dropout, norm_eps (BERT uses 1e-12), tie_embeddings, type_vocab_size, mlm_probability. Biases are
always on (model.bias=false is refused): BERT has them in every layer.

Shapes: B batch, T sequence, C = n_embd, H heads, D = C // H, V = vocab_size + 4, M masked rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.config import ConfigError, ModelConfig
from fastlm.models.base import LanguageModel
from fastlm.models.gpt import LayerNorm
from fastlm.models.registry import register

SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")  # ids vocab_size + 0 .. 3, in this order
IGNORE = -100  # target of positions that carry no loss


def mlp_width(cfg: ModelConfig) -> int:
    return cfg.mlp_hidden or 4 * cfg.n_embd  # BERT's intermediate_size = 4 * hidden_size


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: every position sees every (non-pad) position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # one matmul, rows q | k | v
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); key_mask (B, 1, 1, T) bool: keys that exist (not padding)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if key_mask is None:
            y = ops.attention(q, k, v, causal=False)  # (B, H, T, D)
        else:  # ops.attention has no padding mask: padded batches use SDPA with an explicit one
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, mlp_width(cfg))
        self.down = nn.Linear(mlp_width(cfg), cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))  # exact GELU, as BERT's "gelu"


class Block(nn.Module):
    """Post-LN encoder layer (BERT): normalise after each residual sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = LayerNorm(cfg.n_embd, True, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.norm2 = LayerNorm(cfg.n_embd, True, cfg.norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, key_mask))  # (B, T, C)
        return self.norm2(x + self.mlp(x))


@register("bert", summary="BERT: bidirectional encoder, post-LN, masked-LM objective")
class BERT(LanguageModel):
    """Token ids (B, T) -> masked-LM logits (B, T, V) and the loss at the masked positions."""
    objective = "masked"
    pooling = "first"  # fastlm.classifier pools the [CLS] position (causal models: the last)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head "
                              f"({cfg.n_head})")
        if cfg.n_kv_head not in (0, cfg.n_head):
            raise ConfigError(f"model.n_kv_head={cfg.n_kv_head}: bert has no grouped-query "
                              "attention; leave it 0")
        if not cfg.bias:
            raise ConfigError("model.bias=false: bert has biases in every layer (as BERT); "
                              "leave model.bias=true")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        C = config.n_embd
        self.n_tokens = config.vocab_size + len(SPECIALS)  # the reserved ids follow the vocab
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = range(config.vocab_size,
                                                                     self.n_tokens)
        self.wte = nn.Embedding(self.n_tokens, C)
        self.wpe = nn.Embedding(config.block_size, C)
        self.wtt = nn.Embedding(config.type_vocab_size, C)  # token types (segments A / B)
        self.norm_emb = LayerNorm(C, True, config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head_dense = nn.Linear(C, C)  # BERT's MLM "transform": dense, GELU, LayerNorm
        self.head_norm = LayerNorm(C, True, config.norm_eps)
        self.lm_head = nn.Linear(C, self.n_tokens, bias=False)
        self.lm_bias = nn.Parameter(torch.zeros(self.n_tokens))
        self.apply(self._init_weights)
        with torch.no_grad():  # see sinusoids(): the position table starts with structure
            self.wpe.weight.copy_(sinusoids(config.block_size, C, std=0.06))
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's init: N(0, 0.02) for every matrix and table, zero biases (norms: ones / zeros).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- sizes -------------------------------------------------------------------------------
    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per input token: 6 per encoder parameter (every token runs the
        encoder), attention 12 * L * T * C, and the MLM head (C*C dense + C*V decoder) only on
        the mlm_probability share of tokens it runs on."""
        cfg = self.config
        T = seq_len or cfg.block_size
        encoder = sum(p.numel() for p in self.blocks.parameters())
        head = self.head_dense.weight.numel() + self.lm_head.weight.numel()
        return round(6 * encoder + 12 * cfg.n_layer * T * cfg.n_embd
                     + 6 * cfg.mlm_probability * head)

    # -- the masked-LM objective ---------------------------------------------------------------
    def make_batch(self, x: torch.Tensor, y: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loader batch x (B, T) (y, the next tokens, is not used) -> (corrupted inputs (B, T),
        targets (B, T): the original id where chosen, -100 elsewhere). Draws the same number of
        random values for any content, so a generator state replays the same masks."""
        return mask_tokens(x.long(), self.config.mlm_probability, self.config.vocab_size,
                           self.mask_id, generator)

    # -- forward -----------------------------------------------------------------------------
    def encode(self, idx: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of idx (B, T). lengths (B,): real tokens per row of a
        right-padded batch; the padding is masked out as keys (None = no padding)."""
        T = idx.shape[1]  # idx: (B, T)
        if T > self.config.block_size:
            raise ValueError(f"BERT: sequence length {T} exceeds model.block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(idx)
        x = self.wte(idx) + self.wpe(pos) + self.wtt(types)  # (B, T, C)
        x = self.drop(self.norm_emb(x))
        key_mask = None
        if lengths is not None:
            key_mask = (pos[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, key_mask)  # (B, T, C)
        return x

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The MLM head on hidden states (..., C) -> logits (..., V)."""
        h = self.head_norm(F.gelu(self.head_dense(h)))
        return self.lm_head(h) + self.lm_bias

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                return_logits: bool | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, V) or None, loss or None).

        loss: mean cross-entropy over the positions whose target is not -100 (targets (B, T));
        only those rows go through the MLM head. logits: all positions, returned without
        targets or with return_logits=True (evaluation; training never forms them).
        """
        x = self.encode(idx, token_type_ids, lengths)  # (B, T, C)
        if return_logits is None:
            return_logits = targets is None
        logits = self.mlm_logits(x) if return_logits else None  # (B, T, V)
        loss = None
        if targets is not None:
            flat = targets.reshape(-1)  # (B*T,)
            rows = (flat != IGNORE).nonzero().squeeze(1)  # (M,): the masked positions
            if rows.numel() == 0:
                raise ValueError("BERT: the targets mark no position to predict (all -100); "
                                 "make_batch masks at least one token per row")
            if logits is not None:
                picked = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)  # (M, V)
            else:
                picked = self.mlm_logits(x.reshape(-1, x.shape[-1]).index_select(0, rows))
            loss = ops.cross_entropy(picked, flat.index_select(0, rows))
        return logits, loss


def sinusoids(n: int, dim: int, std: float) -> torch.Tensor:
    """Sinusoidal position table (n, dim) (Vaswani et al.), scaled to standard deviation std:
    the initial value of BERT's learned position embeddings.

    Why not BERT's N(0, 0.02): a masked position learns nothing beyond unigram statistics until
    attention finds its neighbours (the [MASK] token itself says nothing), and random position
    vectors give no notion of "the next position" to find them by. Measured on tiny Shakespeare
    (shakespeare-bert, bytes): with the random table the masked val loss sat at 3.0 nats (the
    unigram entropy is 3.3) for 4,500 steps, attention uniform over offsets; with sinusoids
    (relative offsets are then linear maps of the table) it fell through 2.5 by step 1,500. Std
    0.06 (3x the token table's) beat 0.02 there. The table is still learned, and the model is
    BERT's function exactly (the export is unaffected).
    """
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    angles = pos * freq  # (n, ceil(dim/2))
    table = torch.empty(n, dim, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles[:, :dim // 2].cos()
    return (table * (std / table.std())).float()


def mask_tokens(x: torch.Tensor, probability: float, vocab_size: int, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of x (B, T) int64 -> (inputs (B, T), targets (B, T)).

    Each position is chosen with `probability`; a row with none chosen gets one at a uniform
    position. Chosen positions: 80% -> mask_id, 10% -> a uniform id in 0 .. vocab_size - 1 (so
    never a reserved special above the vocabulary), 10% unchanged; their target is the original
    id. Unchosen positions keep their id and get target -100.
    """
    B, T = x.shape
    chosen = torch.rand(B, T, generator=generator) < probability  # (B, T)
    fallback = torch.randint(T, (B,), generator=generator)  # drawn always: fixed RNG use
    empty = ~chosen.any(dim=1)
    chosen[empty, fallback[empty]] = True
    action = torch.rand(B, T, generator=generator)  # 80 / 10 / 10 split of the chosen
    random_ids = torch.randint(vocab_size, (B, T), generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    inputs = torch.where(to_mask, torch.full_like(x, mask_id), x)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(chosen, x, torch.full_like(x, IGNORE))
    return inputs, targets
