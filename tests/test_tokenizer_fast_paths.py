"""The native encoder's fast paths give the reference's ids: the table of tokens of up to 8 bytes
(pieces of 1-9 bytes, at the very end of a text where fewer than 8 bytes are left to read), the
per-thread cache of merged pieces (hits, pieces at its 64-byte bound, more distinct pieces than it
holds, one cache per encode_batch worker), the shared Python ints of the returned ids, and
encode_batch building its lists while the workers run (errors, the garbage collector's state)."""
import gc
import random

import pytest

pytest.importorskip("regex", reason="the reference tokenizer needs the regex package")

from fastlm.tokenizer import Tokenizer
from fastlm.tokenizer.reference import ReferenceEncoder
from tests.bpe_corpus import mixed_text, stdlib_text

pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

CACHE_ENTRIES = 1 << 15  # csrc/bpe/bpe_piece_cache.h kMaxEntries
CACHE_PIECE_BYTES = 64  # ... kMaxPieceBytes


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def tok(request):
    return Tokenizer.train(iter([stdlib_text(30_000), mixed_text(1500)]), vocab_size=600,
                           pattern=request.param, special_tokens=["<|endoftext|>"])


def reference_of(tok):
    return ReferenceEncoder(tok.tokens, tok.special_tokens, tok.pattern)


def words(n, seed, min_len=2, max_len=9):
    rng = random.Random(seed)
    return [" " + "".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(min_len, max_len)))
            for _ in range(n)]


def test_short_pieces_at_the_end_of_the_text(tok):
    ref = reference_of(tok)
    short = [t for t in tok.tokens if 2 <= len(t) <= 8 and t.isascii() and t.strip()]
    assert len(short) > 20  # the vocabulary has multi-byte tokens to look up
    for t in short[:200]:
        text = t.decode()
        for candidate in (text, text + "x", "a " + text, text[:-1], text + text):
            assert tok.encode_ordinary(candidate) == ref.encode_ordinary(candidate), candidate


def test_repeated_words_hit_the_cache(tok):
    ref = reference_of(tok)
    vocab = words(300, seed=1)
    rng = random.Random(2)
    text = "".join(rng.choice(vocab) for _ in range(6000))  # each word ~20 times
    assert tok.encode_ordinary(text) == ref.encode_ordinary(text)
    # The same word first encoded alone and then from the cache, and the other way round.
    for w in vocab[:50]:
        alone = tok.encode_ordinary(w)
        assert tok.encode_ordinary(w + w + w) == alone * 3 == ref.encode_ordinary(w + w + w)


@pytest.mark.parametrize("n", [CACHE_PIECE_BYTES - 1, CACHE_PIECE_BYTES, CACHE_PIECE_BYTES + 1,
                               200, 257])
def test_pieces_around_the_cache_bound(tok, n):
    ref = reference_of(tok)
    rng = random.Random(n)
    piece = " " + "".join(rng.choice("etaoinshrdlu") for _ in range(n - 1))
    text = (piece + ".") * 3
    assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


def test_more_distinct_pieces_than_the_cache_holds(tok):
    # Past CACHE_ENTRIES merged pieces the cache starts over; ids must not change across that,
    # for pieces from before the restart (merged again) and after it (cache hits).
    ref = reference_of(tok)
    distinct = list(dict.fromkeys(words(CACHE_ENTRIES + 3000, seed=3, min_len=5, max_len=7)))
    assert len(distinct) > CACHE_ENTRIES
    text = "".join(distinct) + "".join(distinct[:2000]) + "".join(distinct[-2000:])
    assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


def test_batch_workers_keep_their_own_caches(tok):
    ref = reference_of(tok)
    rng = random.Random(4)
    vocab = words(400, seed=5)
    texts = ["".join(rng.choice(vocab) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    texts += [mixed_text(60, seed=s) for s in range(20)]
    expected = [ref.encode_ordinary(t) for t in texts]
    for threads in (1, 2, 4):
        assert tok.encode_batch(texts, threads=threads, disallowed_special=()) == expected


def test_ids_beyond_the_shared_ints():
    # Ids from 2**18 up are made as new ints, below it they are shared: both must read right.
    n = (1 << 18) + 40
    tokens = [bytes([b]) for b in range(256)] + [b""] * (n - 256 - 3) + [b"ab", b"abc", b"<|e|>"]
    tok = Tokenizer(tokens, special_tokens={"<|e|>": n - 1}, pattern="gpt4")
    ids = tok.encode("abcab ab a<|e|>", allowed_special="all")
    assert ids == [n - 2, n - 3, ord(" "), n - 3, ord(" "), ord("a"), n - 1]
    assert all(type(i) is int for i in ids)
    assert tok.decode(ids) == "abcab ab a<|e|>"


def test_batch_error_and_gc_state_on_threads(tok):
    # On 2+ threads the lists are built while workers run: an error in a middle text must still
    # raise (and not hang), and the garbage collector must be left as the caller had it.
    texts = [f"plain text {i} " * 20 for i in range(300)]
    bad = texts[:150] + ["a <|endoftext|> b"] + texts[150:]
    for threads in (2, 3):
        with pytest.raises(ValueError, match="not allowed"):
            tok.encode_batch(bad, threads=threads)
        assert gc.isenabled()
        assert tok.encode_batch(texts, threads=threads) == [tok.encode(t) for t in texts]
    gc.disable()
    try:
        tok.encode_batch(texts, threads=2)
        assert not gc.isenabled()
    finally:
        gc.enable()
