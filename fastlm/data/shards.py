"""Token shard files: fastlm's own format (write + read) and llm.c's .bin format (read).

fastlm shard (little-endian), one file per shard:

    offset  size  field
    0       8     magic b"FASTLMTK"
    8       4     uint32 format version (1)
    12      4     uint32 bytes per token: 2 (uint16, vocab <= 65536) or 4 (uint32)
    16      8     uint64 token count
    24      40    reserved, zero
    64      ...   tokens

The 64-byte header keeps the tokens aligned, so `np.memmap(path, dtype, offset=64)` reads them with
no copy. llm.c / modded-nanogpt shards have a 256 x int32 header (magic 20240520, version 1 = uint16
tokens or 2 = uint32, token count) and are read by the same `open_shard`.

Writes are atomic: the file is written under a temporary name in the same folder, fsynced and renamed,
so a crash never leaves a half shard under the final name.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"FASTLMTK"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, token count

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
_LLMC_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


class ShardError(ValueError):
    """A shard file is missing, truncated, corrupted or not a shard; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id below vocab_size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _atomic_write(path: Path, chunks: list[bytes | memoryview]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> str:
    """Write tokens as a fastlm shard atomically; returns the sha256 hex digest of the whole file."""
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.itemsize not in (2, 4) or dtype.kind != "u":
        raise ValueError(f"shard dtype must be uint16 or uint32, got {dtype}")
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (int(tokens.max()) >= 1 << (8 * dtype.itemsize) or int(tokens.min()) < 0):
        raise ValueError(f"token ids {int(tokens.min())}..{int(tokens.max())} do not fit in {dtype}")
    header = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0")
    body = tokens.astype(dtype, copy=False).tobytes()
    _atomic_write(path, [header, body])
    return hashlib.sha256(header + body).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """What a shard header says: its format, token dtype, token count and where tokens start."""

    path: Path
    format: str  # "fastlm" or "llm.c"
    dtype: np.dtype
    num_tokens: int
    offset: int


def read_header(path: str | os.PathLike) -> ShardInfo:
    """Parse and check a shard's header against its file size (a truncated file is an error)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read shard ({exc.strerror})") from exc
    if head[:8] == MAGIC:
        if len(head) < HEADER_BYTES:
            raise ShardError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
        _, version, width, count = _HEADER.unpack_from(head)
        if version != VERSION:
            raise ShardError(f"{path}: shard format version {version}; this fastlm reads {VERSION}")
        if width not in (2, 4):
            raise ShardError(f"{path}: corrupted header (bytes per token {width})")
        info = ShardInfo(path, "fastlm", np.dtype(f"<u{width}"), count, HEADER_BYTES)
    elif len(head) >= 12 and struct.unpack_from("<i", head)[0] == LLMC_MAGIC:
        if len(head) < LLMC_HEADER_BYTES:
            raise ShardError(f"{path}: truncated llm.c header ({len(head)} of 1024 bytes)")
        _, version, count = struct.unpack_from("<iii", head)
        if version not in _LLMC_DTYPES:
            raise ShardError(f"{path}: llm.c shard version {version} unknown (1=uint16, 2=uint32)")
        info = ShardInfo(path, "llm.c", _LLMC_DTYPES[version], count, LLMC_HEADER_BYTES)
    else:
        raise ShardError(f"{path}: not a token shard (neither fastlm magic {MAGIC!r} nor llm.c "
                         f"magic {LLMC_MAGIC})")
    expected = info.offset + info.num_tokens * info.dtype.itemsize
    if size != expected:
        raise ShardError(f"{path}: file is {size} bytes but its header promises {info.num_tokens} "
                         f"tokens ({expected} bytes): truncated or corrupted; re-run prepare")
    return info


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only numpy memmap (no copy), in either format."""
    info = read_header(path)
    if info.num_tokens == 0:
        return np.zeros(0, dtype=info.dtype)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.offset,
                     shape=(info.num_tokens,))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_llmc_shard(path: str | os.PathLike, tokens: np.ndarray, version: int = 1) -> None:
    """Write llm.c's format (for interop and tests): 256 int32 header, then uint16/uint32 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (LLMC_MAGIC, version, tokens.size)
    _atomic_write(Path(path), [header.tobytes(), tokens.astype(_LLMC_DTYPES[version]).tobytes()])
