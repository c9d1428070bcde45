"""Training inputs: files, folders and globs, or an iterator of strings.

A str or path names files: an existing file, a folder (every file under it, recursively, hidden
ones skipped) or a glob ("data/**/*.txt"). A list or tuple is a list of such names. Anything else
iterable is in-memory text: each item (str) is one document. To train on a list of strings, pass
an iterator over it (`iter(texts)`), since a list of str is read as file names.
"""
import glob
import os
from pathlib import Path


def _files_of(spec):
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and not any(part.startswith(".")
                                                 for part in p.relative_to(path).parts))
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    if not matches:
        shown = spec if len(str(spec)) < 80 else str(spec)[:77] + "..."
        raise FileNotFoundError(
            f"training input {shown!r} is not a file, a folder or a glob that matches files; "
            "to train on in-memory strings pass an iterator, e.g. iter(texts)")
    return matches


def resolve(inputs):
    """("files", [Path, ...]) or ("texts", iterator of str) for the forms described above."""
    if isinstance(inputs, (str, os.PathLike)):
        return "files", _files_of(inputs)
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("no training inputs given (an empty list)")
        if all(isinstance(x, (str, os.PathLike)) for x in inputs):
            files = []
            for spec in inputs:
                files.extend(_files_of(spec))
            return "files", files
        raise TypeError("a list of training inputs must hold file names, folders or globs; "
                        "to train on in-memory strings pass an iterator, e.g. iter(texts)")
    if isinstance(inputs, (bytes, bytearray)):
        raise TypeError("training inputs must be str documents or file names, not bytes")
    try:
        iterator = iter(inputs)
    except TypeError:
        raise TypeError(f"cannot train on a {type(inputs).__name__}: pass file names, folders, "
                        "globs or an iterator of str") from None
    return "texts", iterator


def batches(texts, max_bytes=8 << 20):
    """Group an iterator of str into lists of about max_bytes characters (checking each item)."""
    batch, size = [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text #{i} is a {type(text).__name__}, expected str")
        batch.append(text)
        size += len(text)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
