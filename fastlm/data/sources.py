"""Collect raw documents from what users have: files, folders, globs, JSONL, Parquet, HTML, WARC/WET,
gzip/zstd compressed files and Hugging Face datasets.

Everything is streamed: `iter_documents` yields one document at a time and never holds a whole input
in memory (a huge plain-text file is cut into pieces of about `max_doc_bytes` at line boundaries), so
a corpus larger than memory works. Documents come out as raw bytes (plain files, WET records),
str (JSON/Parquet/HF fields) or HtmlPage (HTML whose main-text extraction runs later, in the
workers); decoding and the invalid-UTF-8 policy belong to cleaning.

The order is deterministic (inputs in the order given, folders and globs expanded sorted), which is
what makes dedup decisions, the train/val split and resuming reproducible.

Optional packages, each needed only for its format and named in the error when missing:
pyarrow (.parquet), zstandard (.zst), warcio (.warc/.wet), trafilatura (HTML main-text
extraction), datasets (hf:NAME).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

# Plain-text extensions picked up when a folder or glob is expanded; an explicitly named file of
# any extension is read as plain text.
TEXT_EXTS = {
    ".txt", ".md", ".rst", ".text", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu",
    ".cuh", ".rs", ".go", ".java", ".js", ".ts", ".jsx", ".tsx", ".rb", ".sh", ".toml", ".yaml",
    ".yml", ".ini", ".cfg", ".css", ".sql", ".lua", ".swift", ".kt", ".scala", ".hs", ".ml",
}
JSONL_EXTS = {".jsonl", ".ndjson"}
HTML_EXTS = {".html", ".htm"}
WARC_EXTS = {".warc", ".wet", ".arc"}
PARQUET_EXTS = {".parquet"}
COMPRESSED_EXTS = {".gz", ".zst"}
KNOWN_EXTS = TEXT_EXTS | JSONL_EXTS | HTML_EXTS | WARC_EXTS | PARQUET_EXTS

HF_PREFIX = "hf:"


class SourceError(ValueError):
    """An input cannot be found or read; the message names it and says what to do."""


@dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"  # the field holding the text in .jsonl, .parquet and HF datasets
    max_doc_bytes: int = 64 << 20  # plain-text files larger than this are cut into pieces
    extract_html: bool = True  # run main-text extraction on HTML (WARC responses and .html files)


def _require(module: str, package: str, what: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise SourceError(f"{what} needs the optional package {package!r}: pip install {package} "
                          f"(or pip install 'fastlm[data]')") from exc


def _kind(path: Path) -> tuple[str, str | None]:
    """(format extension, compression extension or None) from a file name like x.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED_EXTS else None
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


