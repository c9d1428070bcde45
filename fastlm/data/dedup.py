"""Document-level deduplication: exact (hash of the cleaned text) and near-duplicate (MinHash LSH).

Near-duplicates: each document becomes the set of its word n-grams (lowercased, `ngram` words); a
MinHash signature of `num_perm` values estimates the Jaccard similarity of two such sets; LSH cuts
the signature into `bands` bands of `rows` values and calls two documents near-duplicates when any
band is equal. The (bands, rows) pair is chosen so that the S-curve's midpoint (1/bands)^(1/rows)
is nearest the requested Jaccard `threshold`. As in most LSH dedup pipelines, a band collision is
taken as a duplicate without a second exact-Jaccard check, which keeps only 8 bytes per band per kept
document in memory (about 1 KB per document with the defaults, plus Python set overhead).

The hashing is deterministic (crc32 of words, fixed-seed multiply-shift permutations), never
Python's per-process randomised hash, so decisions are the same in every worker and every run.
The work splits in two: `DedupHasher.keys(text)` is pure and runs in the workers; the `Deduper`
holds the sets of seen keys and runs in one process, in document order (the first copy is kept).
"""
from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+")
_M = np.uint64(0x9E3779B97F4A7C15)  # odd constant of the polynomial n-gram hash


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


class DedupHasher:
    """Computes a document's dedup keys: its exact hash and its LSH band keys."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        rng = np.random.default_rng(cfg.seed)
        n = self.bands * self.rows
        self.a = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, n, dtype=np.uint64)
        self.band_mult = rng.integers(0, 2**63, self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.band_salt = rng.integers(0, 2**63, self.bands, dtype=np.uint64)

    @staticmethod
    def exact_key(text: str) -> int:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def shingles(self, text: str) -> np.ndarray:
        """Unique 64-bit hashes of the document's word n-grams."""  # (S,)
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(0, dtype=np.uint64)
        w = np.fromiter((zlib.crc32(x.encode("utf-8", "surrogatepass")) for x in words),
                        dtype=np.uint64, count=len(words))
        k = min(self.cfg.ngram, len(w))
        h = np.zeros(len(w) - k + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(k):  # h = sum_i w[j + i] * M^(k-1-i), mod 2^64
                h = h * _M + w[i: len(w) - k + 1 + i]
            return np.unique(_mix(h))

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature (num_perm' = bands * rows uint32 values) of the n-gram set."""
        s = self.shingles(text)  # (S,)
        sig = np.full(self.a.size, np.iinfo(np.uint32).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, s.size, 4096):  # chunks keep the (P, S) block small
                block = self.a[:, None] * s[None, start:start + 4096] + self.b[:, None]  # (P, S)
                np.minimum(sig, (block >> np.uint64(32)).min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, text: str) -> np.ndarray:
        """One 64-bit key per LSH band: equal keys = equal bands (up to 2^-64 collisions)."""
        sig = self.signature(text).astype(np.uint64).reshape(self.bands, self.rows)
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
            row = np.empty(self._width, dtype="<u8")
            row[0] = exact_key
            row[1:] = band_keys
            self._log.write(row.tobytes())
        return None

    def open_log(self, path: Path, valid_bytes: int) -> None:
        """Reload the keys logged by an interrupted run (up to its last checkpoint), keep logging."""
        if path.exists():
            with open(path, "r+b") as f:
                f.truncate(valid_bytes)
            rows = np.fromfile(path, dtype="<u8").reshape(-1, self._width)
            self.exact.update(rows[:, 0].tolist())
            self.bands.update(rows[:, 1:].ravel().tolist())
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
