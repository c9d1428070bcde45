"""Text generation with a KV cache: sampling, batched prompts, streaming, and the CLI

    python -m fastlm.generate --checkpoint RUN_OR_STEP_DIR --prompt "def " [--max-new-tokens 200
        --temperature 0.8 --top-k 50 --top-p 0.95 --min-p 0.05 --repetition-penalty 1.1
        --stop "\\n\\n" --seed 0 --tokenizer tok.json --device cpu --precision auto|fp32|bf16]

--precision auto (the default, shared with fastlm.chat and fastlm.serve) loads bfloat16 weights
where the hardware computes bf16 natively and float32 elsewhere (fastlm.precision); --precision
fp32 forces float32, --dtype casts to exactly the dtype given.

    from fastlm.generate.decode import generate
    from fastlm.restore import load
    model, tokenizer, meta = load("runs/x", pack=True)  # eval mode, CPU Linears packed
    text = generate(model, tokenizer, "def ", max_new_tokens=50, temperature=0)

How a batch of prompts of different lengths runs (BatchDecoder): the prompts are LEFT-padded to
the longest one, so every row's newest token sits in the same cache slot and one (B, 1) forward
decodes them all. Each row's positions count from its first real token (learned positions and
RoPE both see 0, 1, 2, ... exactly as for the prompt alone), and the KV cache's `valid` mask
hides the padding slots from every query. A batch without padding takes the plain causal path.
ContinuousDecoder (the server's) instead gives every row its own cache length, so requests join
and leave a running batch between steps.

Nothing in a decode step grows with the answer except attention over the cache: the cache is
written in place, the logits of the last position only are formed, text is detokenised one
token at a time (TextStream) and sampling never sorts the whole vocabulary unless top-p needs it.

Sampling, per row (rows may carry different SamplingParams, as server requests do), in the order
Hugging Face applies it: repetition penalty over prompt + generated ids (CTRL's rule: positive
logits divided, negative multiplied), temperature (0 = greedy argmax), top-k, top-p (smallest
set whose probability reaches p), min-p (drop tokens below min_p * the top probability). Each
row owns a torch.Generator seeded from its `seed`, so the same seed gives the same text whatever
else is in the batch.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fastlm import checkpoint as ckpt
from fastlm.command import run_command
from fastlm.config import ModelConfig
from fastlm.generate.kv_cache import KVCache, SlotCache
from fastlm.models.base import LanguageModel
from fastlm.models.gpt import GPT
from fastlm.precision import resolve_precision
from fastlm.restore import Restored, load
from fastlm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the field that is out of range; returns self."""
        checks = [("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                  ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        # torch.Generator.manual_seed takes a signed or unsigned 64-bit integer, nothing wider
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")
        return self


# ---------------------------------------------------------------------------------------------
# Sampling
def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]  # (B, 1)


def next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator], seen: torch.Tensor | None) -> torch.Tensor:
    """logits (B, V) float32 -> next ids (B,) int64. seen (B, V) bool: ids already in each row
    (for the repetition penalty; None when no row uses it)."""
    if seen is not None:
        rp = _row_tensor([p.repetition_penalty for p in params], logits)
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    out = logits.argmax(dim=-1)  # (B,) greedy rows keep this
    for r, p in enumerate(params):
        if p.temperature > 0:
            out[r] = _sample_row(logits[r] / p.temperature, p, generators[r])
    return out


