"""Document-level deduplication: exact (hash of the cleaned text) and near-duplicate (MinHash LSH).

Near-duplicates: each document becomes the set of its word n-grams (lowercased, `ngram` words);
a MinHash signature of `num_perm` values (one-permutation hashing, see `signature`) estimates the
Jaccard similarity of two such sets; LSH cuts the signature into `bands` bands of `rows` values and calls two documents near-duplicates when any
band is equal. The (bands, rows) pair is chosen so that the S-curve's midpoint (1/bands)^(1/rows)
is nearest the requested Jaccard `threshold`. As in most LSH dedup pipelines, a band collision is
taken as a duplicate without a second exact-Jaccard check, which keeps only 8 bytes per band per kept
document in memory (about 1 KB per document with the defaults, plus Python set overhead).

A document with no word characters (e.g. "$$$$%%%%") has no n-grams and so no band keys: it is
kept as unique, never a near-duplicate of anything (exact dedup still drops its exact copies).

The hashing is deterministic (fixed-seed hashes of words and n-grams), never
Python's per-process randomised hash, so decisions are the same in every worker and every run.
The work splits in two: `DedupHasher.keys(text)` is pure and runs in the workers; the `Deduper`
holds the sets of seen keys and runs in one process, in document order (the first copy is kept).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_M = np.uint64(0x9E3779B97F4A7C15)  # odd constant of the polynomial n-gram hash
# The dedup log's filler for a wordless document's missing band keys. A real band key is 0 only
# when its mixed sum is 0 mod 2^64 (_mix is a bijection fixing 0): a 2^-64 chance, which at worst
# forgets one band of one document on resume.
NO_BAND = 0


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of word n-gram sets above which docs are near-dups
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"near-dup threshold must be in (0, 1), got {self.threshold}")
        if self.num_perm < 2 or self.ngram < 1:
            raise ValueError(f"need num_perm >= 2 and ngram >= 1, got {self.num_perm}, {self.ngram}")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve midpoint is nearest threshold."""
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        mid = (1.0 / bands) ** (1.0 / rows)
        if best is None or abs(mid - threshold) < best[0]:
            best = (abs(mid - threshold), bands, rows)
    return best[1], best[2]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the n-gram hash bits before the multiply-shift permutations."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# Bytes that belong to words: ASCII letters, digits and "_", and every byte of a non-ASCII
