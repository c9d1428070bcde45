"""Pure-Python reference BPE: training and encoding written for clarity, not speed.

It is the oracle the native tokenizer (fastlm._bpe) is tested against, rule for rule:
  * split: special tokens first (leftmost, then longest), then the split pattern via the `regex`
    module; with pattern "none" training counts lines and encoding takes the text whole;
  * train: words are the distinct pieces as token ids (byte b is token b); each step recounts all
    adjacent pairs (a pair's count is the sum of its words' counts times its occurrences, overlaps
    included), merges the most frequent pair, ties to the smallest (left id, right id), left to
    right inside each word. If the merged bytes already are a token, that id is reused and no token
    is added;
  * encode (tiktoken's rule): a piece that is a whole token is that token; otherwise, starting from
    bytes, repeatedly merge the adjacent pair whose concatenation is the token with the lowest id
    (the leftmost such pair on ties), until no adjacent pair forms a token.
Raw bytes that are not UTF-8 are handled as Python's "surrogateescape" error handler does: each bad
byte is one character that is neither letter, number nor space, which is what the native splitter
does too.
"""
from collections import Counter
from itertools import pairwise

from fastlm.tokenizer import patterns


def _regex_module():
    try:
        import regex
    except ImportError as e:  # pragma: no cover - regex comes with tiktoken / the test extras
        raise ImportError("the reference tokenizer needs the `regex` package: pip install regex") from e
    return regex


def split_specials(text, specials):
    """Split str `text` around the special tokens in `specials`: a list of (is_special, str)."""
    if not specials:
        return [(False, text)] if text else []
    regex = _regex_module()
    rx = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append((False, text[pos:m.start()]))
        out.append((True, m.group()))
        pos = m.end()
    if pos < len(text):
        out.append((False, text[pos:]))
    return out


def split(text, pattern):
    """The pieces (str) of `text` under `pattern` (no special-token handling)."""
    patterns.check(pattern)
    if not text:
        return []
    if pattern == "none":
        return [text]
    return _regex_module().findall(patterns.REGEXES[pattern], text)


def _as_str(data):
    """bytes -> str losslessly (bad UTF-8 bytes become lone surrogates); str is returned as is."""
    return data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data


def _as_bytes(text):
    return text.encode("utf-8", "surrogateescape")


def count_pieces(documents, pattern, special_tokens=()):
    """Counter of the training pieces (bytes) of `documents` (each str or bytes)."""
    patterns.check(pattern)
    counts = Counter()
    for doc in documents:
        for is_special, part in split_specials(_as_str(doc), list(special_tokens)):
            if is_special:
                continue
            pieces = _lines(part) if pattern == "none" else split(part, pattern)
            counts.update(_as_bytes(p) for p in pieces)
    return counts


def _lines(text):
    """Lines of `text`, each including its trailing '\\n' (the last one may lack it)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def train(counts, n_new_tokens):
    """Learn merges from piece counts {bytes: int}: returns (tokens: list[bytes], merges)."""
    tokens = [bytes([b]) for b in range(256)]
    index = {t: i for i, t in enumerate(tokens)}
    words = [[list(piece), c] for piece, c in counts.items() if len(piece) >= 2 and c > 0]
    merges = []
    while len(tokens) < 256 + n_new_tokens:
        pair_counts = Counter()
        for syms, c in words:
            for pair in pairwise(syms):
                pair_counts[pair] += c
        if not pair_counts:
            break
        a, b = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merged = tokens[a] + tokens[b]
        if merged not in index:
            index[merged] = len(tokens)
            tokens.append(merged)
        new = index[merged]
        merges.append((a, b))
        for word in words:
            syms, out, i = word[0], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            word[0] = out
    return tokens, merges


class ReferenceEncoder:
    """Encode/decode with a vocabulary (list of bytes, index = id = rank) the reference way."""

    def __init__(self, tokens, special_tokens, pattern):
        self.tokens = list(tokens)
        self.specials = dict(special_tokens)  # str -> id
        self.pattern = patterns.check(pattern)
        special_ids = set(self.specials.values())
        self.rank = {t: i for i, t in enumerate(self.tokens) if i not in special_ids and t}

    def encode_piece(self, piece):
        if piece in self.rank:
            return [self.rank[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            ranks = [self.rank.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            candidates = [(r, i) for i, r in enumerate(ranks) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.rank[p] for p in parts]

    def encode_ordinary(self, text):
        ids = []
        for piece in split(_as_str(text), self.pattern):
            ids.extend(self.encode_piece(_as_bytes(piece)))
        return ids

    def encode(self, text, allowed_special=()):
        """Encode str `text`; specials in `allowed_special` become their ids (no disallowed check)."""
        ids = []
        for is_special, part in split_specials(text, list(allowed_special)):
            ids.extend([self.specials[part]] if is_special else self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        return b"".join(self.tokens[i] for i in ids)
