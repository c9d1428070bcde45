"""manifest.json of a prepared data directory: tokenizer identity, counts, shard checksums, report.

    {
      "format": "fastlm-shards", "version": 1,
      "tokenizer": {"name": "byte", "hash": "...", "vocab_size": 257, "eot_id": 256},
      "dtype": "uint16", "shard_tokens": 100000000,
      "splits": {"train": {"tokens": N, "documents": D,
                           "shards": [{"file": "train_000000.bin", "tokens": n, "sha256": "..."}]},
                 "val": {...}},
      "cleaning": {...report counts...}, "config": {...}, "inputs": [...]
    }

Shard paths are relative to the manifest's folder, so a data directory can be moved or copied whole.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastlm.data.shards import ShardError, file_sha256, read_header

FORMAT = "fastlm-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not match its shards or the expected tokenizer."""


def manifest_path(dir_or_manifest: str | os.PathLike) -> Path:
    p = Path(dir_or_manifest)
    return p / MANIFEST_NAME if p.is_dir() else p


def save_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def load_manifest(dir_or_manifest: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a manifest; errors name the file and what is wrong."""
    path = manifest_path(dir_or_manifest)
    if not path.exists():
        raise ManifestError(f"{path}: no manifest (run `python -m fastlm.data prepare ... --out "
                            f"{path.parent}` first, or point at a folder of llm.c .bin shards)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: not a fastlm shard manifest (not a JSON object)")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a fastlm shard manifest (format={m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ManifestError(f"{path}: manifest version {m.get('version')}; this fastlm reads {VERSION}")
    for key in ("tokenizer", "splits", "dtype"):
        if key not in m:
            raise ManifestError(f"{path}: manifest lacks the {key!r} entry")
    return m


def check_tokenizer(m: dict[str, Any], path: Path, expected_hash: str | None) -> None:
    """Refuse shards made by another tokenizer: their ids would mean other strings."""
    if expected_hash is not None and m["tokenizer"].get("hash") != expected_hash:
        raise ManifestError(
            f"{path}: shards were made with tokenizer {m['tokenizer'].get('name')!r} (hash "
            f"{str(m['tokenizer'].get('hash'))[:16]}...), not the expected one ({expected_hash[:16]}"
            f"...); re-run prepare with the tokenizer you train with")


def verify_shards(m: dict[str, Any], root: Path, checksums: bool = True) -> list[str]:
    """Check every shard's header, size and (optionally) sha256 against the manifest.

    Returns a list of problems, each naming the file; empty when all is well.
    """
    problems = []
    for split, info in m["splits"].items():
        for entry in info["shards"]:
            path = root / entry["file"]
            try:
                header = read_header(path)
            except ShardError as exc:
                problems.append(str(exc))
                continue
            if header.num_tokens != entry["tokens"]:
                problems.append(f"{path}: header says {header.num_tokens} tokens, manifest "
                                f"{entry['tokens']}")
            elif checksums and file_sha256(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 does not match the manifest: the file is "
                                f"corrupted; re-run prepare")
    return problems