def _sample_row(lg: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One row's draw from logits lg (V,), already divided by the temperature.

    Only top-k and top-p need the candidates in order, and only the first top_k of them: they
    are taken with topk(k) (top-p alone: topk(256), a full sort only when the nucleus is
    larger). Temperature and min-p
    alone draw from the unsorted distribution (min-p compares to the top probability, whatever
    the order). A sort of the whole vocabulary costs ~13 ms a row on this CPU, more than a
    decode step's matmuls at batch 16. Rows are drawn one by one with their own generator, so a
    row's text never depends on the rest of the batch."""
    V = lg.shape[-1]
    order = None
    if 0 < p.top_k < V:
        lg, order = lg.topk(p.top_k)  # (K,) descending
        probs = torch.softmax(lg, dim=-1)
    elif p.top_p < 1:
        probs = torch.softmax(lg, dim=-1)
        # The nucleus usually lies in the first few hundred tokens: when their mass reaches
        # top_p every later token is cut anyway, so they are the exact candidates; else sort all.
        top, order = probs.topk(min(V, 256))
        if float(top.sum()) < p.top_p:
            top, order = probs.sort(descending=True)
        probs = top
    else:
        probs = torch.softmax(lg, dim=-1)
    if p.top_p < 1:
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
        cut = before >= p.top_p
        cut[0] = False  # the most likely token always stays
        probs = probs.masked_fill(cut, 0.0)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    pick = _draw(probs, generator)
    return pick if order is None else int(order[pick])


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn with probability proportional to weights (V,) (>= 0, not normalised), by
    inverting the cumulative sum at one uniform number: ~0.1 ms for 50k ids where
    torch.multinomial takes ~2 ms (it draws one random number per id). A zero weight is never
    drawn: its cumulative sum equals its predecessor's, which searchsorted finds first."""
    cdf = weights.double().cumsum(0)  # float64: no drift over a 100k-id vocabulary
    u = torch.rand((), generator=generator, dtype=torch.float64, device=cdf.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), weights.shape[0] - 1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------
# Batched decoding
def check_prompt(prompt: Sequence[int], cfg: ModelConfig, i: int = 0) -> None:
    """ValueError naming what is wrong with token prompt number i."""
    if len(prompt) == 0:
        raise ValueError(f"generate: prompt {i} is empty (give at least one token)")
    if len(prompt) > cfg.block_size:
        raise ValueError(f"generate: prompt {i} has {len(prompt)} tokens, more than the model's "
                         f"context of {cfg.block_size}")
    if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
        raise ValueError(f"generate: prompt {i} holds ids outside 0..{cfg.vocab_size - 1}")


class BatchDecoder:
    """Decodes a batch of token prompts together, one token per row per step().

        dec = BatchDecoder(model, [[1, 2, 3], [4]], [SamplingParams(temperature=0)] * 2)
        while not dec.done:
            new = dec.step()  # list: the row's new id, or None for a row already finished

    A row finishes with reason "stop" (a stop id was sampled; it is not kept), "length" (its
    max_new_tokens, or the model's block_size, was reached) or whatever finish(row, reason)
    was given (stop strings, a client that went away). Finished rows still ride along in the
    batch (their tokens are ignored) until every row is done.
    """

    def __init__(self, model: LanguageModel, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 stop_ids: Sequence[int] = (), vocab_limit: int | None = None):
        cfg = model.config
        if not prompts:
            raise ValueError("generate: no prompts")
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        for p in params:
            p.validate()
        lens = [len(p) for p in prompts]
        for i, p in enumerate(prompts):
            check_prompt(p, cfg, i)
        self.model, self.params, self.stop_ids = model, params, set(stop_ids)
        # ids >= vocab_limit are never sampled: a model whose vocabulary was padded past its
        # tokenizer's (a multiple of 64 for speed) must not emit ids nothing can decode
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < cfg.vocab_size else None
        param = next(model.parameters())
        device = self.device = param.device
        B, L = len(prompts), max(lens)
        max_len = min(cfg.block_size, L + max(p.max_new_tokens for p in params))
        new_cache = getattr(model, "new_cache", None)  # models without attention bring their own
        self.cache = (new_cache(B, max_len, param.dtype, device) if new_cache is not None
                      else KVCache(cfg, B, max_len, param.dtype, device))
        idx = torch.zeros(B, L, dtype=torch.long)  # (B, L), left padded with id 0
        for r, p in enumerate(prompts):
            idx[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
        pad = torch.arange(L)[None, :] < torch.tensor([L - n for n in lens])[:, None]  # (B, L)
        self._idx, self._pad = idx.to(device), pad.to(device)
        self.padded = bool(pad.any())
        # positions of the next token, per row: a row's first real token is position 0
        self._next_pos = torch.tensor(lens, device=device)  # (B,)
        self.generators = [_generator(p.seed, device) for p in params]
        self.seen = None
        if any(p.repetition_penalty != 1 for p in params):
            self.seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, self._idx, ~self._pad)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish_reason: list[str | None] = [None] * B
        self.prompt_tokens = lens

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reason)

    def finish(self, row: int, reason: str) -> None:
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason

    # inference_mode, not no_grad: no version counters or view tracking on the ~300 small ops
    # of a step (1.6-2.6 ms of a gpt2-124m step, 1 thread, 2-core Xeon). Tensors made here stay
    # inside the decoder; the caller's (cache buffers, weights) are ordinary ones, written in place.
    @torch.inference_mode()
    def step(self) -> list[int | None]:
        if self.done:
            raise RuntimeError("BatchDecoder.step: every row has finished")
        cache = self.cache
        if cache.length == 0:  # prefill: the whole (padded) prompts at once
            cache.set_padding(self._pad)
            positions = ((~self._pad).cumsum(dim=1) - 1).clamp(min=0) if self.padded else None
            logits = self.model.forward_cached(self._idx, cache, positions,
                                               cache.mask(self._idx.shape[1]), last_only=True)
        else:
            positions = self._next_pos[:, None] if self.padded else None  # (B, 1)
            logits = self.model.forward_cached(self._last[:, None], cache, positions,
                                               cache.mask(1))
            self._next_pos += 1
        logits = logits[:, -1].float()  # (B, V)
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        nxt = next_tokens(logits, self.params, self.generators, self.seen)  # (B,)
        self._last = nxt
        if self.seen is not None:
            self.seen.scatter_(1, nxt[:, None], True)
        out: list[int | None] = []
        for r, t in enumerate(nxt.tolist()):
            if self.finish_reason[r] is not None:
                out.append(None)
                continue
            if t in self.stop_ids:
                self.finish(r, "stop")
                out.append(None)
                continue
            self.tokens[r].append(t)
            out.append(t)
            if len(self.tokens[r]) >= self.params[r].max_new_tokens or cache.length >= cache.max_len:
                self.finish(r, "length")
        return out


