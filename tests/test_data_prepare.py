"""prepare end to end: input formats, determinism across workers, resume, bad input, the CLI."""
import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import fastlm.data.pipeline as prep
from fastlm.data import PrepareError, ShardDataset, SourceError, SourceOptions, prepare
from fastlm.data.__main__ import main as cli
from fastlm.data.clean import CleanConfig
from fastlm.data.encoders import BYTE_EOT, ByteEncoder
from fastlm.data.shards import open_shard

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def words(seed, n=80):
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def all_text(out, split):
    """Documents of a split, decoded, in order (each shard's tokens start with EOT)."""
    tokens = np.concatenate([open_shard(p) for p in ShardDataset(out, split).paths])
    text = ByteEncoder().decode(tokens.tolist())
    return text.split("<|endoftext|>")[1:]


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare([str(i) for i in inputs], out, **kw)


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    for i in range(10):
        (src / f"a{i}.txt").write_text(words(i))
    (src / "sub" / "b.md").write_text("# Title\n\n" + words(100))
    (src / "sub" / "c.py").write_text("def f(x):\n    return x + 1  # " + words(101, 20) + "\n")
    (src / "image.png").write_bytes(b"\x89PNG not text")  # unknown kind: skipped in folders
    (src / "dup.txt").write_text(words(3))  # exact copy of a3.txt
    with gzip.open(src / "more.jsonl.gz", "wt") as f:
        for i in range(5):
            f.write(json.dumps({"id": i, "text": words(200 + i)}) + "\n")
        f.write(json.dumps({"id": 9, "text": words(200)[:-3] + "xyz"}) + "\n")  # near-dup
    return src


def test_end_to_end(corpus, tmp_path):
    m = run([corpus], tmp_path / "out", shard_tokens=1000, val_fraction=0.2)
    r = m["cleaning"]
    assert r["documents_in"] == 19 and r["dropped_exact_dup"] == 1 and r["dropped_near_dup"] == 1
    assert r["documents_out"] == 17 == m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    assert m["splits"]["val"]["documents"] == round(17 * 0.2)
    docs = all_text(tmp_path / "out", "train") + all_text(tmp_path / "out", "val")
    assert sorted(docs) == sorted([words(i) for i in range(10)] + ["# Title\n\n" + words(100)]
                                  + ["def f(x):\n    return x + 1  # " + words(101, 20)]
                                  + [words(200 + i) for i in range(5)])
    shards = m["splits"]["train"]["shards"]
    assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert m["tokenizer"] == {"name": "byte", "hash": ByteEncoder.hash, "vocab_size": 257,
                              "eot_id": BYTE_EOT, "eot_position": "before each document",
                              "path": None}
    assert not (tmp_path / "out" / prep.STATE_DIR).exists()


def test_same_output_for_any_worker_count(corpus, tmp_path):
    a = run([corpus], tmp_path / "w1", shard_tokens=700, workers=1)
    b = run([corpus], tmp_path / "w2", shard_tokens=700, workers=2)
    assert a["splits"] == b["splits"]


