"""Reading prepared shards for training: `ShardDataset` (memmaps) and `BatchLoader` (batches).

Windows: a shard of n tokens holds (n - 1) // T non-overlapping windows of T + 1 tokens (x is the
first T, y the last T); windows never cross shard boundaries (as in llm.c), so a batch is B plain
slices of memmaps. The windows of all shards are numbered 0..W-1.

Order: in epoch e the windows are visited in the order of a permutation drawn from
numpy.random.default_rng([seed, e]). The b-th window of rank r at step s is the global position
g = (s * world_size + r) * B + b of that sequence (epoch g // W, index g % W into its permutation),
so a batch is a pure function of (seed, step, rank): resuming needs only the step, ranks never
share a window within an epoch, and the global batch is the same for any world_size with the same
B * world_size. With shuffle=False the windows are taken in order (validation).
"""
from __future__ import annotations

import glob as globmod
import hashlib
import json
import queue
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fastlm.data import manifest as mf
from fastlm.data.shards import ShardError, open_shard


class ShardDataset:
    """The token shards of one split, memory-mapped.

    source: a prepared folder, its manifest.json, or (for llm.c / modded-nanogpt data without a
    manifest) a folder of .bin shards (those whose name contains `split`) or a glob of them.
    verify: check every shard's sha256 against the manifest (sizes and headers are always checked).
    tokenizer_hash: when given, refuse shards made by another tokenizer.
    """

    def __init__(self, source: str | Path, split: str = "train", *, verify: bool = True,
                 tokenizer_hash: str | None = None):
        self.source, self.split = str(source), split
        self.manifest: dict[str, Any] | None = None
        path = Path(source)
        if path.name == mf.MANIFEST_NAME or (path.is_dir() and (path / mf.MANIFEST_NAME).exists()):
            self._from_manifest(mf.manifest_path(path), verify, tokenizer_hash)
        else:
            self._from_bins(path, split, tokenizer_hash)
        self.shards = [open_shard(p) for p in self.paths]  # header and size checked here
        self.num_tokens = int(sum(s.size for s in self.shards))
        if self.num_tokens == 0:
            hint = " (use a larger --val-fraction or more data)" if split == "val" else ""
            raise ShardError(f"{self.source}: the {split!r} split holds no tokens{hint}")
        ident = [(p.name, int(s.size)) for p, s in zip(self.paths, self.shards)]
        self.fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]

    def _from_manifest(self, path: Path, verify: bool, tokenizer_hash: str | None) -> None:
        m = mf.load_manifest(path)
        mf.check_tokenizer(m, path, tokenizer_hash)
        if self.split not in m["splits"]:
            raise mf.ManifestError(f"{path}: no split {self.split!r} (has {sorted(m['splits'])})")
        root = path.parent
        entries = m["splits"][self.split]["shards"]
        sub = {"splits": {self.split: {"shards": entries}}}
        problems = mf.verify_shards(sub, root, checksums=verify)
        if problems:
            raise ShardError("; ".join(problems))
        self.manifest = m
        self.paths = [root / e["file"] for e in entries]
        self.vocab_size: int | None = m["tokenizer"]["vocab_size"]
        self.eot_id: int | None = m["tokenizer"]["eot_id"]

    def _from_bins(self, path: Path, split: str, tokenizer_hash: str | None) -> None:
        if tokenizer_hash is not None:
            raise mf.ManifestError(f"{path}: no manifest.json, so the tokenizer that made these "
                                   f"shards cannot be checked; prepare them with fastlm, or load "
                                   f"without tokenizer_hash")
        if path.is_dir():
            paths = sorted(p for p in path.glob("*.bin") if split in p.name)
            if not paths:
                raise mf.ManifestError(f"{path}: no manifest.json and no *.bin shard with "
                                       f"{split!r} in its name")
        else:
            paths = sorted(Path(p) for p in globmod.glob(str(path)))
            if not paths:
                raise mf.ManifestError(f"{path}: no such prepared folder, manifest or shard glob")
        self.paths = paths
        self.vocab_size = None  # unknown without a manifest (llm.c GPT-2 data: 50257)
        self.eot_id = None

    def num_windows(self, seq_len: int) -> int:
        return int(sum(max(0, (s.size - 1) // seq_len) for s in self.shards))

    def __repr__(self) -> str:
        return (f"ShardDataset({self.source!r}, split={self.split!r}: {len(self.shards)} shards, "
                f"{self.num_tokens:,} tokens)")


class BatchLoader:
    """(x, y) int64 batches of shape (B, T) from a ShardDataset (see the module docstring).

    Training:   `x, y = loader.next()` each step (or `for x, y in loader`, endless);
                `loader.state_dict()` in checkpoints, `loader.load_state_dict(sd)` to resume.
    Validation: BatchLoader(val_ds, ..., shuffle=False); `for x, y in loader` is one pass over the
                same fixed batches every time (`max_batches` caps it).
    A background thread prepares the next `prefetch` batches (pinned when device is CUDA).
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 shuffle: bool = True, prefetch: int = 2, pin_memory: bool | None = None,
                 max_batches: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset, self.B, self.T = dataset, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.shuffle = torch.device(device), shuffle
        self.prefetch, self.max_batches = prefetch, max_batches
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.step = 0
        counts = np.array([max(0, (s.size - 1) // seq_len) for s in dataset.shards], dtype=np.int64)
        self.num_windows = int(counts.sum())
        if self.num_windows < batch_size * world_size:
            raise ValueError(
                f"{dataset.source}: the {dataset.split!r} split has {dataset.num_tokens:,} tokens, "
                f"{self.num_windows} windows of seq_len + 1 = {seq_len + 1} tokens; a step needs "
                f"batch_size * world_size = {batch_size * world_size}. Use more data or smaller "
                f"batch_size / seq_len")
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # (n_shards + 1,)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- the pure part: which windows make the batch of a step --------------------------------

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:  # only the current and the next epoch are in use
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                    self.num_windows)
            return self._perms[epoch]

    def window_ids(self, step: int) -> np.ndarray:
        """Global window numbers of this rank's batch at `step`."""  # (B,)
        g = (step * self.world_size + self.rank) * self.B + np.arange(self.B)
        if not self.shuffle:
            return g % self.num_windows
        epochs, within = np.divmod(g, self.num_windows)
        return np.array([self._perm(int(e))[int(w)] for e, w in zip(epochs, within)])

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's batch at `step` as int64 numpy arrays x, y of shape (B, T)."""
        ids = self.window_ids(step)
        shard = np.searchsorted(self._starts, ids, side="right") - 1  # (B,)
        chunk = np.empty((self.B, self.T + 1), dtype=np.int64)  # (B, T + 1)
        for row, (w, s) in enumerate(zip(ids, shard)):
            start = int(w - self._starts[s]) * self.T
            chunk[row] = self.dataset.shards[s][start:start + self.T + 1]
        return chunk[:, :-1], chunk[:, 1:]

    # -- the stateful part: stepping, prefetch, device transfer -------------------------------

    def _to_torch(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self.pin_memory:
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def _producer(self, start: int, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:  # a timeout, so that a stop request is seen while the queue is full
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        step = start
        try:
            while not stop.is_set():
                put((step, *self._to_torch(*self.batch_at(step))))
                step += 1
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((step, exc, None))

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self._stop = threading.Event()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current step, on the loader's device; advances the step."""
        if self.prefetch <= 0:
            x, y = self._to_torch(*self.batch_at(self.step))
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._producer, daemon=True,
                                                args=(self.step, self._queue, self._stop),
                                                name="fastlm-batch-prefetch")
                self._thread.start()
            step, x, y = self._queue.get()
            if isinstance(x, BaseException):
                self._stop_thread()
                raise x
            assert step == self.step, (step, self.step)
        self.step += 1
        non_blocking = self.pin_memory and self.device.type == "cuda"
        return (x.to(self.device, non_blocking=non_blocking),
                y.to(self.device, non_blocking=non_blocking))

    def __len__(self) -> int:
        """Steps in one epoch (one pass for validation, capped by max_batches)."""
        n = self.num_windows // (self.B * self.world_size)
        return min(n, self.max_batches) if self.max_batches is not None else n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            while True:
                yield self.next()
        for step in range(len(self)):  # the fixed validation set, from its start every time
            yield tuple(t.to(self.device) for t in self._to_torch(*self.batch_at(step)))

    @property
    def epoch(self) -> int:
        return self.step * self.world_size * self.B // self.num_windows

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.B, "seq_len": self.T,
                "world_size": self.world_size, "shuffle": self.shuffle,
                "num_windows": self.num_windows, "dataset": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a state from other data or batch geometry."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "shuffle", "num_windows", "dataset"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not match {self.dataset.source}: {key} is "
                                 f"{state.get(key)!r} in the checkpoint, {mine[key]!r} here")
        if state["batch_size"] * state["world_size"] != self.B * self.world_size:
            raise ValueError(f"loader state has a global batch of {state['batch_size']} x "
                             f"{state['world_size']} windows; this loader takes {self.B} x "
                             f"{self.world_size}: resume with the same global batch")
        self._stop_thread()
        self.step = int(state["step"])

    def close(self) -> None:
        self._stop_thread()

    def __del__(self):
        try:
            self._stop_thread()
        except Exception:
            pass
