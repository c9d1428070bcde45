"""Plain text files as byte-level tokens (vocab 256): file lists, a train/val split by file,
random training windows and fixed validation windows.

The default corpus needs no download: the .py source files of the running interpreter's
standard library (sysconfig.get_paths()["stdlib"]), leaving out site-packages, __pycache__ and
the test suites (directories named test, tests, idle_test), which are large and repetitive.

The split is by file and deterministic: a file is held out for validation when the SHA-256 of
its path (relative to the corpus root) falls in the first val_fraction of the hash range, so
adding or removing files does not move the others. A single file cannot be split by file; its
last val_fraction of bytes become the validation text instead.

Files are read in the order of that same hash (a stable shuffle) until max_bytes of training
text is read, so a capped read samples the whole corpus rather than the alphabetically first
modules; validation is capped at max_bytes * val_fraction.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256  # byte-level tokens
SEPARATOR = b"\n\n"  # between files: bytes have no end-of-text token to spare
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, sorted .py files) of this interpreter's standard library (see module docstring)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(files)


def expand_paths(spec: str) -> tuple[Path, list[Path]]:
    """(root, sorted files) for a text file, a folder (every non-hidden file below it) or a glob
    (`**` recurses). Raises FileNotFoundError naming the spec when nothing matches."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise FileNotFoundError(f"--data {spec}: the folder holds no files")
        return path, sorted(files)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"--data {spec}: the glob matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return root, files
    raise FileNotFoundError(f"--data {spec}: no such file or folder")


def _hash01(rel: str) -> float:
    """A stable number in [0, 1) for a relative path."""
    digest = hashlib.sha256(rel.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_files(root: Path, files: list[Path],
                val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) files, each in hash order (see module docstring)."""
    keyed = sorted((_hash01(p.relative_to(root).as_posix()), p) for p in files)
    train = [p for h, p in keyed if h >= val_fraction]
    val = [p for h, p in keyed if h < val_fraction]
    if len(files) >= 2 and not val:  # few files, none hashed low: hold out the lowest one
        train, val = [p for _, p in keyed[1:]], [keyed[0][1]]
    if len(files) >= 2 and not train:
        train, val = [keyed[-1][1]], [p for _, p in keyed[:-1]]
    return train, val


def _read(files: list[Path], cap: int) -> bytes:
    """Concatenate files (SEPARATOR between them) until `cap` bytes (0 = no cap)."""
    parts, total = [], 0
    for path in files:
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # text has no NUL bytes; executables and images do
            raise ValueError(f"--data: {path} looks like a binary file (NUL bytes in its first "
                             "8 KB), not text; leave it out")
        if cap and total + len(data) > cap:
            data = data[:cap - total]
        parts.append(data)
        total += len(data) + len(SEPARATOR)
        if cap and total >= cap:
            break
    return SEPARATOR.join(parts)


@dataclass
class TextData:
    """Byte tokens of a corpus split into train and val (1-D uint8 tensors)."""
    train: torch.Tensor
    val: torch.Tensor
    description: str
    vocab_size: int = VOCAB_SIZE
    bytes_per_token: float = 1.0

    def train_batch(self, batch_size: int, seq_len: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs x (B, T) and next-token targets y (B, T), int64 on CPU."""
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=generator)
        return self._windows(self.train, starts, seq_len)

    def val_batches(self, n_batches: int, batch_size: int,
                    seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of validation windows spread evenly over the val text (same every call;
        they overlap when the text is shorter than n_batches * batch_size windows)."""
        n = n_batches * batch_size
        starts = torch.linspace(0, len(self.val) - seq_len - 1, n).long()  # (n,)
        return [self._windows(self.val, s, seq_len) for s in starts.split(batch_size)]

    @staticmethod
    def _windows(tokens: torch.Tensor, starts: torch.Tensor,
                 seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(seq_len + 1)  # (T + 1,)
        chunk = tokens[starts[:, None] + offsets].long()  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def load_text(path: str = "", max_bytes: int = 0, val_fraction: float = 0.1,
              min_len: int = 2) -> TextData:
    """Read a corpus (path: file, folder or glob; "" = the standard library's sources).

    max_bytes caps the training text (0 = all); min_len is the shortest train and val text
    usable (a window of seq_len + 1 tokens), checked here so a tiny file fails with a message.
    """
    root, files = expand_paths(path) if path else stdlib_files()
    name = path or f"Python {sysconfig.get_python_version()} standard library ({root})"
    train_files, val_files = split_files(root, files, val_fraction)
    if len(files) == 1 or not val_files:  # one file (or none held out): its tail is validation
        data = _read(files, 0)
        cut = int(len(data) * (1 - val_fraction))
        train_bytes, val_bytes = data[:cut][:max_bytes or None], data[cut:]
    else:
        train_bytes = _read(train_files, max_bytes)
        val_bytes = _read(val_files, int(max_bytes * val_fraction))
    for split, data in (("training", train_bytes), ("validation", val_bytes)):
        if len(data) < min_len:
            raise ValueError(f"--data {path or '(default corpus)'}: only {len(data)} bytes of "
                             f"{split} text; need at least {min_len} (seq_len + 1). Use more "
                             "text or a smaller --train.seq_len")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    desc = (f"{name}: {len(files)} files, {len(train_bytes):,} train / {len(val_bytes):,} val "
            "bytes")
    return TextData(as_tensor(train_bytes), as_tensor(val_bytes), desc)