# character (so words of any script are kept whole, at the price of joining words around
# non-ASCII punctuation such as an em dash).
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789_"]] = True
_WORD_BYTE[128:] = True
_POS = np.random.default_rng(12345).integers(0, 2**63, 64, dtype=np.uint64) * np.uint64(2) + 1


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash per word of the lowercased text, vectorised over its UTF-8 bytes."""  # (W,)
    b = np.frombuffer(text.lower().encode("utf-8", "surrogatepass"), dtype=np.uint8)
    in_word = _WORD_BYTE[b]
    edges = np.diff(in_word.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # (W,) each
    if not starts.size:
        return np.zeros(0, dtype=np.uint64)
    idx = np.flatnonzero(in_word)  # positions of word bytes, word after word
    lengths = ends - starts
    offsets = np.zeros(starts.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    pos = np.arange(idx.size) - np.repeat(offsets, lengths)  # position of each byte in its word
    with np.errstate(over="ignore"):
        vals = (b[idx].astype(np.uint64) + np.uint64(1)) * _POS[pos & 63]
        h = np.add.reduceat(vals, offsets) + lengths.astype(np.uint64) * _M
    return _mix(h)


class DedupHasher:
    """Computes a document's dedup keys: its exact hash and its LSH band keys."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self.num_bins = self.bands * self.rows
        rng = np.random.default_rng(cfg.seed)
        self.salt = rng.integers(0, 2**63, dtype=np.uint64)
        self.band_mult = rng.integers(0, 2**63, self.rows, dtype=np.uint64) * np.uint64(2) + 1
        self.band_salt = rng.integers(0, 2**63, self.bands, dtype=np.uint64)

    @staticmethod
    def exact_key(text: str) -> int:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def _ngram_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of the document's word n-grams, repeats included."""  # (S,)
        w = word_hashes(text)  # (n_words,)
        if not w.size:
            return w
        k = min(self.cfg.ngram, len(w))
        h = np.zeros(len(w) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(k):  # h = sum_i w[j + i] * M^(k-1-i), mod 2^64
                h = h * _M + w[i: len(w) - k + 1 + i]
            return _mix(h ^ self.salt)

    def shingles(self, text: str) -> np.ndarray:
        """The document's set of word n-grams, as unique 64-bit hashes."""  # (S,)
        return np.unique(self._ngram_hashes(text))

    def signature(self, text: str) -> np.ndarray | None:
        """MinHash signature of the n-gram set: bands * rows uint32 values; None if no words.

        One-permutation hashing: the top bits of each n-gram's hash pick one of the bins, the low
        32 bits are its value, a bin keeps its minimum. Empty bins (short documents) are filled by
        rotation from the next non-empty bin plus a constant per step (Shrivastava & Li, 2014), so
        equal bins still mean equal underlying minima. One pass over the n-grams instead of one per
        permutation: the signature costs O(S), not O(S * num_perm).
        """
        h = self._ngram_hashes(text)  # (S,)
        if not h.size:
            return None
        P = self.num_bins
        with np.errstate(over="ignore"):
            bins = ((h >> np.uint64(32)) * np.uint64(P)) >> np.uint64(32)  # (S,) in [0, P)
            sig = np.full(P, 1 << 32, dtype=np.uint64)  # 2^32: the empty-bin marker
            np.minimum.at(sig, bins.astype(np.intp), h & np.uint64(0xFFFFFFFF))
            empty = sig == np.uint64(1 << 32)
            if empty.any():
                full = np.flatnonzero(~empty)
                j = np.flatnonzero(empty)
                nxt = full[np.searchsorted(full, j) % full.size]  # next non-empty bin, circularly
                dist = ((nxt - j) % P).astype(np.uint64)
                sig[j] = (sig[nxt] + dist * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
        return sig.astype(np.uint32)

    def band_keys(self, text: str) -> np.ndarray:
        """One 64-bit key per LSH band: equal keys = equal bands (up to 2^-64 collisions).

        A document without words has no keys: it is never a near-duplicate (exact dedup still
        applies), rather than a near-duplicate of every other wordless document.
        """
        sig = self.signature(text)
        if sig is None:
            return np.zeros(0, dtype=np.uint64)
        sig = sig.astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return _mix((sig * self.band_mult).sum(axis=1) + self.band_salt)  # (bands,)

    def keys(self, text: str) -> tuple[int, np.ndarray]:
        exact = self.exact_key(text) if self.cfg.exact else 0
        bands = self.band_keys(text) if self.cfg.near else np.zeros(0, dtype=np.uint64)
        return exact, bands


class Deduper:
    """The seen-key sets, consulted in document order; optionally logged to a file for resuming."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.exact: set[int] = set()
        self.bands: set[int] = set()
        self._log = None
        self._width = 1 + (lsh_params(cfg.threshold, cfg.num_perm)[0] if cfg.near else 0)

    def check_and_add(self, exact_key: int, band_keys: np.ndarray) -> str | None:
        """None if the document is new (its keys are then remembered), else the drop reason."""
        if self.cfg.exact:
            if exact_key in self.exact:
                return "dropped_exact_dup"
        keys = band_keys.tolist()
        if self.cfg.near and any(k in self.bands for k in keys):
            return "dropped_near_dup"
        self.exact.add(exact_key)
        self.bands.update(keys)
        if self._log is not None:
            # A document without words has no band keys (it is kept, as unique): its log row
            # pads them with NO_BAND so every row keeps the fixed width open_log reads.
            row = np.full(self._width, NO_BAND, dtype="<u8")
            row[0] = exact_key
            row[1:1 + len(keys)] = band_keys
            self._log.write(row.tobytes())
        return None

    def open_log(self, path: Path, valid_bytes: int) -> None:
        """Reload the keys logged by an interrupted run (up to its last checkpoint), keep logging."""
        if path.exists():
            with open(path, "r+b") as f:
                f.truncate(valid_bytes)
            rows = np.fromfile(path, dtype="<u8").reshape(-1, self._width)
            self.exact.update(rows[:, 0].tolist())
            bands = rows[:, 1:].ravel()
            self.bands.update(bands[bands != NO_BAND].tolist())
        self._log = open(path, "ab")

    def flush_log(self) -> int:
        """Flush the log to disk and return its length, for the checkpoint."""
        self._log.flush()
        os.fsync(self._log.fileno())
        return self._log.tell()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
