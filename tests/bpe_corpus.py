"""Small real corpora for the tokenizer tests: slices of Python's own stdlib sources (present on
every machine, unlike data/ files) plus generated multilingual text with awkward characters."""
import os
import random

STDLIB = os.path.dirname(os.__file__)


def stdlib_text(n_chars, start_file="os.py"):
    """About n_chars characters of stdlib Python source, starting with `start_file`."""
    names = [start_file] + sorted(f for f in os.listdir(STDLIB)
                                  if f.endswith(".py") and f != start_file)
    out, size = [], 0
    for name in names:
        with open(os.path.join(STDLIB, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        out.append(text)
        size += len(text)
        if size >= n_chars:
            break
    return "".join(out)[:n_chars]


WORDS = ["the", "cat", "Über", "naïve", "café", "日本語", "中文", "текст", "λόγος", "مرحبا",
         "😀", "👍🏽", "e\u0301", "  ", "\n", "\r\n", "\t", "123", "٣٤٥", "4.5", "'s", "'LL",
         "don't", "<|x|>", "$", "!!", "...", "\u00a0", "\u3000", "ſ", "\x00", "ﬁ", "Ⅻ"]


def mixed_text(n_words, seed=0):
    """Generated text mixing scripts, emoji, combining marks, digits, odd spaces and NUL."""
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", " ", "\n", ", "])
                   for _ in range(n_words))
