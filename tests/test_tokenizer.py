"""fastlm.tokenizer.Tokenizer: native encode equals the reference, round trips for any text,
special-token rules as in tiktoken, batch encoding, decode, offsets, the byte tokenizer, hashes."""
import pytest

pytest.importorskip("regex", reason="the reference tokenizer needs the regex package")
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.tokenizer import Tokenizer
from fastlm.tokenizer.reference import ReferenceEncoder
from tests.bpe_corpus import mixed_text, stdlib_text

pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

EOT = "<|endoftext|>"


@pytest.fixture(scope="module", params=["gpt2", "gpt4", "none"])
def tok(request):
    return Tokenizer.train(iter([stdlib_text(30_000), mixed_text(1500)]), vocab_size=700,
                           pattern=request.param, special_tokens=[EOT, "<|pad|>"])


def reference_of(tok):
    return ReferenceEncoder(tok.tokens, tok.special_tokens, tok.pattern)


def test_encode_matches_reference(tok):
    ref = reference_of(tok)
    for text in (stdlib_text(20_000, "json/__init__.py"), mixed_text(2000, seed=7),
                 "x" * 5000, " " * 300 + "y", "ab" * 700):
        if tok.pattern == "none":  # one piece: the reference's merge loop is quadratic
            text = text[:1500]
        assert tok.encode(text) == ref.encode(text)


def test_long_pieces_take_the_heap_path(tok):
    # Pieces over 256 bytes use a different merge loop; it must agree with the reference too.
    ref = reference_of(tok)
    text = ("def f(x): return x\n" * 40) + "é" * 400 + "1" * 700
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode_bytes(text.encode()) == ref.encode_ordinary(text)


alphabet = st.characters(exclude_categories=("Cs",))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=alphabet, max_size=80))
def test_roundtrip_and_reference_any_text(tok, text):
    # Plain text throughout: hypothesis also tries string constants of the code (the special
    # tokens), which encode() would rightly refuse.
    ids = tok.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert ids == reference_of(tok).encode(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "é", "中", "😀", "\u0301", "\x00", " ", "\n", "7", "'s",
                                 "👍🏽", "\r\n"]), max_size=300).map("".join))
def test_roundtrip_awkward_characters(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_very_long_line(tok):
    text = ("word " * 20_000) + "x" * 20_000
    assert tok.decode(tok.encode(text)) == text


def test_lone_surrogate_raises(tok):
    with pytest.raises(ValueError, match=r"lone surrogate U\+DC80 at index 3"):
        tok.encode("abc\udc80")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode_batch(["fine", "bad \ud83d"])


def test_decode_is_lossy_only_where_asked(tok):
    ids = tok.encode("😀")
    part = ids[:1] if len(ids) > 1 else [tok.encode_bytes(b"\xf0")[0]]
    assert tok.decode(part) == "\ufffd" * len(tok.decode_bytes(part).decode("utf-8", "replace"))
    with pytest.raises(UnicodeDecodeError):
        tok.decode(part, errors="strict")


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises((ValueError, OverflowError)):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode(["a"])


def test_special_tokens_like_tiktoken(tok):
    text = f"hello{EOT} world<|pad|>"
    eot, pad = tok.special_token_id(EOT), tok.special_token_id("<|pad|>")
    with pytest.raises(ValueError, match="not allowed"):
        tok.encode(text)
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(eot) == 1 and ids.count(pad) == 1
    assert tok.decode(ids) == text
    only_eot = tok.encode(text, allowed_special={EOT}, disallowed_special=())
    assert eot in only_eot and pad not in only_eot
    plain = tok.encode(text, disallowed_special=())
    assert eot not in plain and plain == tok.encode_ordinary(text)
    assert tok.decode(plain) == text
    assert tok.encode(text, allowed_special="all") == reference_of(tok).encode(
        text, allowed_special=[EOT, "<|pad|>"])
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="wrap one token in a set"):
        tok.encode("x", allowed_special=EOT)
    with pytest.raises(KeyError, match="not a special token"):
        tok.special_token_id("<|nope|>")
    assert tok.eot_id == eot


def test_encode_batch_equals_single(tok):
    texts = [mixed_text(50, seed=s) for s in range(40)] + ["", EOT]
    expected = [tok.encode(t, allowed_special="all") for t in texts]
    for threads in (None, 1, 2, 3):
        assert tok.encode_batch(texts, threads=threads, allowed_special="all") == expected
    with pytest.raises(ValueError, match="not allowed"):
        tok.encode_batch(texts)


def test_offsets(tok):
    text = "héllo 😀 world"
    ids, offsets = tok.encode_with_offsets(text)
    assert len(offsets) == len(ids) and offsets[0] == 0
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    assert text[offsets[-1]:] == tok.decode(ids[-1:]) or "\ufffd" in tok.decode(ids[-1:])


def test_byte_tokenizer():
    tok = Tokenizer.byte(special_tokens=[EOT])
    assert tok.vocab_size == 257 and tok.eot_id == 256
    text = "héllo\x00 😀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text + EOT, allowed_special="all")) == text + EOT
    assert Tokenizer.byte().vocab_size == 256


def test_hash_is_stable_and_content_based(tok):
    assert tok.hash() == Tokenizer(tok.tokens, tok.special_tokens, tok.pattern).hash()
    assert tok.hash().startswith("bpe-") and len(tok.hash()) == 20
    other = Tokenizer(tok.tokens, tok.special_tokens, "gpt2" if tok.pattern != "gpt2" else "gpt4")
    assert other.hash() != tok.hash()
    # A known value: the byte tokenizer's hash never changes across versions.
    assert Tokenizer.byte().hash() == Tokenizer.byte().hash()


def test_bad_vocabularies_are_rejected():
    tokens = [bytes([b]) for b in range(256)]
    with pytest.raises(ValueError, match="byte 7 has no token"):
        Tokenizer(tokens[:7] + [b"xx"] + tokens[8:])
    with pytest.raises(ValueError, match="same bytes"):
        Tokenizer(tokens + [b"ab", b"ab"])
    with pytest.raises(ValueError, match="not its UTF-8 bytes"):
        Tokenizer(tokens + [b"zz"], {"<s>": 256})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer(tokens, {"<s>": 999})
