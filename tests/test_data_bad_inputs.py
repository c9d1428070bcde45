"""Inputs that are not what they claim (issue 19): each is refused with one line naming the file
(and line or row), never trained on as something else, never a traceback; a huge file without
newlines is cut on a UTF-8 boundary."""
import json

import pytest

from fastlm.data import SourceError, SourceOptions
from fastlm.data.sources import iter_file
from fastlm.data.text import load_text


def docs(path, **kw):
    return list(iter_file(str(path), SourceOptions(**kw)))


def test_no_newline_cut_keeps_utf8_whole(tmp_path):
    text = "€" * 1000  # 3000 bytes, no newline: cut every 64 bytes, never inside a €
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = docs(path, max_doc_bytes=64)
    assert len(pieces) > 1
    assert [p.decode("utf-8") for p in pieces] and b"".join(pieces).decode("utf-8") == text


@pytest.mark.parametrize("value", [{"a": 1}, 5, [1, 2], True])
def test_jsonl_text_that_is_not_a_string(tmp_path, value):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(SourceError, match=rf"d.jsonl:2: field 'text' is a JSON"):
        docs(path)


def test_parquet_text_that_is_not_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(SourceError, match=r"d.parquet: row 1: column 'text' holds int"):
        docs(path)


def test_not_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="fake.parquet: cannot read"):
        docs(path)


def test_corrupt_zst_names_the_file(tmp_path):
    zstd = pytest.importorskip("zstandard")
    path = tmp_path / "d.txt.zst"
    path.write_bytes(zstd.ZstdCompressor().compress(b"hello " * 1000)[:20] + b"\xff" * 50)
    with pytest.raises(SourceError, match="d.txt.zst: cannot read"):
        docs(path)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "prog"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 10)
    with pytest.raises(SourceError, match="prog: looks like a binary file"):
        docs(path)
    with pytest.raises(ValueError, match="prog looks like a binary file"):
        load_text(str(path))
