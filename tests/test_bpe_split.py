"""The native pre-tokenizers (GPT-2, GPT-4, none) against the regex module running the patterns."""
import pytest

pytest.importorskip("regex", reason="the reference splitter needs the regex package")
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm.tokenizer import reference
from tests.bpe_corpus import mixed_text, stdlib_text

_bpe = pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

PATTERNS = ["gpt2", "gpt4", "none"]

CASES = [
    "", " ", "  ", "\n", " \n", "\n\n \n", "a", "Hello world", "Hello  world", "hello   \n  x",
    "it's we'll they'RE I'M 'S 'Ll 'ſ 'x", "x'", "'", "''s", "123456789", " 1234", "1 2 3",
    "٣٤٥٦ ⅫⅫ", "a\r\nb", "\r\r\n", "  !!!\n\nx", " ?!. \n", "$hello", "\thello", " \tx",
    "end with spaces   ", "mixed\u00a0nbsp\u3000ideo", "\u2028line\u2029para", "e\u0301\u0301",
    "😀😀 👍🏽x", "中文 日本語テキスト", "\x00\x00 a\x00", "tab\t\tsep", "a  \n\nb",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_split_cases(pattern):
    for text in CASES:
        assert _bpe.split(text, pattern) == reference.split(text, pattern), repr(text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_split_real_text(pattern):
    for text in (stdlib_text(50_000), mixed_text(3000)):
        pieces = _bpe.split(text, pattern)
        assert pieces == reference.split(text, pattern)
        assert "".join(pieces) == text


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_split_every_code_point(pattern):
    # Every code point (surrogates excluded), in runs that put each next to letters, digits,
    # spaces and punctuation: a class the native tables get wrong changes the pieces.
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(cps), 200_000):
        text = "".join(chr(c) + "a1 ." for c in cps[start:start + 200_000])
        assert _bpe.split(text, pattern) == reference.split(text, pattern)


alphabet = st.sampled_from(list("aZ09 \n\r\t'sdlmtvreSLVRE!.,-_$ſ\u00a0\u3000\u0301٣é中😀\x00"))


@settings(max_examples=300, deadline=None)
@given(st.lists(alphabet, max_size=40).map("".join))
def test_split_hypothesis_dense(text):
    # A small alphabet of the characters the patterns treat specially finds edge cases fast.
    for pattern in PATTERNS:
        assert _bpe.split(text, pattern) == reference.split(text, pattern)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_split_hypothesis_any_text(text):
    for pattern in PATTERNS:
        assert _bpe.split(text, pattern) == reference.split(text, pattern)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_split_invalid_utf8_like_surrogateescape(data):
    # Training files may hold any bytes: each bad byte is one "other" character, as in
    # bytes.decode("utf-8", "surrogateescape").
    text = data.decode("utf-8", "surrogateescape")
    for pattern in PATTERNS:
        expected = [p.encode("utf-8", "surrogateescape") for p in reference.split(text, pattern)]
        assert _bpe.split(data, pattern) == expected


def test_unknown_pattern_is_rejected():
    with pytest.raises(ValueError, match="expected 'gpt2', 'gpt4' or 'none'"):
        _bpe.split("x", "gpt5")


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at index 2"):
        _bpe.split("ab\ud800c", "gpt4")
