"""Native BPE training against the pure-Python reference: same pre-token counts and the same merges
on several corpora, patterns and vocabulary sizes, whatever the threads and input slicing."""
import pytest

pytest.importorskip("regex", reason="the reference tokenizer needs the regex package")
from fastlm.tokenizer import Tokenizer, reference
from tests.bpe_corpus import mixed_text, stdlib_text

_bpe = pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

CORPORA = {
    "code": lambda: stdlib_text(12_000),
    "mixed": lambda: mixed_text(1500, seed=1),
    "repetitive": lambda: "aaaa aaa aaaaaaa abab ababab " * 200 + "b" * 50,
}


def native_train(docs, pattern, n_new, specials=(), threads=2, block_bytes=1 << 20):
    t = _bpe.Trainer(pattern, list(specials), threads, block_bytes)
    t.feed_texts(list(docs))
    return t.train(n_new)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_counts_match_reference(pattern, corpus):
    text = CORPORA[corpus]()
    t = _bpe.Trainer(pattern, ["<|endoftext|>"], 2)
    t.feed_texts([text, text[:500] + "<|endoftext|>" + text[500:900]])
    expected = reference.count_pieces([text, text[:500] + "<|endoftext|>" + text[500:900]],
                                      pattern, ["<|endoftext|>"])
    assert t.counts() == dict(expected)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
@pytest.mark.parametrize("corpus,n_new", [("code", 300), ("mixed", 150), ("repetitive", 40)])
def test_merges_match_reference(pattern, corpus, n_new):
    text = CORPORA[corpus]()
    tokens, merges = native_train([text], pattern, n_new)
    ref_tokens, ref_merges = reference.train(reference.count_pieces([text], pattern), n_new)
    assert merges == ref_merges
    assert tokens == ref_tokens


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_streamed_slices_and_threads_give_same_counts(pattern):
    # Feeding a document in odd slices, with tiny blocks (many safe cuts) on 1 or 2 threads,
    # counts exactly what counting it whole does.
    text = (stdlib_text(20_000) + mixed_text(800) + "<|endoftext|>" + stdlib_text(3000)).encode()
    whole = _bpe.Trainer(pattern, ["<|endoftext|>"], 1)
    whole.feed_texts([text.decode()])
    expected = whole.counts()
    for threads in (1, 2):
        t = _bpe.Trainer(pattern, ["<|endoftext|>"], threads, 64)
        for i in range(0, len(text), 997):
            t.feed(text[i:i + 997])
        t.end_document()
        assert t.counts() == expected


def test_special_token_never_cut_by_a_block_boundary():
    # Safe cuts include "letter, space, letter": a special token containing one must not be split.
    doc = ("word <|my special|> more words\n" * 300).encode()
    t = _bpe.Trainer("gpt4", ["<|my special|>"], 2, 16)
    t.feed(doc)
    t.end_document()
    counts = t.counts()
    assert b" special" not in counts and counts[b"word"] == counts[b" more"] == 300


def test_training_files_folders_and_globs(tmp_path):
    a = stdlib_text(6000)
    b = mixed_text(300)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "d" / "b.txt").write_text(b, encoding="utf-8")
    (tmp_path / "d" / ".hidden").write_text("zzzz zzzz", encoding="utf-8")
    from_texts = Tokenizer.train(iter([a, b]), vocab_size=400, pattern="gpt4")
    for spec in (str(tmp_path / "d"), str(tmp_path / "d" / "*.txt"),
                 [tmp_path / "d" / "a.txt", tmp_path / "d" / "b.txt"]):
        tok = Tokenizer.train(spec, vocab_size=400, pattern="gpt4", threads=2)
        assert tok.merges == from_texts.merges
        assert tok.hash() == from_texts.hash()


def test_invalid_utf8_file_trains_like_surrogateescape(tmp_path):
    data = b"caf\xe9 caf\xe9 \xff\xfe bad bytes \xed\xa0\x80 here " * 40
    (tmp_path / "bad.txt").write_bytes(data)
    tok = Tokenizer.train(str(tmp_path / "bad.txt"), vocab_size=270, pattern="gpt2",
                          special_tokens=[])
    ref_tokens, ref_merges = reference.train(reference.count_pieces([data], "gpt2"), 14)
    assert tok.merges == ref_merges and tok.tokens == ref_tokens


def test_train_vocab_layout_and_specials():
    text = stdlib_text(5000)
    tok = Tokenizer.train(iter([text]), vocab_size=300, pattern="gpt4",
                          special_tokens=["<|endoftext|>", "<|pad|>"])
    assert tok.vocab_size == 300
    assert tok.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299}
    assert tok.tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(tok.merges) == 42


def test_train_runs_out_of_pairs_with_a_warning():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = Tokenizer.train(iter(["ab ab ab"]), vocab_size=1000, special_tokens=[])
    assert tok.vocab_size < 1000


@pytest.mark.parametrize("bad,match", [
    ({"vocab_size": 100}, "vocab_size"),
    ({"pattern": "gpt5"}, "unknown split pattern"),
    ({"special_tokens": ["<a>", "<a>"]}, "duplicates"),
    ({"special_tokens": [""]}, "non-empty"),
    ({"threads": 0}, "threads"),
])
def test_train_rejects_bad_arguments(bad, match):
    kw = {"vocab_size": 300}
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        Tokenizer.train(iter(["some text"]), **kw)


def test_train_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass an iterator"):
        Tokenizer.train(["hello world, not a file"], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="not a file, a folder or a glob"):
        Tokenizer.train(str(tmp_path / "missing*.txt"), vocab_size=300)
    with pytest.raises(TypeError, match="expected str"):
        Tokenizer.train(iter(["ok", 3]), vocab_size=300)
