"""Conversions to and from tiktoken and Hugging Face `tokenizers`.

Both peers encode exactly as fastlm does when given the same vocabulary (checked by the tests on
real text): tiktoken shares the id-is-rank rule outright. For Hugging Face the export lists, as
merges, every split of every token into two tokens, ordered by the token's id, and sets
`ignore_merges` (a piece that is a whole token is taken whole), which is the same rule spelled as a
merge list. Hugging Face stores bytes as printable characters (GPT-2's byte-to-unicode table).
One theoretical gap: where two different splits of the same token overlap in a piece
(x|y|z with x+y == y+z), tiktoken takes the leftmost and HF the split listed first; no such case
appeared in the tests' real text.

Each export writes what its peer needs to rebuild the tokenizer exactly: beside tiktoken's ranks
file a JSON of the other tiktoken.Encoding arguments (the split regex and the special tokens),
beside tokenizer.json a tokenizer_config.json (eos/bos, the other special tokens and fastlm's chat
template, so transformers' apply_chat_template gives fastlm's chat prompt ids). An output path
that is a directory (one that exists, ends with a separator, or has no suffix: made if new) gets
the conventional file name inside it.
"""
import base64
import json
import os

from fastlm.chat import template
from fastlm.tokenizer import patterns
from fastlm.tokenizer.formats import TokenizerFileError

# What tiktoken gets for pattern "none": the whole text as one piece.
NONE_REGEX = r"[\s\S]+"


def out_file(path, name):
    """The file an export to `path` writes: path/name when path is a directory (existing, ending
    with a separator or without a suffix), else path itself; the folder it goes in is made."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith((os.sep, "/")) or not os.path.splitext(path)[1]:
        path = os.path.join(path, name)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path


def _write(path, text):
    """Write through a temporary file and a rename: no half-written file under the real name."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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


def tiktoken_meta_path(ranks_path):
    """The JSON written beside a ranks file: its name plus ".json"."""
    return f"{os.fspath(ranks_path)}.json"


def save_tiktoken_ranks(tok, path):
    """Write the ranks (base64 token, space, rank per line) and, beside them, the other
    tiktoken.Encoding arguments: tiktoken.Encoding(**meta minus "pattern",
    mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks)). Returns the ranks file's path."""
    path = out_file(path, "tokenizer.tiktoken")
    _write(path, "".join(f"{base64.b64encode(t).decode()} {i}\n"
                         for t, i in sorted(_ranks(tok).items(), key=lambda kv: kv[1])))
    meta = {"name": f"fastlm-{tok.hash()}", "pattern": tok.pattern,
            "pat_str": patterns.REGEXES[tok.pattern] or NONE_REGEX,
            "special_tokens": tok.special_tokens}
    _write(tiktoken_meta_path(path), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return path


def _tiktoken_meta(path, pattern, special_tokens):
    """(pattern, special tokens) of a ranks file: the JSON beside it, which an explicit
    argument must agree with, else the arguments (pattern defaulting to gpt4)."""
    meta_path = tiktoken_meta_path(path)
    if not os.path.isfile(meta_path):
        return patterns.check(pattern or "gpt4"), dict(special_tokens or {})
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        saved_pattern, saved_specials = patterns.check(meta["pattern"]), dict(meta["special_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerFileError(f"{meta_path}: unreadable tiktoken metadata ({e})") from None
    if pattern is not None and pattern != saved_pattern:
        raise TokenizerFileError(f"{path} was written with split pattern {saved_pattern!r} "
                                 f"({meta_path}), not {pattern!r}")
    if special_tokens is not None and dict(special_tokens) != saved_specials:
        raise TokenizerFileError(f"{path} was written with special tokens {saved_specials} "
                                 f"({meta_path}), not {dict(special_tokens)}")
    return saved_pattern, saved_specials


def load_tiktoken_ranks(cls, path, pattern=None, special_tokens=None):
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.tiktoken")
    pattern, specials = _tiktoken_meta(path, pattern, special_tokens)
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
    return cls(_tokens_from_ranks(ranks, specials), specials, pattern=pattern)


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
    """Write tokenizer.json (to `path`, or inside it when it is a directory); returns its path."""
    path = out_file(path, "tokenizer.json")
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
    _write(path, json.dumps(doc, ensure_ascii=False))
    return path


def hf_tokenizer_config(tok, model_max_length=None):
    """tokenizer_config.json's content: <|endoftext|> as eos and bos (fastlm separates documents
    with it and prepends nothing else), the other special tokens, and the chat template."""
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "chat_template": template.jinja(tok)}
    if model_max_length is not None:
        tc["model_max_length"] = model_max_length
    if tok.eot_id is not None:
        tc.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    others = [s for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
              if s != "<|endoftext|>"]
    if others:
        tc["additional_special_tokens"] = others
    return tc


def save_hf_dir(tok, path, model_max_length=None):
    """tokenizer.json and tokenizer_config.json side by side (what AutoTokenizer reads);
    returns the tokenizer.json path."""
    path = save_hf(tok, path)
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    _write(config, json.dumps(hf_tokenizer_config(tok, model_max_length), indent=2,
                              ensure_ascii=False) + "\n")
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
