"""Token shard format: round trip, llm.c interop, corruption and tokenizer-mismatch detection."""
import json

import numpy as np
import pytest

from fastlm.data import ManifestError, ShardDataset, ShardError, prepare
from fastlm.data.shards import (HEADER_BYTES, open_shard, read_header, token_dtype, write_llmc_shard,
                                write_shard)


@pytest.mark.parametrize("vocab,dtype", [(257, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                         (200_000, np.uint32)])
def test_round_trip(tmp_path, vocab, dtype):
    assert token_dtype(vocab) == dtype
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, 1001).astype(dtype)
    write_shard(tmp_path / "s.bin", tokens, token_dtype(vocab))
    info = read_header(tmp_path / "s.bin")
    assert (info.format, info.num_tokens, info.offset) == ("fastlm", 1001, HEADER_BYTES)
    got = open_shard(tmp_path / "s.bin")
    assert got.dtype == dtype and np.array_equal(got, tokens)
    # plain numpy.memmap reads it too, as the format promises
    raw = np.memmap(tmp_path / "s.bin", dtype=dtype, mode="r", offset=HEADER_BYTES)
    assert np.array_equal(raw, tokens)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_write_rejects_overflow(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(tmp_path / "s.bin", np.array([70000]), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(tmp_path / "s.bin", np.array([-1, 5]), np.uint32)


@pytest.mark.parametrize("version,dtype", [(1, np.uint16), (2, np.uint32)])
def test_reads_llmc_format(tmp_path, version, dtype):
    tokens = np.arange(5000, dtype=np.int64) * 7 % 50257
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", tokens, version)
    head = np.fromfile(tmp_path / "fineweb_train_000001.bin", dtype="<i4", count=3)
    assert head.tolist() == [20240520, version, 5000]  # llm.c's own header layout
    got = open_shard(tmp_path / "fineweb_train_000001.bin")
    assert got.dtype == dtype and np.array_equal(got, tokens)
    write_llmc_shard(tmp_path / "fineweb_val_000000.bin", tokens[:100], version)
    ds = ShardDataset(tmp_path, "train")  # a folder of llm.c shards, no manifest
    assert ds.num_tokens == 5000 and ds.vocab_size is None
    assert ShardDataset(tmp_path, "val").num_tokens == 100
    assert ShardDataset(str(tmp_path / "fineweb_*.bin")).num_tokens == 5100


def test_truncated_and_foreign_files(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100), np.uint16)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"s\.bin: file is .* truncated"):
        open_shard(tmp_path / "s.bin")
    (tmp_path / "h.bin").write_bytes(data[:20])
    with pytest.raises(ShardError, match=r"h\.bin: truncated header"):
        open_shard(tmp_path / "h.bin")
    (tmp_path / "x.bin").write_bytes(b"hello world, not a shard")
    with pytest.raises(ShardError, match=r"x\.bin: not a token shard"):
        open_shard(tmp_path / "x.bin")
    with pytest.raises(ShardError, match=r"missing\.bin: cannot read"):
        open_shard(tmp_path / "missing.bin")


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        words = rng.choice(["lorem", "ipsum", "dolor", "sit", "amet", "elit"], 60 + 10 * i)
        (src / f"doc{i:02d}.txt").write_text(" ".join(words))
    out = tmp_path / "out"
    prepare([str(src)], out, workers=1, shard_tokens=700, val_fraction=0.2, progress=False)
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]) > 2
    return out


def test_corrupted_shard_detected_by_checksum(prepared):
    ShardDataset(prepared, "train")  # fine before
    victim = prepared / "train_000001.bin"
    data = bytearray(victim.read_bytes())
    data[HEADER_BYTES + 5] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train_000001\.bin: sha256 does not match"):
        ShardDataset(prepared, "train")
    ShardDataset(prepared, "train", verify=False)  # size checks alone pass: the opt-out works


def test_truncated_shard_in_prepared_dir(prepared):
    victim = prepared / "train_000000.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ShardError, match=r"train_000000\.bin: file is .* truncated"):
        ShardDataset(prepared, "train", verify=False)


def test_manifest_from_another_tokenizer(prepared):
    ds = ShardDataset(prepared, "train", tokenizer_hash=json.loads(
        (prepared / "manifest.json").read_text())["tokenizer"]["hash"])
    assert ds.vocab_size == 257 and ds.eot_id == 256
    with pytest.raises(ManifestError, match=r"manifest\.json: shards were made with tokenizer 'byte'"):
        ShardDataset(prepared, "train", tokenizer_hash="0" * 64)


def test_bad_manifests(tmp_path, prepared):
    with pytest.raises(ManifestError, match="no such prepared folder"):
        ShardDataset(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: unreadable manifest"):
        ShardDataset(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="no split 'test'"):
        ShardDataset(prepared, "test")
