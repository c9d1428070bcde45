"""Arbitrary bytes into every reader of user files (issue 19): the config parser, the .jsonl and
.parquet readers, the tokenizer (files, text and ids) and the shard reader either accept the
input or raise their own one-line error (a ValueError naming the file), never anything else.
Bounded (max_examples) so the whole file runs in seconds."""
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastlm.config import ConfigError, parse_args  # noqa: E402
from fastlm.data import SourceError, SourceOptions  # noqa: E402
from fastlm.data.shards import ShardError, open_shard  # noqa: E402
from fastlm.data.sources import iter_file  # noqa: E402
from fastlm.tokenizer import Tokenizer  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

# bytes that look a little like each format, so the readers get past their first check
toml_bytes = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                       st.lists(st.sampled_from([b"[train]\n", b"[model]\n", b"seed = ",
                                                 b"n_layer = ", b"1", b"99999999999999999999",
                                                 b'"x"', b"\n", b"lr = 1e999", b"[[a]]\n",
                                                 b"\xff"]), max_size=12).map(b"".join))
jsonl_bytes = st.one_of(st.binary(max_size=200), st.lists(st.sampled_from([
    b'{"text": "a"}', b'{"text": 1}', b'{"text": null}', b"[]", b"{", b"\n", b'"\\ud800"',
    b'{"text": "\\udcff"}', b'{"other": "x"}', b"\xff\xfe"]), max_size=8).map(b"\n".join))


def write(data: bytes, suffix: str) -> Path:
    path = Path(tempfile.mkdtemp()) / f"f{suffix}"
    path.write_bytes(data)
    return path


@FUZZ
@given(toml_bytes)
def test_config_file(data):
    try:
        parse_args(["--config", str(write(data, ".toml"))])
    except ConfigError:
        pass


@FUZZ
@given(st.text(max_size=40))
def test_config_command_line_value(value):
    try:
        parse_args([f"--train.seed={value}", f"--optim.lr={value}"])
    except ConfigError:
        pass


@FUZZ
@given(jsonl_bytes)
def test_jsonl_reader(data):
    try:
        docs = list(iter_file(str(write(data, ".jsonl")), SourceOptions()))
    except SourceError:
        return
    assert all(isinstance(d, str) for d in docs)


@FUZZ
@given(st.binary(max_size=300))
def test_parquet_reader(data):
    pytest.importorskip("pyarrow")
    try:
        list(iter_file(str(write(b"PAR1" + data + b"PAR1", ".parquet")), SourceOptions()))
    except SourceError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_shard_reader(data):
    for head in (b"", b"FASTLMTK", (20240520).to_bytes(4, "little")):
        try:
            open_shard(write(head + data, ".bin"))
        except ShardError:
            pass


@FUZZ
@given(st.binary(max_size=300))
def test_tokenizer_file(data):
    for head in (b"", b'{"format": "fastlm-tokenizer", "version": 1, '):
        try:
            Tokenizer.load(write(head + data, ".json"))
        except ValueError:
            pass


@FUZZ
@given(st.text(max_size=80), st.lists(st.one_of(
    st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([2**63, 2**64, -2**63 - 1])),
    max_size=8))
def test_tokenizer_text_and_ids(text, ids):
    tok = Tokenizer.byte()
    try:
        encoded = tok.encode(text)
    except ValueError:  # a lone surrogate is not text
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    else:
        assert tok.decode(encoded) == text
    try:
        tok.decode(ids)
    except ValueError as exc:
        assert "not in the vocabulary" in str(exc)  # names the id