def test_resume_skips_finished_shards(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_DOCS", 2)  # checkpoints come at batch ends: make many
    reference = run([corpus], tmp_path / "ref", shard_tokens=500)
    n_shards = len(reference["splits"]["train"]["shards"])
    assert n_shards >= 5
    real_write = prep.write_shard
    calls = []

    def crashing_write(path, tokens, dtype):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies while writing its 4th shard
        calls.append(path.name)
        return real_write(path, tokens, dtype)

    monkeypatch.setattr(prep, "write_shard", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        run([corpus], tmp_path / "out", shard_tokens=500)
    assert (tmp_path / "out" / prep.STATE_DIR / "state.json").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()

    cleaned = []
    real_clean = prep.clean_document
    monkeypatch.setattr(prep, "write_shard", lambda p, t, d: calls.append(p.name) or real_write(p, t, d))
    monkeypatch.setattr(prep, "clean_document", lambda *a: cleaned.append(1) or real_clean(*a))
    resumed = run([corpus], tmp_path / "out", shard_tokens=500)
    assert resumed["splits"] == reference["splits"]  # same shards, same checksums
    assert calls[:3] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert "train_000000.bin" not in calls[3:]  # finished shards were not rewritten
    assert len(cleaned) < reference["cleaning"]["documents_in"]  # consumed docs were skipped
    assert resumed["cleaning"] == reference["cleaning"]


def test_rerun_and_overwrite(corpus, tmp_path, capsys):
    first = run([corpus], tmp_path / "out", shard_tokens=1000)
    assert run([corpus], tmp_path / "out", shard_tokens=1000) == first  # finished: returned as is
    with pytest.raises(PrepareError, match="other inputs or settings.*--overwrite"):
        run([corpus], tmp_path / "out", shard_tokens=2000)
    second = run([corpus], tmp_path / "out", shard_tokens=2000, overwrite=True)
    assert [s["file"] for s in second["splits"]["train"]["shards"]] == \
        sorted(p.name for p in (tmp_path / "out").glob("train_*.bin"))


def test_empty_and_filtered_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty: folder holds no files of a known kind"):
        run([tmp_path / "empty"], tmp_path / "o1")
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(PrepareError, match=r"no documents found: the inputs .*blank\.txt"):
        run([tmp_path / "empty"], tmp_path / "o2")
    (tmp_path / "empty" / "short.txt").write_text("tiny")
    (tmp_path / "empty" / "ws.txt").write_text("  \n\n ")
    with pytest.raises(PrepareError, match=r"all 2 documents were filtered out .*dropped_too_short"):
        run([tmp_path / "empty"], tmp_path / "o3", clean=CleanConfig(min_chars=100))
    with pytest.raises(SourceError, match="nothing-here: no such file"):
        run([tmp_path / "nothing-here"], tmp_path / "o4")


def test_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "first doc"}) + "\n\n" + json.dumps({"content": "second"}))
    run([path], tmp_path / "o1", sources=SourceOptions(text_field="content"), val_fraction=0)
    assert all_text(tmp_path / "o1", "train") == ["first doc", "second"]
    with pytest.raises(SourceError, match=r"d\.jsonl:1: no field 'text'.*--text-field"):
        run([path], tmp_path / "o2")
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SourceError, match=r"d\.jsonl:2: invalid JSON"):
        run([path], tmp_path / "o3")


def test_invalid_utf8_counted_not_crashing(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text then \xff\xfe bad bytes")
    m = run([tmp_path / "bad.txt"], tmp_path / "o", val_fraction=0)
    assert m["cleaning"]["invalid_utf8_replaced"] == 1
    assert all_text(tmp_path / "o", "train") == ["good text then \ufffd\ufffd bad bytes"]


def test_missing_optional_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "x.txt.zst").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(SourceError, match=r"x\.txt\.zst \(\.zst\) needs the optional package "
                                          r"'zstandard': pip install zstandard"):
        run([tmp_path / "x.txt.zst"], tmp_path / "o")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SourceError, match="needs the optional package 'datasets'"):
        run(["hf:wikitext"], tmp_path / "o")


def test_zstd(tmp_path):
    zstd = pytest.importorskip("zstandard", reason=".zst input needs the optional zstandard package")
    (tmp_path / "a.txt.zst").write_bytes(zstd.ZstdCompressor().compress(b"zstd compressed text"))
    run([tmp_path / "a.txt.zst"], tmp_path / "o", val_fraction=0)
    assert all_text(tmp_path / "o", "train") == ["zstd compressed text"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason=".parquet input needs the optional pyarrow package")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["row one", None, "row three"], "n": [1, 2, 3]}),
                   tmp_path / "t.parquet")
    run([tmp_path / "t.parquet"], tmp_path / "o", val_fraction=0)
    assert all_text(tmp_path / "o", "train") == ["row one", "row three"]
    with pytest.raises(SourceError, match=r"t\.parquet: no column 'body'"):
        run([tmp_path / "t.parquet"], tmp_path / "o2", sources=SourceOptions(text_field="body"))