# ---------------------------------------------------------------------------------------------
# Text: incremental detokenisation and stop strings
class TextStream:
    """Turns one row's ids into text deltas, holding back what may still become a stop string
    or an unfinished UTF-8 sequence, and cutting the text before the first stop string.

    Each push costs O(1) in the length of the answer: only the new token's bytes are decoded
    (an incremental UTF-8 decoder keeps a split character's first bytes), and only the held-back
    tail is searched for stop strings. That suffices: a stop string can only end in the newest
    text, and if it began in already emitted text, that text would have been held back."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._emitted: list[str] = []
        self._held = ""  # decoded, not yet shown: it may start a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def push(self, token: int) -> str:
        """Add one id; returns the new text that is safe to show ('' while held back)."""
        held = self._held + self._utf8.decode(self.tokenizer.decode_bytes([token]))
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return self._emit(held[:min(hits)])
        keep = 0
        for s in self.stop:  # longest tail of the text that starts a stop string
            for k in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:k]):
                    keep = k
                    break
        self._held = held[len(held) - keep:]
        return self._emit(held[:len(held) - keep])

    def flush(self) -> str:
        """The rest of the text when the row ends without a stop string."""
        if self.stopped:
            return ""
        rest, self._held = self._held + self._utf8.decode(b"", final=True), ""
        return self._emit(rest)

    def _emit(self, piece: str) -> str:
        if piece:
            self._emitted.append(piece)
        return piece


@dataclass
class Event:
    """One streamed piece of a row's answer; finish_reason is set on the row's last event."""
    row: int
    text: str
    token: int | None = None
    finish_reason: str | None = None


def stop_ids_of(tokenizer: Tokenizer) -> list[int]:
    """Ids that end a generation: <|endoftext|> when the tokenizer has it."""
    return [] if tokenizer.eot_id is None else [tokenizer.eot_id]


def stream(model: LanguageModel, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
           params: SamplingParams | Sequence[SamplingParams],
           decoder_hook=None) -> Iterator[Event]:
    """Generate for every prompt together, yielding Events as text becomes safe to show.
    decoder_hook(decoder) is called before each step (the server uses it to cancel rows)."""
    ids = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p)
           for p in prompts]
    dec = BatchDecoder(model, ids, params, stop_ids_of(tokenizer), tokenizer.vocab_size)
    texts = [TextStream(tokenizer, p.stop) for p in dec.params]
    ended = [False] * len(ids)
    while not dec.done:
        if decoder_hook is not None:
            decoder_hook(dec)
            if dec.done:
                break
        for r, t in enumerate(dec.step()):
            if ended[r]:
                continue
            delta = "" if t is None else texts[r].push(t)
            if texts[r].stopped:
                dec.finish(r, "stop")
            reason = dec.finish_reason[r]
            if reason is not None:  # the row's last event carries its last token too
                ended[r] = True
                delta += texts[r].flush()
            yield Event(r, delta, t, reason)
    for r in range(len(ids)):  # rows finished by the hook
        if not ended[r]:
            yield Event(r, texts[r].flush(), None, dec.finish_reason[r])


# ---------------------------------------------------------------------------------------------
# Continuous batching
@dataclass
class _Row:
    key: int
    params: SamplingParams
    generator: torch.Generator
    text: TextStream
    n_out: int = 0


class ContinuousDecoder:
    """Continuous batching: requests join the running batch between steps and leave as soon as
    they finish, each row at its own position in a preallocated SlotCache.

        dec = ContinuousDecoder(model, tokenizer, slots=8)
        events = dec.add(prompt_ids, SamplingParams(...), key=7)  # prefill + its first token
        while dec.active:
            events += dec.step()  # one token for every row (Event.row = the row's key)
            dec.cancel(7)         # -> its last Event, when the client went away

    add() prefills the new row alone (one (1, P) forward into its slot) and samples its first
    token; step() decodes all active rows together, one (n, 1) forward whose mask gives each row
    exactly its own keys, so a row's tokens equal what it would get alone. A finished row's
    last Event carries finish_reason ("stop", "length", "cancelled") and its slot is freed at
    once. Sampling, stop ids and stop strings are BatchDecoder's and TextStream's.
    """

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, slots: int,
                 max_len: int | None = None):
        if not isinstance(model, GPT):
            raise TypeError(f"continuous batching needs a transformer with a KV cache (GPT); "
                            f"{type(model).__name__} has no per-row cache slots")
        cfg = model.config
        param = next(model.parameters())
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.cache = SlotCache(cfg, slots, max_len or cfg.block_size, param.dtype, param.device)
        self.stop_ids = set(stop_ids_of(tokenizer))
        vocab_limit = tokenizer.vocab_size
        self.vocab_limit = vocab_limit if vocab_limit < cfg.vocab_size else None
        self.rows: list[_Row] = []  # rows[i] lives in cache row i
        # ids seen per slot (repetition penalty), moved with its row like the cache
        self.seen = torch.zeros(slots, cfg.vocab_size, dtype=torch.bool, device=param.device)
        self._last = torch.zeros(slots, dtype=torch.long, device=param.device)  # (S,)

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.cache.slots - len(self.rows)

    def row_keys(self) -> list[int]:
        return [row.key for row in self.rows]

    @torch.inference_mode()  # as BatchDecoder.step
    def add(self, prompt: Sequence[int], params: SamplingParams, key: int) -> list[Event]:
        """Prefill prompt in a free slot and sample its first token -> its Events."""
        params.validate()
        check_prompt(prompt, self.config)
        if len(prompt) >= self.cache.max_len:
            raise ValueError(f"generate: the prompt has {len(prompt)} tokens; at most "
                             f"{self.cache.max_len - 1} leave room for an answer")
        if any(row.key == key for row in self.rows):
            raise ValueError(f"ContinuousDecoder.add: key {key} is already decoding")
        row = _Row(key, params, _generator(params.seed, self.seen.device),
                   TextStream(self.tokenizer, params.stop))
        r, view = self.cache.claim()  # r == len(self.rows)
        self.rows.append(row)
        try:  # whatever fails from here on gives the slot back: rows and cache stay in step
            idx = torch.tensor([list(prompt)], dtype=torch.long, device=self.seen.device)
            self.seen[r].zero_()
            self.seen[r, idx[0]] = True
            logits = self.model.forward_cached(idx, view, last_only=True)  # (1, 1, V)
            self.cache.set_length(r, len(prompt))
            return self._sample(logits[:, -1], slice(r, r + 1))
        except BaseException:
            self.cancel(key)
            raise

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One token for every active row -> their Events (finished rows have left)."""
        if not self.rows:
            raise RuntimeError("ContinuousDecoder.step: no active rows")
        n = len(self.rows)
        view = self.cache.decode_view()
        logits = self.model.forward_cached(self._last[:n, None], view, mask=self.cache.mask())
        self.cache.commit(view)
        return self._sample(logits[:, -1], slice(0, n))

    def cancel(self, key: int, reason: str = "cancelled") -> list[Event]:
        """Stop row `key` now -> its last Event (none if it is not decoding)."""
        for i, row in enumerate(self.rows):
            if row.key == key:
                ev = Event(key, row.text.flush(), None, reason)
                self._leave(i)
                return [ev]
        return []

    def _sample(self, logits: torch.Tensor, rows: slice) -> list[Event]:
        logits = logits.float()  # (n, V)
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit:] = float("-inf")
        mine = self.rows[rows]
        penalty = any(row.params.repetition_penalty != 1 for row in mine)
        nxt = next_tokens(logits, [row.params for row in mine], [row.generator for row in mine],
                          self.seen[rows] if penalty else None)  # (n,)
        self._last[rows] = nxt
        self.seen[rows].scatter_(1, nxt[:, None], True)
        events, leaving = [], []
        for i, (row, t) in zip(range(rows.start, rows.stop), zip(mine, nxt.tolist())):
            if t in self.stop_ids:
                events.append(Event(row.key, row.text.flush(), None, "stop"))
                leaving.append(i)
                continue
            row.n_out += 1
            delta = row.text.push(t)
            reason = ("stop" if row.text.stopped else "length"
                      if row.n_out >= row.params.max_new_tokens
                      or int(self.cache.lengths[i]) >= self.cache.max_len else None)
            if reason is not None:
                delta += row.text.flush()
                leaving.append(i)
            events.append(Event(row.key, delta, t, reason))
        for i in reversed(leaving):  # highest first: a move never lands on a row still to free
            self._leave(i)
        return events

    def _leave(self, i: int) -> None:
        moved = self.cache.release(i)
        last = self.rows.pop()
        if moved is not None:  # the last row now lives in slot i
            self.rows[i] = last
            self.seen[i] = self.seen[moved]
            self._last[i] = self._last[moved]


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str | Sequence[str],
             **sampling) -> str | list[str]:
    """The continuation of prompt (a str -> str; a list of str -> list of str, batched).
    Keyword arguments are SamplingParams fields (max_new_tokens, temperature, top_k, top_p,
    min_p, repetition_penalty, stop, seed)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if "stop" in sampling:
        sampling["stop"] = tuple(sampling["stop"] or ())
    params = SamplingParams(**sampling)
    out = [""] * len(prompts)
    for ev in stream(model, tokenizer, prompts, params):
        out[ev.row] += ev.text
    return out[0] if isinstance(prompt, str) else out


# ---------------------------------------------------------------------------------------------
# The command line (also fastlm.chat's and fastlm.serve's model options)
def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: found next to "
                    "the checkpoint, else bytes)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="weights: auto = bfloat16 where the hardware computes bf16 natively "
                         "(CUDA sm_80+, CPUs with avx512_bf16/amx_bf16), else float32 "
                         "(default auto); fp32 forces float32")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cast the weights to exactly this dtype (overrides --precision)")


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.min_p, args.repetition_penalty, tuple(args.stop),
                          args.seed).validate()


def weight_dtype(args: argparse.Namespace) -> tuple[torch.dtype, str]:
    """(dtype, why) of the weights: --dtype as given, else --precision through
    fastlm.precision. bf16 casts the weights (not autocast): decoding streams every weight per
    token, so half the bytes is what makes it faster, and the packed bf16 matmuls need them."""
    if args.dtype is not None:
        return getattr(torch, args.dtype), "--dtype"
    choice, reason = resolve_precision(args.precision, args.device, ("auto", "fp32", "bf16"))
    return (torch.bfloat16 if choice == "bf16" else torch.float32), reason


def load_from_args(args: argparse.Namespace) -> Restored:
    """The checkpoint of add_model_args' options through fastlm.restore.load, Linears packed
    for CPU decoding; CheckpointError when it is not a model that generates text."""
    dtype, why = weight_dtype(args)
    lm = load(args.checkpoint, args.device, args.tokenizer, dtype, pack=True)
    lm.meta.notes.append(f"{str(dtype).removeprefix('torch.')} weights ({why})")
    if getattr(lm.model, "objective", None) != "causal":
        kind = lm.meta.task if lm.meta.task == "classify" else lm.model.config.arch
        raise ckpt.CheckpointError(f"{lm.meta.path}: a {kind} model does not generate text "
                                   "left to right")
    return lm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.generate", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", required=True,
                    help="text to continue (repeat for a batch)")
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    try:
        params = sampling_from_args(args)
        lm = load_from_args(args)
    except (ValueError, OSError, ckpt.CheckpointError) as exc:
        print(f"fastlm.generate: {exc}", file=sys.stderr)
        return 2
    print(f"# {lm.meta.name} ({', '.join(lm.meta.notes)})", file=sys.stderr)
    t0, n = time.perf_counter(), 0
    single = len(args.prompt) == 1
    outs = [""] * len(args.prompt)
    if single:
        print(args.prompt[0], end="")
    try:
        for ev in stream(lm.model, lm.tokenizer, args.prompt, params):
            n += ev.token is not None
            if single:
                print(ev.text, end="", flush=True)
            outs[ev.row] += ev.text
    except ValueError as exc:
        print(f"fastlm.generate: {exc}", file=sys.stderr)
        return 2
    if single:
        print()
    else:
        for p, o in zip(args.prompt, outs):
            print(f"--- {p!r}\n{p}{o}")
    dt = time.perf_counter() - t0
    print(f"# {n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
