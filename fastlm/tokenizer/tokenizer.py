"""The Tokenizer: a byte-level BPE vocabulary with its split pattern and special tokens.

A token's id is its rank (tiktoken's convention), so encoding is a function of the vocabulary
alone: see fastlm.tokenizer.reference for the exact rules, which the native encoder (fastlm._bpe)
follows and the tests check. Without the native module everything still works through the
reference, slowly, after one warning.
"""
import hashlib
import json
import warnings

from fastlm.tokenizer import patterns
from fastlm.tokenizer.reference import ReferenceEncoder

try:
    from fastlm import _bpe as _native
except ImportError as _e:  # pragma: no cover - exercised only without the build
    _native = None
    _native_error = _e

_warned = False


def _native_module():
    global _warned
    if _native is None and not _warned:
        warnings.warn(f"fastlm._bpe is not built ({_native_error}); the tokenizer runs the slow "
                      "pure-Python reference. Build it: pip install --no-build-isolation -e .")
        _warned = True
    return _native


class Tokenizer:
    """Byte-level BPE. Build one with Tokenizer.train, Tokenizer.load or Tokenizer.byte."""

    def __init__(self, tokens, special_tokens=None, pattern="gpt4", merges=None):
        """tokens: list of bytes, index = id = rank (b"" marks an unused id); special_tokens:
        {text: id} where tokens[id] holds the text's UTF-8; merges: the learned (left, right)
        pairs, kept for the record."""
        self._tokens = [bytes(t) for t in tokens]
        self._pattern = patterns.check(pattern)
        self._specials = dict(special_tokens or {})
        self._merges = [tuple(m) for m in merges] if merges is not None else None
        for text, i in self._specials.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty str")
            if not isinstance(i, int) or not 0 <= i < len(self._tokens):
                raise ValueError(f"special token {text!r} has id {i!r}, outside the vocabulary "
                                 f"of {len(self._tokens)}")
            if self._tokens[i] != text.encode("utf-8"):
                raise ValueError(f"special token {text!r}: tokens[{i}] holds "
                                 f"{self._tokens[i]!r}, not its UTF-8 bytes")
        native = _native_module()
        if native is not None:
            try:
                self._encoder = native.Encoder(self._tokens, sorted(self._specials.values()),
                                               self._pattern)
            except ValueError as e:
                raise ValueError(f"unusable vocabulary: {e}") from None
            self._matchers = {}
        else:
            self._encoder = None
            self._ref = ReferenceEncoder(self._tokens, self._specials, self._pattern)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def byte(cls, special_tokens=()):
        """The 256-token byte tokenizer (id = byte value), special tokens after it."""
        tokens = [bytes([b]) for b in range(256)]
        specials = {}
        for s in special_tokens:
            specials[s] = len(tokens)
            tokens.append(s.encode("utf-8"))
        return cls(tokens, specials, pattern="none", merges=[])

    @classmethod
    def train(cls, inputs, vocab_size=32768, pattern="gpt4", special_tokens=("<|endoftext|>",),
              threads=None, progress=False):
        """Learn a vocabulary of `vocab_size` tokens (256 bytes + merges + special tokens) from
        files, folders, globs or an iterator of str (see fastlm.tokenizer.inputs). threads=None
        uses every core. Special tokens are cut out of the training text and get the last ids."""
        from fastlm.tokenizer import training

        special_tokens = list(special_tokens or ())
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {special_tokens}")
        for s in special_tokens:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r} must be a non-empty str")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 256 + the "
                             f"{len(special_tokens)} special tokens")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} must be a positive int or None (all cores)")
        n_new = vocab_size - 256 - len(special_tokens)
        tokens, merges = training.learn(inputs, n_new, patterns.check(pattern), special_tokens,
                                        threads, progress=progress, native=_native_module())
        if len(tokens) < 256 + n_new:
            warnings.warn(f"the training text ran out of pairs to merge: the vocabulary has "
                          f"{len(tokens) + len(special_tokens)} tokens, not {vocab_size}")
        specials = {}
        for s in special_tokens:
            specials[s] = len(tokens)
            tokens.append(s.encode("utf-8"))
        return cls(tokens, specials, pattern=pattern, merges=merges)

    # ---- properties ------------------------------------------------------------------------
    @property
    def vocab_size(self):
        """Number of ids (regular and special tokens)."""
        return len(self._tokens)

    @property
    def pattern(self):
        return self._pattern

    @property
    def special_tokens(self):
        """{text: id} of the special tokens."""
        return dict(self._specials)

    @property
    def tokens(self):
        """The bytes of every id (a copy)."""
        return list(self._tokens)

    @property
    def merges(self):
        """The learned (left, right) merges in order, or None when unknown (imports)."""
        return None if self._merges is None else list(self._merges)

    def special_token_id(self, text):
        """The id of special token `text` (KeyError naming the known ones otherwise)."""
        try:
            return self._specials[text]
        except KeyError:
            raise KeyError(f"{text!r} is not a special token of this tokenizer; it has: "
                           f"{sorted(self._specials) or 'none'}") from None

    @property
    def eot_id(self):
        """Id of <|endoftext|>, or None when the tokenizer has no such special token."""
        return self._specials.get("<|endoftext|>")

    def token_bytes(self, token_id):
        return self._tokens[token_id]

    def hash(self):
        """A stable fingerprint of what encoding depends on (pattern, token bytes, special
        tokens): 'bpe-' + 16 hex digits of a SHA-256. Equal hashes encode identically."""
        h = hashlib.sha256()
        h.update(json.dumps({"pattern": self._pattern,
                             "special_tokens": sorted(self._specials.items())}).encode())
        for t in self._tokens:
            h.update(len(t).to_bytes(4, "little"))
            h.update(t)
        return "bpe-" + h.hexdigest()[:16]

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, pattern={self._pattern!r}, "
                f"special_tokens={len(self._specials)}, hash={self.hash()!r})")

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.hash() == other.hash()

    def __hash__(self):
        return hash(self.hash())

    # ---- encoding --------------------------------------------------------------------------
    def _special_set(self, spec, what):
        if spec == "all":
            return frozenset(self._specials)
        if isinstance(spec, str):
            raise TypeError(f"{what} must be 'all' or a set of special tokens, got the str "
                            f"{spec!r} (wrap one token in a set: {{{spec!r}}})")
        spec = frozenset(spec)
        unknown = spec - set(self._specials)
        if unknown:
            raise ValueError(f"{what} names {sorted(unknown)}, which are not special tokens of "
                             f"this tokenizer (it has: {sorted(self._specials) or 'none'})")
        return spec

    def _matcher(self, names):
        m = self._matchers.get(names)
        if m is None:
            m = self._encoder.matcher(sorted(self._specials[n] for n in names))
            self._matchers[names] = m
        return m

    def _matchers_for(self, allowed_special, disallowed_special):
        allowed = self._special_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = frozenset(self._specials) - allowed
        else:
            disallowed = self._special_set(disallowed_special, "disallowed_special")
        return allowed, disallowed

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """Token ids of str `text`. As in tiktoken: special tokens in `allowed_special` ('all' or
        a set of their texts) become their ids; finding one in `disallowed_special` (by default
        every special token not allowed) raises ValueError; any other is encoded as plain text.
        A lone surrogate (not a character; no UTF-8 for it) raises ValueError."""
        allowed, disallowed = self._matchers_for(allowed_special, disallowed_special)
        if self._encoder is None:
            return self._reference_encode(text, allowed, disallowed)
        if not allowed and not disallowed:
            return self._encoder.encode_ordinary(text)
        return self._encoder.encode(text, self._matcher(allowed), self._matcher(disallowed))

    def encode_ordinary(self, text):
        """Token ids of `text` with no special-token handling at all."""
        if self._encoder is None:
            return self._ref.encode_ordinary(_check_text(text))
        return self._encoder.encode_ordinary(text)

    def encode_bytes(self, data):
        """Token ids of raw bytes (valid UTF-8 or not), as plain text: for byte-exact pipelines."""
        if self._encoder is None:
            return self._ref.encode_ordinary(bytes(data))
        return self._encoder.encode_bytes(bytes(data))

    def encode_batch(self, texts, threads=None, allowed_special=frozenset(),
                     disallowed_special="all"):
        """encode() of each str in `texts`, on `threads` threads (None: every core) with the
        GIL released."""
        texts = list(texts)
        allowed, disallowed = self._matchers_for(allowed_special, disallowed_special)
        if self._encoder is None:
            return [self._reference_encode(t, allowed, disallowed) for t in texts]
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads={threads!r} must be a positive int or None (all cores)")
        return self._encoder.encode_batch(texts, self._matcher(allowed),
                                          self._matcher(disallowed), threads or 0)

    def encode_with_offsets(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """(ids, offsets): offsets[i] is the index in `text` of the first character token i
        covers (a token starting inside a multi-byte character points at that character)."""
        ids = self.encode(text, allowed_special, disallowed_special)
        offsets, chars = [], 0  # chars: characters started by the tokens so far
        for i in ids:
            t = self._tokens[i]
            offsets.append(max(0, chars - (1 if t and 0x80 <= t[0] < 0xC0 else 0)))
            chars += sum(1 for b in t if not 0x80 <= b < 0xC0)
        return ids, offsets

    def _reference_encode(self, text, allowed, disallowed):
        _check_text(text)
        for s in disallowed:
            if s in text:
                raise ValueError(f"the text contains the special token {s!r}, which is not "
                                 f"allowed: pass allowed_special={{{s!r}}} (or 'all') to encode "
                                 "it as a special token, or disallowed_special=() to encode it "
                                 "as plain text")
        return self._ref.encode(text, allowed)

    # ---- decoding --------------------------------------------------------------------------
    def decode_bytes(self, ids):
        """The bytes of `ids` concatenated (exact: encode then decode_bytes gives the UTF-8)."""
        if self._encoder is None:
            try:
                return self._ref.decode_bytes(ids)
            except IndexError:
                raise ValueError("a token id is outside the vocabulary") from None
        try:
            return self._encoder.decode_bytes(ids)
        except IndexError as e:
            raise ValueError(str(e)) from None
        except TypeError:  # the native decoder's word for an int past 64 bits: name the id
            bad = next((i for i in ids if isinstance(i, int) and not -2**63 <= i < 2**63), None)
            if bad is None:
                raise
            raise ValueError(f"token id {bad} is not in the vocabulary (size "
                             f"{self.vocab_size})") from None

    def decode(self, ids, errors="replace"):
        """The text of `ids`. Token boundaries can split a character, so a slice of ids may not
        be valid UTF-8: errors='replace' (default) puts U+FFFD there, 'strict' raises."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def decode_batch(self, batch, errors="replace"):
        return [self.decode(ids, errors) for ids in batch]

    # ---- files -----------------------------------------------------------------------------
    def save(self, path):
        """Write the tokenizer as one JSON file (see fastlm.tokenizer.formats)."""
        from fastlm.tokenizer import formats
        formats.save_json(self, path)

    @classmethod
    def load(cls, path):
        """Read a file written by save() (ValueError naming the problem if it is corrupt)."""
        from fastlm.tokenizer import formats
        return formats.load_json(cls, path)

    def to_tiktoken(self, name=None):
        """A tiktoken.Encoding with the same ids (needs `pip install tiktoken`)."""
        from fastlm.tokenizer import exports
        return exports.to_tiktoken(self, name)

    @classmethod
    def from_tiktoken(cls, encoding):
        """A Tokenizer from a tiktoken.Encoding whose split pattern is GPT-2's or GPT-4's."""
        from fastlm.tokenizer import exports
        return exports.from_tiktoken(cls, encoding)

    def save_tiktoken(self, path):
        """Write tiktoken's ranks format (base64 token, space, rank per line; a folder path gets
        path/tokenizer.tiktoken) and the split pattern and special tokens in a JSON beside it;
        returns the ranks file's path."""
        from fastlm.tokenizer import exports
        return exports.save_tiktoken_ranks(self, path)

    @classmethod
    def load_tiktoken(cls, path, pattern=None, special_tokens=None):
        """Read a ranks file; the pattern and special tokens come from the JSON save_tiktoken
        writes beside it (an argument that disagrees is an error), else from the arguments
        (pattern default gpt4)."""
        from fastlm.tokenizer import exports
        return exports.load_tiktoken_ranks(cls, path, pattern, special_tokens)

    def save_hf(self, path):
        """Write a Hugging Face tokenizer.json (a folder path gets path/tokenizer.json)."""
        from fastlm.tokenizer import exports
        return exports.save_hf(self, path)

    @classmethod
    def load_hf(cls, path):
        """Read a Hugging Face byte-level BPE tokenizer.json (file or folder holding one)."""
        from fastlm.tokenizer import exports
        return exports.load_hf(cls, path)


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text contains a lone surrogate U+{ord(text[e.start]):04X} at index "
                         f"{e.start}; it cannot be encoded as UTF-8") from None
    return text

