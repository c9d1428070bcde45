"""fastlm's tokenizer file: one JSON document.

    {"format": "fastlm.tokenizer", "version": 1,
     "pattern": "gpt4",                       # split pattern name: gpt2 | gpt4 | none
     "tokens": ["AA==", "AQ==", ...],         # base64 bytes of every id, in id order ("" = unused)
     "special_tokens": {"<|endoftext|>": 32767},
     "merges": [[101, 32], ...] | null,       # learned (left, right) pairs, in order, if known
     "hash": "bpe-..."}                       # Tokenizer.hash(), checked on load

Written to a temporary file and renamed, so a crash never leaves half a file under the real name.
Any problem on load raises TokenizerFileError (a ValueError) saying what is wrong and where.
"""
import base64
import binascii
import json
import os

FORMAT = "fastlm.tokenizer"
VERSION = 1


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read: the message names the file and the problem."""


def save_json(tok, path):
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "pattern": tok.pattern,
        "tokens": [base64.b64encode(t).decode("ascii") for t in tok.tokens],
        "special_tokens": tok.special_tokens,
        "merges": [list(m) for m in tok.merges] if tok.merges is not None else None,
        "hash": tok.hash(),
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)


def load_json(cls, path):
    path = os.fspath(path)

    def fail(msg):
        raise TokenizerFileError(f"tokenizer file {path}: {msg}")

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} does not exist") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"not valid JSON ({e}); the file is truncated or corrupt"
             + (" (it is empty)" if not raw.strip() else ""))
    if not isinstance(doc, dict):
        fail("expected a JSON object at the top level")
    if doc.get("format") != FORMAT:
        if "model" in doc and "added_tokens" in doc:
            fail("this is a Hugging Face tokenizer.json; read it with Tokenizer.load_hf")
        fail(f"'format' is {doc.get('format')!r}, expected {FORMAT!r} (not a fastlm tokenizer)")
    if doc.get("version") != VERSION:
        fail(f"version {doc.get('version')!r} is not supported (this fastlm reads {VERSION})")
    for key, kind in (("pattern", str), ("tokens", list), ("special_tokens", dict)):
        if not isinstance(doc.get(key), kind):
            fail(f"missing or malformed {key!r} (expected a JSON {kind.__name__})")
    tokens = []
    for i, t in enumerate(doc["tokens"]):
        if not isinstance(t, str):
            fail(f"tokens[{i}] is not a base64 string")
        try:
            tokens.append(base64.b64decode(t, validate=True))
        except (binascii.Error, ValueError):
            fail(f"tokens[{i}] = {t[:40]!r} is not valid base64")
    merges = doc.get("merges")
    if merges is not None:
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m)
                for m in merges):
            fail("'merges' must be a list of [left_id, right_id] pairs")
        for k, (a, b) in enumerate(merges):
            if not (0 <= a < len(tokens) and 0 <= b < len(tokens)):
                fail(f"merges[{k}] = {[a, b]} refers to an id outside the vocabulary")
    try:
        tok = cls(tokens, doc["special_tokens"], pattern=doc["pattern"], merges=merges)
    except (ValueError, TypeError) as e:
        fail(str(e))
    if "hash" in doc and doc["hash"] != tok.hash():
        fail(f"content hash {tok.hash()} does not match the recorded {doc['hash']} "
             "(the file was modified or damaged)")
    return tok
