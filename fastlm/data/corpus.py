"""What the training loop reads: a tokenizer and a corpus behind one small interface.

`load_data(cfg)` picks the source from data.path and data.tokenizer:

  prepared shards   data.path is a folder (or manifest.json) written by `python -m fastlm.data
                    prepare`, or an llm.c folder/glob of .bin shards: fastlm.data.ShardDataset +
                    BatchLoader for the train and val splits; the loader's position is part of
                    the training state (saved in checkpoints, restored on resume)
  raw text          anything else ('' = the Python standard library): read into memory by
                    fastlm.data.text; byte tokens as they are (the quick default run), or encoded
                    once with a trained tokenizer file

Every corpus offers train_batch, val_batches, encode, decode, vocab_size, bytes_per_token (UTF-8
bytes per token of the validation text, for bits per byte), description, and state_dict /
load_state_dict (the data position beyond the loop's own RNG; empty for in-memory text until
stream_batch is used).

Recurrent models (truncated BPTT) read `stream_batch(B, T)` instead: row b of every batch continues
its own contiguous stream of the training tokens where the previous call left it (TokenStreams),
so the hidden state carried from one batch into the next belongs to the text that follows.

Distributed runs: rank r of W takes rows r*B .. r*B + B - 1 of the global batch of B*W windows
that a 1-process run with batch B*W draws, so the global batch does not depend on W; the same
holds for the validation batches (the loop averages the ranks' losses) and for the streams
(rank r reads streams r*B .. r*B + B - 1 of B*W).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastlm.data.text import TextData, load_text
from fastlm.tokenizer import Tokenizer

EOT_TEXT = "<|endoftext|>"
_STATS_TOKENS = 1 << 20  # tokens of a shard val split decoded to measure bytes per token


class DataError(ValueError):
    """The corpus or tokenizer cannot be used as configured; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# Tokenizers
@dataclass
class TokenizerSpec:
    """The tokenizer of a run. data_hash is the identity fastlm.data writes into shard
    manifests (fastlm.data.encoders: a fixed hash for "byte", the sha256 of the file for a
    path); tok.hash() is the tokenizer's own fingerprint, saved with checkpoints."""
    name: str
    tok: Tokenizer
    data_hash: str
    path: Path | None  # the tokenizer file, None for "byte"


def load_tokenizer(spec: str, shards: bool) -> TokenizerSpec:
    """"byte" or the path of a fastlm tokenizer file. Byte-level shards carry an end-of-text
    token (id 256, fastlm.data.encoders), so "byte" over shards is the 257-token byte vocab."""
    from fastlm.data.encoders import load_encoder

    if spec == "byte":
        tok = Tokenizer.byte([EOT_TEXT] if shards else [])
        return TokenizerSpec("byte", tok, load_encoder("byte").hash, None)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer: {spec} is not 'byte' and no such tokenizer file")
    try:
        tok = Tokenizer.load(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"data.tokenizer: {exc}") from None
    return TokenizerSpec(path.name, tok, hashlib.sha256(path.read_bytes()).hexdigest(), path)


def bytes_per_token(tok: Tokenizer, ids: np.ndarray | torch.Tensor) -> float:
    """UTF-8 bytes of the text `ids` stand for, per token; special tokens (document separators)
    count as tokens with no bytes, since bits per byte measures the text."""
    ids = np.asarray(ids).reshape(-1)
    if len(ids) == 0:
        return 1.0
    special = np.array(sorted(tok.special_tokens.values()), dtype=np.int64)
    plain = ids[~np.isin(ids, special)] if len(special) else ids
    return max(len(tok.decode_bytes(plain.tolist())), 1) / len(ids)