ARTICLE = ("<html><head><title>T</title><script>var x = 1;</script></head><body>"
           "<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav><article><h1>Rivers</h1>"
           + "".join(f"<p>Paragraph {i}: rivers carry water from the mountains to the sea, shaping "
                     f"valleys and feeding the fields along their banks for many seasons.</p>"
                     for i in range(4))
           + "</article><footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>")


def test_html_main_text_extraction(tmp_path):
    pytest.importorskip("trafilatura", reason="HTML extraction needs the optional trafilatura package")
    (tmp_path / "page.html").write_text(ARTICLE)
    run([tmp_path / "page.html"], tmp_path / "o", val_fraction=0)
    (text,) = all_text(tmp_path / "o", "train")
    assert "Paragraph 3: rivers carry water" in text
    assert "var x" not in text and "All rights reserved" not in text


def test_warc_and_wet(tmp_path):
    pytest.importorskip("warcio", reason="WARC/WET input needs the optional warcio package")
    pytest.importorskip("trafilatura", reason="HTML extraction needs the optional trafilatura package")
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(tmp_path / "crawl.warc.gz", "wb") as f:
        w = WARCWriter(f, gzip=True)
        for uri, ctype, body in [("http://a.example/", "text/html; charset=utf-8", ARTICLE.encode()),
                                 ("http://a.example/x.png", "image/png", b"\x89PNG")]:
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(uri, "response", payload=io.BytesIO(body),
                                                http_headers=headers))
    with open(tmp_path / "crawl.warc.wet", "wb") as f:
        w = WARCWriter(f, gzip=False)
        w.write_record(w.create_warc_record("http://b.example/", "conversion",
                                            payload=io.BytesIO(b"plain extracted text of page b"),
                                            warc_content_type="text/plain"))
    run([tmp_path / "crawl.warc.gz", tmp_path / "crawl.warc.wet"], tmp_path / "o", val_fraction=0)
    docs = all_text(tmp_path / "o", "train")
    assert len(docs) == 2 and "Paragraph 0: rivers" in docs[0]
    assert docs[1] == "plain extracted text of page b"


def test_cli_prepare_and_inspect(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["prepare", str(corpus), "--out", str(out), "--workers", "1", "--quiet",
                "--shard-tokens", "800", "--pii", "--max-symbol-ratio", "5"]) == 0
    printed = capsys.readouterr().out
    assert "dropped exact dup" in printed and "documents out" in printed and "train tokens" in printed
    assert cli(["inspect", str(out), "--sample-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    assert "ok (headers, sizes and sha256 checked)" in printed and "<|endoftext|>" in printed
    shard = out / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    assert cli(["inspect", str(out)]) == 1
    assert "BAD" in capsys.readouterr().out
    assert cli(["prepare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing: no such file" in capsys.readouterr().err


def test_cli_as_a_module(corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastlm.data", "prepare", str(corpus), "--out",
                           str(out), "--workers", "2", "--shard-tokens", "1000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "documents out" in proc.stdout and "prepare" in proc.stderr  # report + progress bar
    proc = subprocess.run([sys.executable, "-m", "fastlm.data", "inspect", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sha256 checked" in proc.stdout, proc.stderr


def test_huge_text_file_is_streamed_in_line_aligned_pieces(tmp_path):
    from fastlm.data.sources import iter_file

    lines = [f"line {i} " + "x" * (i % 17) + "\n" for i in range(500)]
    (tmp_path / "big.txt").write_text("".join(lines))
    pieces = list(iter_file(str(tmp_path / "big.txt"), SourceOptions(max_doc_bytes=1000)))
    assert len(pieces) > 5 and b"".join(pieces) == "".join(lines).encode()
    assert all(p.endswith(b"\n") for p in pieces)
