"""The pre-tokenization ("split") patterns, by name.

The native splitter implements these regular expressions by hand (csrc/bpe/bpe_split.cpp); the
pure-Python reference runs them through the `regex` module, and exports hand them to tiktoken and
Hugging Face tokenizers. "none" means no pre-tokenization: text between special tokens is one piece
(when training, one line; see fastlm.tokenizer.reference.train).
"""

# GPT-2's pattern in tiktoken's equivalent, faster form (r50k_base).
GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's pattern (tiktoken's cl100k_base).
GPT4 = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

REGEXES = {"gpt2": GPT2, "gpt4": GPT4, "none": None}
NAMES = tuple(REGEXES)

# Hugging Face tokenizers runs Oniguruma, where "{1,3}+" is not possessive but "({1,3})+", i.e.
# any number of digits. The possessive form is not needed there (nothing after it in that
# alternative could make it give digits back), so exports to HF drop the "+".
HF_REGEXES = {name: rx.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}") if rx else rx
              for name, rx in REGEXES.items()}


def check(name):
    """Return `name` if it is a known pattern name, else raise ValueError listing the choices."""
    if name not in REGEXES:
        raise ValueError(f"unknown split pattern {name!r}: expected one of {', '.join(NAMES)}")
    return name


def name_of_regex(regex):
    """The pattern name whose regex is `regex` (as written by an export), or None."""
    for name in NAMES:
        if regex is not None and regex in (REGEXES[name], HF_REGEXES[name]):
            return name
    return None