# ---------------------------------------------------------------------------------------------
# Contiguous streams (truncated BPTT)
class TokenStreams:
    """S = B * world_size contiguous streams over the training tokens, for recurrent models.

    Layout (char-rnn's): the M = n_tokens - 1 input positions are cut into S equal stretches of
    L = M // S tokens; stream s starts at s * L. All streams advance together: call k returns,
    for row b of rank r (stream s = r * B + b), the inputs x at positions (s * L + k * T + t) mod
    M for t < T and the targets y one position further (always the true next token). Position
    p = k * T mod M is the whole state, saved by state_dict for exact resume.

    Wrap-around: after L tokens stream s has reached s * L + L, the start of stream s + 1, and
    simply reads on, so every row stays contiguous forever (an epoch = L tokens per row, each
    input position read once). The one break is the row that passes from position M - 1 back to
    0 (the text's end to its start), once per epoch; its carried state then holds context from
    unrelated text for a while, exactly as at a document boundary inside the corpus, so the state
    is carried rather than reset there (resetting one row of a batched state would complicate the
    loop for no measurable gain).

    read(start, n) -> int64 tensor of tokens start .. start + n - 1 (n_tokens > start + n - 1).
    """

    def __init__(self, n_tokens: int, read, rank: int, world_size: int, what: str):
        self.M = n_tokens - 1  # input positions; position i's target is token i + 1
        self.read, self.rank, self.world_size, self.what = read, rank, world_size, what
        self.pos = 0  # shared by every stream, in tokens
        self.streams: int | None = None  # S, fixed by the first call (or a loaded state)

    def _check(self, batch_size: int, seq_len: int) -> int:
        S = batch_size * self.world_size
        if self.streams is not None and self.streams != S:
            raise DataError(f"stream_batch: {batch_size} rows x {self.world_size} processes = "
                            f"{S} streams, but this run reads {self.streams}: the batch size "
                            "(the number of streams) cannot change within a run")
        L = self.M // S
        if L < seq_len:
            raise DataError(f"{self.what}: {self.M + 1:,} training tokens cut into {S} streams "
                            f"(batch_size x processes) give {L} tokens per stream, fewer than "
                            f"seq_len = {seq_len}. Use more text or a smaller --train.batch_size "
                            "/ --train.seq_len")
        self.streams = S
        return L

    def batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), int64 (B, T) each; advances every stream by T tokens."""
        L, T, M = self._check(batch_size, seq_len), seq_len, self.M
        x = torch.empty(batch_size, T, dtype=torch.long)  # (B, T)
        y = torch.empty(batch_size, T, dtype=torch.long)
        for b in range(batch_size):
            a = ((self.rank * batch_size + b) * L + self.pos) % M  # this row's first input
            head = min(T, M - a)  # inputs before the wrap at M
            chunk = self.read(a, head + 1)  # (head + 1,): inputs a .. a+head-1 and one target
            x[b, :head], y[b, :head] = chunk[:-1], chunk[1:]
            if head < T:  # wrapped: the rest starts again at position 0
                rest = self.read(0, T - head + 1)
                x[b, head:], y[b, head:] = rest[:-1], rest[1:]
        self.pos = (self.pos + T) % M
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "streams": self.streams, "positions": self.M}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses another corpus or another number of streams."""
        if state["positions"] != self.M:
            raise DataError(f"checkpoint.resume: the saved stream position is for a corpus of "
                            f"{state['positions'] + 1:,} training tokens; {self.what} has "
                            f"{self.M + 1:,}. Resume with the same data")
        if self.streams is not None and state["streams"] not in (None, self.streams):
            raise DataError(f"checkpoint.resume: the run read {state['streams']} streams; "
                            f"this one reads {self.streams}")
        self.pos, self.streams = int(state["pos"]), state["streams"]


