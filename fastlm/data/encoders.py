"""The tokenizers `prepare` can shard with, behind one small interface.

"byte": every UTF-8 byte is its own token (0..255) and the end-of-text token is 256, so the vocab is
257 and shards are uint16. Each document is *preceded* by the end-of-text token (the llm.c /
modded-nanogpt convention): a window that starts after an EOT starts a document, and a model learns
to begin text after EOT.

A path: a trained fastlm tokenizer file, loaded with `fastlm.tokenizer.Tokenizer.load(path)`; its
end-of-text token is the special token "<|endoftext|>". The tokenizer's identity in the manifest is
the sha256 of that file, so shards can be checked against the tokenizer a run trains with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

EOT_TEXT = "<|endoftext|>"
BYTE_VOCAB = 257
BYTE_EOT = 256
_BYTE_HASH = hashlib.sha256(b"fastlm byte tokenizer: ids 0-255 are bytes, 256 is end-of-text")\
    .hexdigest()


class Encoder(Protocol):
    name: str
    hash: str
    vocab_size: int
    eot_id: int

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteEncoder:
    name = "byte"
    hash = _BYTE_HASH
    vocab_size = BYTE_VOCAB
    eot_id = BYTE_EOT

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            ids = np.empty(len(text.encode("utf-8")) + 1, dtype=np.uint16)  # EOT + bytes
            ids[0] = BYTE_EOT
            ids[1:] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if i == BYTE_EOT:
                parts.append(run.decode("utf-8", "replace"))
                parts.append(EOT_TEXT)
                run = bytearray()
            else:
                run.append(i)
        parts.append(run.decode("utf-8", "replace"))
        return "".join(parts)


class FastlmEncoder:
    """A trained fastlm tokenizer file (see module docstring)."""

    def __init__(self, path: str):
        from fastlm.tokenizer import Tokenizer  # imported here: optional for byte-level data

        self.path = Path(path)
        self.tok = Tokenizer.load(str(path))
        self.name = self.path.name
        self.hash = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.vocab_size = int(self.tok.vocab_size)
        ids = self.tok.encode(EOT_TEXT, allowed_special={EOT_TEXT}) \
            if _accepts_allowed_special(self.tok) else None
        if not ids or len(ids) != 1:
            raise ValueError(f"{path}: the tokenizer has no {EOT_TEXT!r} special token, which "
                             f"prepare puts between documents; train it with that special token")
        self.eot_id = int(ids[0])
        self.dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        batch = self.tok.encode_batch(texts)
        out = []
        for ids in batch:
            arr = np.empty(len(ids) + 1, dtype=self.dtype)
            arr[0] = self.eot_id
            arr[1:] = ids
            out.append(arr)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


def _accepts_allowed_special(tok) -> bool:
    import inspect

    try:
        return "allowed_special" in inspect.signature(tok.encode).parameters
    except (TypeError, ValueError):
        return False


def load_encoder(spec: str) -> Encoder:
    """"byte" or the path of a trained fastlm tokenizer file."""
    if spec == "byte":
        return ByteEncoder()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--tokenizer {spec}: not 'byte' and no such tokenizer file")
    return FastlmEncoder(spec)
