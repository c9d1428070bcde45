"""`prepare`: raw inputs -> cleaned, deduplicated, tokenized shards + manifest.json, resumably.

    main process                          worker processes (multiprocessing)
    read inputs in order (sources.py)
    batches of ~1 MB of documents    ->   extract HTML, clean (clean.py), dedup keys (dedup.py),
                                          tokenize (encoders.py)
    in document order: dedup decision <-  per-document (exact key, band keys, tokens)
    (dedup.py), train/val split, shard writer

At most 2 batches per worker are in flight, so memory stays bounded whatever the corpus size.
Dedup decisions and the split are made in document order in one process, so the output is the same
for any number of workers.

The split is by document: the k-th kept document goes to val when floor((k+1)f + 1/2) >
floor(kf + 1/2), i.e. evenly spaced val documents, exactly a fraction f of them (the first at
k = ceil(1/(2f)) - 1).

Resuming: shards are written atomically; after each batch that completed a shard, a checkpoint
(the number of input documents consumed, the partial shard buffers, the dedup-key log length and
the report) is written to OUT/.prepare/. A rerun with the same inputs and settings reloads it, skips
the consumed documents without cleaning or tokenizing them and continues; finished shards are not
rewritten. The checkpoint folder is removed when manifest.json is written.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from fastlm.data import manifest as mf
from fastlm.data.clean import CleanConfig, clean_document
from fastlm.data.dedup import DedupConfig, Deduper, DedupHasher
from fastlm.data.encoders import load_encoder
from fastlm.data.shards import token_dtype, write_shard
from fastlm.data.sources import HtmlPage, SourceOptions, expand_inputs, iter_documents

STATE_DIR = ".prepare"
BATCH_BYTES = 1 << 20  # documents per worker task: about this many bytes (or BATCH_DOCS docs)
BATCH_DOCS = 512


class PrepareError(ValueError):
    """prepare cannot produce a dataset from these inputs and settings; the message says why."""


# ---------------------------------------------------------------------------------------------
# Worker side: pure functions of (config, documents); state is set once per process.

_W: dict[str, Any] = {}


def _init_worker(clean_cfg: CleanConfig, dedup_cfg: DedupConfig, tokenizer: str) -> None:
    _W["clean"] = clean_cfg
    _W["hasher"] = DedupHasher(dedup_cfg)
    _W["dedup"] = dedup_cfg
    _W["encoder"] = load_encoder(tokenizer)


def _process_batch(docs: list) -> tuple[dict[str, int], list]:
    """Clean, key and tokenize a batch; per document (exact key, band keys, tokens) or None."""
    report: dict[str, int] = {}
    texts, slots = [], []
    for doc in docs:
        raw_len = len(doc.html) if isinstance(doc, HtmlPage) else len(doc)
        report["bytes_in"] = report.get("bytes_in", 0) + raw_len
        if isinstance(doc, HtmlPage):
            doc = doc.extract()
        text = clean_document(doc, _W["clean"], report)
        slots.append(text is not None)
        if text is not None:
            texts.append(text)
    tokens = _W["encoder"].encode_docs(texts)
    dedup = _W["dedup"]
    results, it = [], iter(zip(texts, tokens))
    for kept in slots:
        if not kept:
            results.append(None)
            continue
        text, ids = next(it)
        exact, bands = _W["hasher"].keys(text) if (dedup.exact or dedup.near) else (0, None)
        results.append((exact, bands, ids))
    return report, results


# ---------------------------------------------------------------------------------------------
# Main side.

def is_val(k: int, fraction: float) -> bool:
    """Whether the k-th kept document (0-based) belongs to the validation split."""
    return math.floor((k + 1) * fraction + 0.5) > math.floor(k * fraction + 0.5)


class _ShardWriter:
    """Fills fixed-size shards of one split and writes each atomically when full."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.buf = np.zeros(shard_tokens, dtype=dtype)
        self.fill = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray) -> bool:
        """Append a document's tokens; True when a shard was written."""
        self.documents += 1
        self.tokens += ids.size
        wrote, pos = False, 0
        while pos < ids.size:
            take = min(self.buf.size - self.fill, ids.size - pos)
            self.buf[self.fill:self.fill + take] = ids[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.buf.size:
                self._flush()
                wrote = True
        return wrote

    def _flush(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha = write_shard(self.out / name, self.buf[:self.fill], self.dtype)
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": sha})
        self.fill = 0

    def finish(self) -> dict[str, Any]:
        if self.fill:
            self._flush()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents,
                "fill": self.fill}

    def restore(self, state: dict[str, Any], buffer: np.ndarray) -> None:
        self.shards, self.tokens = state["shards"], state["tokens"]
        self.documents, self.fill = state["documents"], state["fill"]
        self.buf[:self.fill] = buffer[:self.fill]


def _batches(docs: Iterable, skip: int) -> Iterator[list]:
    """Groups of documents of about BATCH_BYTES, after skipping `skip` already-consumed ones."""
    batch, size = [], 0
    for i, doc in enumerate(docs):
        if i < skip:
            continue
        batch.append(doc)
        size += len(doc.html) if isinstance(doc, HtmlPage) else len(doc)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(workers: int, initargs: tuple, batches: Iterator[list]) -> Iterator[tuple]:
    """_process_batch over batches in order, with at most 2 * workers batches in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        for batch in batches:
            yield _process_batch(batch)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    with mp.get_context(method).Pool(workers, _init_worker, initargs) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_process_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _fingerprint(files: list[str], settings: dict[str, Any]) -> str:
    stats = []
    for f in files:
        st = os.stat(f) if not f.startswith("hf:") else None
        stats.append([f, st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps({"files": stats, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_checkpoint(state_dir: Path, state: dict[str, Any], writers: dict) -> None:
    for split, w in writers.items():
        tmp = state_dir / f"{split}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, w.buf[:w.fill])
        os.replace(tmp, state_dir / f"{split}.npy")
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / "state.json")


def _previous_fingerprint(out: Path) -> str | None:
    """The fingerprint of a finished (manifest) or interrupted (checkpoint) run in out, if any."""
    for path in (out / mf.MANIFEST_NAME, out / STATE_DIR / "state.json"):
        if path.exists():
            try:
                return json.loads(path.read_text()).get("fingerprint")
            except (OSError, json.JSONDecodeError) as exc:
                raise PrepareError(f"{path}: unreadable ({exc}); pass --overwrite to start "
                                   f"again") from exc
    return None


def _clear_outputs(out: Path) -> None:
    for p in out.glob("train_*.bin"):
        p.unlink()
    for p in out.glob("val_*.bin"):
        p.unlink()
    (out / mf.MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def prepare(inputs: list[str] | str, out_dir: str | os.PathLike, tokenizer: str = "byte",
            workers: int | None = None, *, clean: CleanConfig | None = None,
            dedup: DedupConfig | None = None, sources: SourceOptions | None = None,
            shard_tokens: int = 100_000_000, val_fraction: float = 0.01, progress: bool = True,
            overwrite: bool = False) -> dict[str, Any]:
    """Collect, clean, dedup, tokenize and shard `inputs` into `out_dir`; returns the manifest.

    inputs: files, folders, globs (.txt/.md/source, .jsonl, .parquet, .html, .warc/.wet, each
    optionally .gz/.zst) and hf:NAME[:CONFIG][@SPLIT] datasets. tokenizer: "byte" or the path of
    a fastlm tokenizer file. workers: processes for cleaning and tokenizing (default: all cores).
    An interrupted run with the same arguments resumes; a finished one is returned as is.
    """
    clean = clean or CleanConfig()
    dedup = dedup or DedupConfig()
    sources = sources or SourceOptions()
    workers = workers or os.cpu_count() or 1
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    encoder = load_encoder(tokenizer)
    dtype = token_dtype(encoder.vocab_size)
    settings = {"clean": dataclasses.asdict(clean), "dedup": dataclasses.asdict(dedup),
                "sources": dataclasses.asdict(sources), "tokenizer_hash": encoder.hash,
                "shard_tokens": shard_tokens, "val_fraction": val_fraction}
    fingerprint = _fingerprint(files, settings)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / STATE_DIR
    man_path = out / mf.MANIFEST_NAME
    previous = _previous_fingerprint(out)
    if overwrite:
        _clear_outputs(out)
    elif previous is not None and previous != fingerprint:
        raise PrepareError(f"{out}: holds data prepared from other inputs or settings; pass "
                           f"--overwrite (overwrite=True) to replace it, or another --out")
    elif man_path.exists():
        if progress:
            print(f"{out}: already prepared with these inputs and settings", file=sys.stderr)
        return mf.load_manifest(out)
    state_dir.mkdir(exist_ok=True)

    writers = {s: _ShardWriter(out, s, shard_tokens, dtype) for s in ("train", "val")}
    deduper = Deduper(dedup)
    report: dict[str, int] = {}
    done_docs = kept = 0
    log_bytes = 0
    if (state_dir / "state.json").exists():
        st = json.loads((state_dir / "state.json").read_text())
        done_docs, kept, report = st["done_docs"], st["kept"], st["report"]
        log_bytes = st["log_bytes"]
        for s, w in writers.items():
            w.restore(st["writers"][s], np.load(state_dir / f"{s}.npy"))
        if progress:
            print(f"{out}: resuming after {done_docs} documents "
                  f"({sum(len(w.shards) for w in writers.values())} shards done)", file=sys.stderr)
    deduper.open_log(state_dir / "dedup.log", log_bytes)

    sizes = [os.path.getsize(f) for f in files if not f.startswith("hf:")]
    total = sum(sizes) if len(sizes) == len(files) else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="prepare", dynamic_ncols=True, file=sys.stderr)
    try:
        batches = _batches(iter_documents(files, sources), done_docs)
        for batch_report, results in _ordered_map(
                workers, (clean, dedup, tokenizer), batches):
            for key, value in batch_report.items():
                report[key] = report.get(key, 0) + value
            if bar is not None:
                bar.update(batch_report.get("bytes_in", 0))
            wrote = False
            for result in results:
                done_docs += 1
                if result is None:
                    continue
                exact, bands, ids = result
                if bands is not None:
                    reason = deduper.check_and_add(exact, bands)
                    if reason:
                        report[reason] = report.get(reason, 0) + 1
                        continue
                split = "val" if val_fraction and is_val(kept, val_fraction) else "train"
                kept += 1
                wrote = writers[split].add(ids) or wrote
            if wrote:  # at a batch end, so the report counts exactly the consumed documents
                state = {"fingerprint": fingerprint, "done_docs": done_docs, "kept": kept,
                         "report": report, "log_bytes": deduper.flush_log(),
                         "writers": {s: w.state() for s, w in writers.items()}}
                _save_checkpoint(state_dir, state, writers)
    finally:
        deduper.close()
        if bar is not None:
            bar.close()

    if report.get("documents_in", 0) == 0 and done_docs == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
        raise PrepareError(f"no documents found: the inputs ({', '.join(files[:3])}"
                           f"{' ...' if len(files) > 3 else ''}) are empty")
    if kept == 0:
        shutil.rmtree(state_dir, ignore_errors=True)
        dropped = {k: v for k, v in report.items() if k.startswith("dropped_")}
        raise PrepareError(f"all {done_docs} documents were filtered out ({dropped}); loosen the "
                           f"cleaning flags (e.g. --min-chars, --max-symbol-ratio) or check the "
                           f"inputs ({files[0]}{' ...' if len(files) > 1 else ''})")
    splits = {s: w.finish() for s, w in writers.items()}
    report["documents_out"] = kept
    manifest = {
        "format": mf.FORMAT, "version": mf.VERSION,
        "tokenizer": {"name": encoder.name, "hash": encoder.hash,
                      "vocab_size": encoder.vocab_size, "eot_id": encoder.eot_id,
                      "eot_position": "before each document",
                      "path": None if tokenizer == "byte" else str(Path(tokenizer).resolve())},
        "dtype": dtype.name, "shard_tokens": shard_tokens, "splits": splits,
        "cleaning": report, "settings": settings, "inputs": files, "fingerprint": fingerprint,
    }
    mf.save_manifest(man_path, manifest)
    shutil.rmtree(state_dir, ignore_errors=True)
    return mf.load_manifest(out)  # as JSON gives it back (lists, not tuples), like a rerun does


def format_report(manifest: dict[str, Any]) -> str:
    """The cleaning report and split sizes as aligned text, for the CLI."""
    r = manifest["cleaning"]
    lines = [f"{'documents in':<28}{r.get('documents_in', 0):>14,}"]
    for key in sorted(r):
        if key not in ("documents_in", "documents_out"):
            lines.append(f"{key.replace('_', ' '):<28}{r[key]:>14,}")
    lines.append(f"{'documents out':<28}{r.get('documents_out', 0):>14,}")
    for split, info in manifest["splits"].items():
        lines.append(f"{split + ' tokens':<28}{info['tokens']:>14,}  ({info['documents']:,} docs, "
                     f"{len(info['shards'])} shards)")
    return "\n".join(lines)