# ---------------------------------------------------------------------------------------------
# Corpora
class _Slicing:
    """Row slice of this rank in the global batch (see the module docstring), and the
    contiguous streams of stream_batch, built on first use from _stream_source()."""
    rank: int = 0
    world_size: int = 1
    _streams: TokenStreams | None = None

    def _stream_source(self) -> tuple[int, Any]:
        """(number of training tokens, read(start, n) -> int64 tensor): see TokenStreams."""
        raise NotImplementedError

    def _token_streams(self) -> TokenStreams:
        if self._streams is None:
            n, read = self._stream_source()
            self._streams = TokenStreams(n, read, self.rank, self.world_size, self.description)
        return self._streams

    def stream_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next T tokens of this rank's B contiguous streams: x, y int64 (B, T) each, y the
        next tokens (TokenStreams; recurrent models train on these)."""
        return self._token_streams().batch(batch_size, seq_len)

    def _stream_state(self) -> dict[str, Any]:
        return {} if self._streams is None else {"streams": self._streams.state_dict()}

    def _load_stream_state(self, state: dict[str, Any]) -> None:
        if "streams" in state:
            self._token_streams().load_state_dict(state["streams"])


class TextCorpus(_Slicing):
    """Text in memory as token tensors (fastlm.data.text.TextData windows)."""

    def __init__(self, data: TextData, tok: Tokenizer, description: str):
        self.data, self.tok, self.description = data, tok, description
        self.vocab_size = tok.vocab_size
        self.bytes_per_token = data.bytes_per_token

    def train_batch(self, batch_size: int, seq_len: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.train_batch(batch_size * self.world_size, seq_len, generator)  # (W*B, T)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[rows], y[rows]  # (B, T) each

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """This rank's rows of the fixed validation batches (the loop averages over ranks)."""
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return [(x[rows], y[rows]) for x, y in
                self.data.val_batches(n_batches, batch_size * self.world_size, seq_len)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _stream_source(self) -> tuple[int, Any]:
        train = self.data.train  # (N,) uint8 bytes or int32 token ids
        return len(train), lambda start, n: train[start:start + n].long()

    def state_dict(self) -> dict[str, Any]:
        # Random windows: the loop's data generator is the whole position; streams: their own.
        return self._stream_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_stream_state(state)

    def close(self) -> None:
        pass


class ShardCorpus(_Slicing):
    """Prepared shards through fastlm.data.BatchLoader (its own position, saved and restored)."""

    def __init__(self, source: str, spec: TokenizerSpec, batch_size: int, seq_len: int,
                 seed: int, rank: int, world_size: int, n_val_batches: int):
        from fastlm.data import BatchLoader, ShardDataset

        self.tok, self.rank, self.world_size = spec.tok, rank, world_size
        has_manifest = Path(source, "manifest.json").is_file() or source.endswith(
            "manifest.json")
        # An llm.c folder has no manifest: nothing to check the tokenizer against.
        check = spec.data_hash if has_manifest else None
        train = ShardDataset(source, "train", tokenizer_hash=check)
        val = ShardDataset(source, "val", tokenizer_hash=check)
        if train.vocab_size is not None and train.vocab_size != spec.tok.vocab_size:
            raise DataError(f"--data {source}: the manifest's vocabulary has {train.vocab_size} "
                            f"tokens but data.tokenizer={spec.name} has {spec.tok.vocab_size}")
        self.train_loader = BatchLoader(train, batch_size, seq_len, seed=seed, rank=rank,
                                        world_size=world_size)
        self.val_loader = BatchLoader(val, batch_size, seq_len, rank=rank,
                                      world_size=world_size, shuffle=False,
                                      max_batches=n_val_batches, prefetch=0)
        self.vocab_size = spec.tok.vocab_size
        sample = np.asarray(val.shards[0][:_STATS_TOKENS])
        self.bytes_per_token = bytes_per_token(spec.tok, sample)
        self.description = (f"{source}: {train.num_tokens:,} train / {val.num_tokens:,} val "
                            f"tokens in {len(train.shards)} + {len(val.shards)} shards")

    def train_batch(self, batch_size: int, seq_len: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_loader.next()  # (B, T) each; the loader keeps its own position

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        return list(self.val_loader)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _stream_source(self) -> tuple[int, Any]:
        """The train shards read as one token sequence: a stream crosses from one shard into
        the next as it crosses a document boundary inside a shard."""
        shards = self.train_loader.dataset.shards
        starts = np.cumsum([0] + [s.size for s in shards])  # (n_shards + 1,)

        def read(start: int, n: int) -> torch.Tensor:
            out = np.empty(n, dtype=np.int64)
            i, done = int(np.searchsorted(starts, start, side="right")) - 1, 0
            while done < n:
                off = start + done - starts[i]
                take = min(n - done, shards[i].size - off)
                out[done:done + take] = shards[i][off:off + take]
                done, i = done + take, i + 1
            return torch.from_numpy(out)
        return int(starts[-1]), read

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.train_loader.state_dict(), **self._stream_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loader" not in state:
            raise DataError("the checkpoint has no data-loader position (it was trained on "
                            "raw text, not prepared shards)")
        self.train_loader.load_state_dict(state["loader"])
        self._load_stream_state(state)

    def close(self) -> None:
        self.train_loader.close()


def is_shard_source(path: str) -> bool:
    """A prepared folder, its manifest.json, or llm.c .bin shards (folder or glob)."""
    if not path:
        return False
    p = Path(path).expanduser()
    if p.name == "manifest.json" or (p.is_dir() and (p / "manifest.json").is_file()):
        return True
    if p.is_dir():
        return any(p.glob("*.bin")) and not any(
            f.suffix != ".bin" for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return path.endswith(".bin") and "*" in path


def _encode_text(tok: Tokenizer, data: bytes) -> torch.Tensor:
    """Token ids of raw text bytes (int32), encoded in paragraph-aligned pieces on every core;
    special-token texts inside the corpus are plain text here."""
    text = data.decode("utf-8", errors="replace")
    pieces, start, step = [], 0, 1 << 16
    while start < len(text):  # cut after a blank line near every 64 K characters
        cut = text.find("\n\n", start + step)
        end = len(text) if cut < 0 else cut + 2
        pieces.append(text[start:end])
        start = end
    ids = tok.encode_batch(pieces, disallowed_special=())
    return torch.tensor([i for piece in ids for i in piece], dtype=torch.int32)


def load_data(cfg, rank: int = 0, world_size: int = 1):
    """The corpus configured by cfg.data (see the module docstring); DataError on bad input."""
    from fastlm.data import ManifestError, ShardError

    path, T = cfg.data.path, cfg.seq_len
    shards = is_shard_source(path)
    spec = load_tokenizer(cfg.data.tokenizer, shards)
    if shards:
        try:
            corpus = ShardCorpus(path, spec, cfg.train.batch_size, T, cfg.train.seed, rank,
                                 world_size, cfg.eval.batches)
        except (ManifestError, ShardError, ValueError, OSError) as exc:
            raise DataError(str(exc)) from None
        return corpus, spec
    try:
        text = load_text(path, cfg.data.max_bytes, cfg.data.val_fraction, min_len=T + 1)
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from None
    if spec.path is None:  # bytes are the tokens already
        corpus = TextCorpus(text, spec.tok, text.description)
    else:
        train_bytes, val_bytes = bytes(text.train.numpy()), bytes(text.val.numpy())
        train, val = _encode_text(spec.tok, train_bytes), _encode_text(spec.tok, val_bytes)
        for split, ids in (("training", train), ("validation", val)):
            if len(ids) < T + 1:
                raise DataError(f"--data {path or '(default corpus)'}: only {len(ids)} tokens "
                                f"of {split} text with {spec.name}; need at least {T + 1} "
                                "(seq_len + 1). Use more text or a smaller --train.seq_len")
        desc = (f"{text.description}, {spec.name}: {len(train):,} train / {len(val):,} val "
                "tokens")
        data = TextData(train, val, desc, spec.tok.vocab_size, len(val_bytes) / len(val))
        corpus = TextCorpus(data, spec.tok, desc)
    corpus.rank, corpus.world_size = rank, world_size
    return corpus, spec