def _is_collectable(path: Path) -> bool:
    ext, _ = _kind(path)
    return ext in KNOWN_EXTS


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (recursive) and globs -> a list of files and hf: names, in a stable order."""
    if not inputs:
        raise SourceError("no inputs given: pass files, folders, globs or hf:NAME datasets")
    out: list[str] = []
    for item in inputs:
        item = str(item)
        if item.startswith(HF_PREFIX):
            out.append(item)
            continue
        path = Path(item)
        if path.is_file():
            out.append(str(path))
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_collectable(p))
            if not found:
                raise SourceError(f"{path}: folder holds no files of a known kind "
                                  f"({', '.join(sorted(KNOWN_EXTS))}, optionally .gz/.zst)")
            out.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True)
                           if os.path.isfile(p) and _is_collectable(Path(p)))
            if not found:
                raise SourceError(f"{item}: glob matches no readable files")
            out.extend(found)
        else:
            raise SourceError(f"{item}: no such file, folder or glob")
    return out


def _open_binary(path: Path, comp: str | None) -> IO[bytes]:
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        zstd = _require("zstandard", "zstandard", f"{path} (.zst)")
        return zstd.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _utf8_end(piece: bytes) -> int:
    """Where piece ends without splitting a UTF-8 sequence: its length, or the start of an
    incomplete sequence at its end (whose first bytes then move to the next piece)."""
    for back in range(1, min(4, len(piece)) + 1):
        b = piece[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte: the last sequence starts here
            need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 \
                else 1
            return len(piece) - back if need > back else len(piece)
    return len(piece)


def _read_text_file(path: Path, comp: str | None, opts: SourceOptions) -> Iterator[bytes]:
    with _open_binary(path, comp) as f:
        reader = io.BufferedReader(f) if comp == ".zst" else f
        piece = reader.read(opts.max_doc_bytes)
        if b"\0" in piece[:8192]:  # text has no NUL bytes; executables and images do
            raise SourceError(f"{path}: looks like a binary file (NUL bytes in its first 8 KB), "
                              "not text; leave it out of the inputs")
        while piece:
            # Cut at the last newline so a piece never splits a line; a piece without one at
            # the end of a UTF-8 sequence, so valid text never gains U+FFFD.
            nl = piece.rfind(b"\n")
            nxt = reader.read(opts.max_doc_bytes)
            cut = nl + 1 if nl >= 0 else _utf8_end(piece)
            if nxt and 0 < cut < len(piece):
                piece, nxt = piece[:cut], piece[cut:] + nxt
            yield piece
            piece = nxt


def _read_jsonl(path: Path, comp: str | None, opts: SourceOptions) -> Iterator[str]:
    with _open_binary(path, comp) as f:
        reader = io.BufferedReader(f) if comp == ".zst" else f
        for lineno, line in enumerate(reader, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SourceError(f"{path}:{lineno}: invalid JSON line ({exc})") from exc
            if not isinstance(record, dict) or opts.text_field not in record:
                keys = list(record)[:10] if isinstance(record, dict) else type(record).__name__
                raise SourceError(f"{path}:{lineno}: no field {opts.text_field!r} (has {keys}); "
                                  f"choose it with --text-field")
            value = record[opts.text_field]
            if value is not None and not isinstance(value, str):  # not a repr as training text
                raise SourceError(f"{path}:{lineno}: field {opts.text_field!r} is a JSON "
                                  f"{type(value).__name__}, not a string")
            if value is not None:
                yield value


def _read_parquet(path: Path, opts: SourceOptions) -> Iterator[str]:
    _require("pyarrow", "pyarrow", f"{path} (.parquet)")
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)  # a file that is not Parquet: iter_file names it
    if opts.text_field not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no column {opts.text_field!r} (has {pf.schema_arrow.names}); "
                          f"choose it with --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[opts.text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None and not isinstance(value, (str, bytes)):
                raise SourceError(f"{path}: row {row}: column {opts.text_field!r} holds "
                                  f"{type(value).__name__} values, not text")
            if value is not None:
                yield value


@dataclass(frozen=True)
class HtmlPage:
    """An HTML document whose main text is still to be extracted (in a worker: it is slow)."""

    html: bytes
    where: str

    def extract(self) -> str:
        """Main text (boilerplate, menus and scripts removed) via trafilatura; "" if none."""
        trafilatura = _require("trafilatura", "trafilatura", f"{self.where} (HTML text extraction)")
        return trafilatura.extract(self.html, include_comments=False, include_tables=True) or ""


def _read_html(path: Path, comp: str | None, opts: SourceOptions) -> Iterator[bytes | HtmlPage]:
    with _open_binary(path, comp) as f:
        raw = f.read()
    yield HtmlPage(raw, str(path)) if opts.extract_html else raw


def _read_warc(path: Path, opts: SourceOptions) -> Iterator[bytes | HtmlPage]:
    """WARC responses (HTML -> extracted text) and WET conversion records (already text)."""
    _require("warcio", "warcio", f"{path} (WARC/WET)")
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "conversion":
                yield record.content_stream().read()
            elif record.rec_type == "response" and record.http_headers is not None:
                ctype = record.http_headers.get_header("Content-Type") or ""
                if "html" not in ctype.lower():
                    continue
                body = record.content_stream().read()
                uri = record.rec_headers.get_header("WARC-Target-URI")
                yield HtmlPage(body, f"{path} ({uri})") if opts.extract_html else body


def _read_hf(name: str, opts: SourceOptions) -> Iterator[str]:
    """hf:NAME[:CONFIG][@SPLIT], streamed, so nothing larger than a record is held."""
    datasets = _require("datasets", "datasets", f"{name} (Hugging Face dataset)")
    spec = name[len(HF_PREFIX):]
    spec, _, split = spec.partition("@")
    ds_name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, config or None, split=split or "train", streaming=True)
        for record in ds:
            if opts.text_field not in record:
                raise SourceError(f"{name}: no field {opts.text_field!r} (has {list(record)}); "
                                  f"choose it with --text-field")
            if record[opts.text_field] is not None:
                yield str(record[opts.text_field])
    except SourceError:
        raise
    except Exception as exc:  # datasets raises many kinds (ConnectionError, FileNotFoundError...)
        raise SourceError(f"{name}: cannot load the Hugging Face dataset {ds_name!r} "
                          f"({type(exc).__name__}: {exc}); it needs network access or a local "
                          f"cache (HF_DATASETS_OFFLINE=1 uses the cache only)") from exc


def iter_file(item: str, opts: SourceOptions) -> Iterator[bytes | str | HtmlPage]:
    """Documents of one expanded input (a file path or hf:NAME)."""
    if item.startswith(HF_PREFIX):
        yield from _read_hf(item, opts)
        return
    path = Path(item)
    ext, comp = _kind(path)
    try:
        if ext in JSONL_EXTS:
            yield from _read_jsonl(path, comp, opts)
        elif ext in PARQUET_EXTS:
            yield from _read_parquet(path, opts)
        elif ext in HTML_EXTS:
            yield from _read_html(path, comp, opts)
        elif ext in WARC_EXTS:
            yield from _read_warc(path, opts)  # warcio reads .warc.gz itself
        else:
            yield from _read_text_file(path, comp, opts)
    except _read_errors() as exc:
        raise SourceError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a corrupt or truncated input raises: the OS's and gzip's, and zstandard's
    and pyarrow's when they were imported (only then can they have raised)."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        error = getattr(sys.modules.get(module), name, None)  # a blocked import leaves None
        if error is not None:
            errors.append(error)
    return tuple(errors)


def iter_documents(files: list[str], opts: SourceOptions) -> Iterator[bytes | str | HtmlPage]:
    """All documents of all expanded inputs, in order."""
    for item in files:
        yield from iter_file(item, opts)
