"""Per-document cleaning: decoding policy, normalisation, PII scrubbing and quality filters.

`clean_document` runs the steps below in this order, each switched by a `CleanConfig` field and
counted in the report dict it is given (so a run says exactly what it changed and dropped):

    decode     invalid UTF-8: "replace" (U+FFFD, counted) or "drop" the document (counted)
    nfc        Unicode NFC, so the same text always has the same code points (and tokens)
    controls   remove C0/C1 control characters, NUL and the BOM; keep \\n and \\t
    whitespace \\r\\n and \\r -> \\n, exotic spaces -> ' ', strip line ends, at most one blank line
               in a row, no leading blank lines or trailing whitespace (indentation is kept: code)
    lowercase  optional, off by default
    pii        emails -> <EMAIL>, IP addresses -> <IP>, phone numbers -> <PHONE> (off by default)
    filters    empty, min/max chars, symbol-to-alphanumeric ratio, repeated-line fraction,
               language (py3langid, when `languages` is set)

Document-level deduplication (exact and near) is not here: it needs state across documents and
lives in dedup.py.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_BLANKS = re.compile(r"\n{3,}")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)")
# Full 8-group form, or "::"-compressed with at least two groups before the "::" (shorter forms
# such as fe80::1 are not caught: they collide with C++ names like a::b).
_H = "[0-9A-Fa-f]{1,4}"
IPV6 = re.compile(rf"(?<![0-9A-Fa-f:])(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{2,6}}:(?:{_H}(?::{_H})*)?)"
                  rf"(?![0-9A-Fa-f:])")
# Separators are required between digit groups so that ids, hashes and long numbers are left alone.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]\d{3,4}(?![\w])")
_NOT_ALNUM = re.compile(r"[\W_]+")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CleanConfig:
    """Which cleaning steps run, and their thresholds (None disables a filter)."""

    invalid_utf8: str = "replace"  # "replace" | "drop"
    nfc: bool = True
    controls: bool = True
    whitespace: bool = True
    lowercase: bool = False
    pii: bool = False
    min_chars: int = 1
    max_chars: int | None = None
    max_symbol_ratio: float | None = None  # non-alnum, non-space chars per alphanumeric char
    max_repeated_line_frac: float | None = None  # fraction of non-empty lines seen before in the doc
    languages: tuple[str, ...] = field(default_factory=tuple)  # ISO 639-1 codes kept, () = all
    min_language_score: float = 0.5

    def __post_init__(self):
        if self.invalid_utf8 not in ("replace", "drop"):
            raise ValueError(f"invalid_utf8 must be 'replace' or 'drop', got {self.invalid_utf8!r}")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise ValueError(f"need 0 <= min_chars <= max_chars, got {self.min_chars}, "
                             f"{self.max_chars}")
        for name in ("max_symbol_ratio", "max_repeated_line_frac"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


def _bump(report: dict[str, int], key: str, n: int = 1) -> None:
    report[key] = report.get(key, 0) + n


def decode(payload: bytes | str, policy: str, report: dict[str, int]) -> str | None:
    """Text of a raw document under the invalid-UTF-8 policy; None when it is dropped."""
    if isinstance(payload, str):
        try:
            payload.encode("utf-8")  # lone surrogates (e.g. from JSON "\ud800") are invalid too
            return payload
        except UnicodeEncodeError:
            payload = payload.encode("utf-8", "surrogatepass")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        if policy == "drop":
            _bump(report, "dropped_invalid_utf8")
            return None
        _bump(report, "invalid_utf8_replaced")
        return payload.decode("utf-8", "replace")


def symbol_ratio(text: str) -> float:
    """Non-alphanumeric, non-space characters per alphanumeric character (inf if none)."""
    alnum = len(_NOT_ALNUM.sub("", text))
    spaces = len(text) - len(_WHITESPACE.sub("", text))
    symbols = len(text) - alnum - spaces
    return symbols / alnum if alnum else float("inf")


def repeated_line_frac(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def scrub_pii(text: str, report: dict[str, int]) -> str:
    text, n = EMAIL.subn("<EMAIL>", text)
    _bump(report, "pii_emails", n)
    text, n4 = IPV4.subn("<IP>", text)
    text, n6 = IPV6.subn("<IP>", text)
    _bump(report, "pii_ips", n4 + n6)
    text, n = PHONE.subn("<PHONE>", text)
    _bump(report, "pii_phones", n)
    return text


def normalize_whitespace(text: str) -> str:
    # Each step is skipped when a cheap test shows it has nothing to do: regex passes over every
    # space of indented code were the slowest part of cleaning.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\t\n" in text:
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANKS.sub("\n\n", text)
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


def _language_ok(text: str, cfg: CleanConfig) -> bool:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise RuntimeError("language filtering needs the optional package 'py3langid': "
                           "pip install py3langid") from exc
    global _LANGID
    if _LANGID is None:
        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, score = _LANGID.classify(text[:4000])
    return lang in cfg.languages and score >= cfg.min_language_score


_LANGID = None


def clean_document(payload: bytes | str, cfg: CleanConfig, report: dict[str, int]) -> str | None:
    """The cleaned text of one document, or None if a filter drops it (the reason is counted)."""
    _bump(report, "documents_in")
    text = decode(payload, cfg.invalid_utf8, report)
    if text is None:
        return None
    _bump(report, "chars_in", len(text))
    if cfg.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        _bump(report, "nfc_changed")
    if cfg.controls:
        text, n = _CONTROLS.subn("", text)
        if n:
            _bump(report, "control_chars_removed", n)
    if cfg.whitespace:
        normalized = normalize_whitespace(text)
        if normalized != text.rstrip():  # a dropped final newline alone is not worth counting
            _bump(report, "whitespace_changed")
        text = normalized
    if cfg.lowercase:
        text = text.lower()
    if cfg.pii:
        text = scrub_pii(text, report)
    reason = None
    if not text.strip():
        reason = "dropped_empty"
    elif len(text) < cfg.min_chars:
        reason = "dropped_too_short"
    elif cfg.max_chars is not None and len(text) > cfg.max_chars:
        reason = "dropped_too_long"
    elif cfg.max_symbol_ratio is not None and symbol_ratio(text) > cfg.max_symbol_ratio:
        reason = "dropped_symbol_ratio"
    elif (cfg.max_repeated_line_frac is not None
          and repeated_line_frac(text) > cfg.max_repeated_line_frac):
        reason = "dropped_repeated_lines"
    elif cfg.languages and not _language_ok(text, cfg):
        reason = "dropped_language"
    if reason:
        _bump(report, reason)
        return None
    return text
