"""Conversions to and from tiktoken and Hugging Face `tokenizers`.

Both peers encode exactly as fastlm does when given the same vocabulary (checked by the tests on
real text): tiktoken shares the id-is-rank rule outright. For Hugging Face the export lists, as
merges, every split of every token into two tokens, ordered by the token's id, and sets
`ignore_merges` (a piece that is a whole token is taken whole), which is the same rule spelled as a
merge list. Hugging Face stores bytes as printable characters (GPT-2's byte-to-unicode table).
One theoretical gap: where two different splits of the same token overlap in a piece
(x|y|z with x+y == y+z), tiktoken takes the leftmost and HF the split listed first; no such case
appeared in the tests' real text.
"""
import base64
import json
import os

from fastlm.tokenizer import patterns
from fastlm.tokenizer.formats import TokenizerFileError

# What tiktoken gets for pattern "none": the whole text as one piece.
NONE_REGEX = r"[\s\S]+"


def _need(module):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"this needs the `{module}` package: pip install {module}") from None


# ---- tiktoken ----------------------------------------------------------------------------------
def _ranks(tok):
    specials = set(tok.special_tokens.values())
    return {t: i for i, t in enumerate(tok.tokens) if i not in specials and t}


def to_tiktoken(tok, name=None):
    tiktoken = _need("tiktoken")
    return tiktoken.Encoding(
        name=name or f"fastlm-{tok.hash()}",
        pat_str=patterns.REGEXES[tok.pattern] or NONE_REGEX,
        mergeable_ranks=_ranks(tok),
        # Longest first: tiktoken tries special tokens in this order at a position.
        special_tokens=dict(sorted(tok.special_tokens.items(), key=lambda kv: -len(kv[0]))),
    )


def _tokens_from_ranks(ranks, specials):
    n = max([*ranks.values(), *specials.values()], default=-1) + 1
    tokens = [b""] * n
    for t, i in ranks.items():
        tokens[i] = t
    for s, i in specials.items():
        tokens[i] = s.encode("utf-8")
    return tokens


def from_tiktoken(cls, encoding):
    pat = getattr(encoding, "_pat_str", None)
    name = "none" if pat == NONE_REGEX else patterns.name_of_regex(pat)
    if name is None:
        raise ValueError(f"tiktoken encoding {encoding.name!r} splits text with a pattern fastlm "
                         f"does not implement natively ({pat!r}); supported: GPT-2's and GPT-4's")
    return cls(_tokens_from_ranks(encoding._mergeable_ranks, encoding._special_tokens),
               dict(encoding._special_tokens), pattern=name)


def save_tiktoken_ranks(tok, path):
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n" for t, i in sorted(_ranks(tok).items(), key=lambda kv: kv[1]))


def load_tiktoken_ranks(cls, path, pattern, special_tokens):
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                t, i = line.split()
                ranks[base64.b64decode(t, validate=True)] = int(i)
            except ValueError:
                raise TokenizerFileError(f"{path}:{lineno}: expected 'base64-token rank', got "
                                         f"{line[:60]!r}") from None
    specials = dict(special_tokens or {})
    return cls(_tokens_from_ranks(ranks, specials), specials, pattern=patterns.check(pattern))


# ---- Hugging Face ------------------------------------------------------------------------------
def byte_to_char():
    """GPT-2's table: each byte as a printable character (printable Latin-1 maps to itself)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _hf_merges(tok):
    """Every split of every token into two tokens, by the token's id: as a merge list with
    `ignore_merges`, this reproduces the rank rule fastlm and tiktoken use."""
    ranks = _ranks(tok)
    merges = []
    for t, i in sorted(ranks.items(), key=lambda kv: kv[1]):
        for k in range(1, len(t)):
            if t[:k] in ranks and t[k:] in ranks:
                merges.append((t[:k], t[k:]))
    return merges


def save_hf(tok, path):
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    b2c = byte_to_char()

    def s(b):
        return "".join(b2c[x] for x in b)

    regex = patterns.HF_REGEXES[tok.pattern]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    pre = byte_level if regex is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        byte_level]}
    specials = tok.special_tokens
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": text, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for text, i in sorted(specials.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {s(t): i for t, i in _ranks(tok).items()},
                  "merges": [f"{s(a)} {s(b)}" for a, b in _hf_merges(tok)]},
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def _hf_pattern(pre):
    """The pattern name of a tokenizer.json pre_tokenizer, or raise."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        # use_regex=True is GPT-2's original pattern, equivalent to tiktoken's form.
        return "gpt2" if pre.get("use_regex", True) else "none"
    if pre.get("type") == "Sequence":
        found = [_hf_pattern(p) for p in pre.get("pretokenizers", [])]
        names = [f for f in found if f not in (None, "none")]
        return names[0] if len(names) == 1 else "none" if not names else None
    if pre.get("type") == "Split":
        return patterns.name_of_regex(pre.get("pattern", {}).get("Regex"))
    return None


def load_hf(cls, path):
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")

    def fail(msg):
        raise TokenizerFileError(f"{path}: {msg}")

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"not valid JSON ({e}); the file is truncated or corrupt")
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        fail("not a Hugging Face BPE tokenizer.json (model.type must be 'BPE')")
    name = _hf_pattern(doc.get("pre_tokenizer"))
    if name is None:
        fail("its pre-tokenizer is not GPT-2's or GPT-4's split pattern (the ones fastlm "
             "implements natively)")
    c2b = {c: b for b, c in byte_to_char().items()}
    ranks = {}
    for text, i in model.get("vocab", {}).items():
        try:
            ranks[bytes(c2b[c] for c in text)] = i
        except KeyError:
            fail(f"token {text!r} is not byte-level (fastlm reads byte-level BPE only)")
    specials = {}
    for t in doc.get("added_tokens", []):
        if t.get("special"):
            specials[t["content"]] = t["id"]
            ranks.pop(t["content"].encode("utf-8"), None)
    # fastlm (like tiktoken) merges by token id; a merge list in another order is different BPE.
    last = -1
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m
        t = bytes(c2b[c] for c in a + b)
        if ranks.get(t, -1) < last:
            fail("its merge order differs from its token id order, which fastlm's id-is-rank "
                 "BPE cannot represent")
        last = max(last, ranks.get(t, -1))
    return cls(_tokens_from_ranks(ranks, specials), specials, pattern=name)
