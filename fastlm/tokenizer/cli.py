"""Command line: python -m fastlm.tokenizer {train,encode,decode,info,export,import}.

    python -m fastlm.tokenizer train --input data/ --vocab-size 32768 --out tok.json
    python -m fastlm.tokenizer encode --tokenizer tok.json --text "hello world"
    echo 15339 1917 | python -m fastlm.tokenizer decode --tokenizer tok.json
    python -m fastlm.tokenizer info --tokenizer tok.json
    python -m fastlm.tokenizer export --tokenizer tok.json --format hf --out hf_tok/
    python -m fastlm.tokenizer export --tokenizer tok.json --format tiktoken --out tt/
    python -m fastlm.tokenizer import --format tiktoken --input tt/tokenizer.tiktoken --out tok.json
"""
import argparse
import json
import sys
import time

from fastlm.tokenizer import exports, patterns
from fastlm.tokenizer.tokenizer import Tokenizer


def _parser():
    p = argparse.ArgumentParser(prog="python -m fastlm.tokenizer",
                                description="Train, use and convert fastlm BPE tokenizers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="learn a BPE vocabulary from text files")
    t.add_argument("--input", nargs="+", required=True,
                   help="files, folders (read recursively) or globs")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="total tokens: 256 bytes + merges + special tokens")
    t.add_argument("--out", required=True, help="tokenizer JSON to write")
    t.add_argument("--pattern", default="gpt4", choices=patterns.NAMES)
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"],
                   help="special tokens (default: <|endoftext|>; give none for no specials)")
    t.add_argument("--threads", type=int, default=None, help="default: every core")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("encode", help="print the token ids of text")
    e.add_argument("--tokenizer", required=True)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--input", help="a UTF-8 text file ('-' for stdin)")
    e.add_argument("--allow-special", action="store_true",
                   help="encode special tokens in the text as their ids (default: an error)")
    e.add_argument("--json", action="store_true", help="print a JSON list")

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--tokenizer", required=True)
    d.add_argument("ids", nargs="*", type=int, help="ids (default: read from stdin)")

    i = sub.add_parser("info", help="describe a tokenizer")
    i.add_argument("--tokenizer", required=True)

    x = sub.add_parser("export", help="write the tokenizer in another library's format")
    x.add_argument("--tokenizer", required=True)
    x.add_argument("--format", required=True, choices=["tiktoken", "hf"])
    x.add_argument("--out", required=True,
                   help="a directory (existing, ending with '/' or without a suffix: made if new; "
                        "gets tokenizer.json + tokenizer_config.json, or tokenizer.tiktoken + "
                        "tokenizer.tiktoken.json) or a file name (the config/JSON goes beside it)")

    m = sub.add_parser("import", help="convert a tiktoken ranks file or HF tokenizer.json")
    m.add_argument("--format", required=True, choices=["tiktoken", "hf"])
    m.add_argument("--input", required=True)
    m.add_argument("--pattern", default=None, choices=["gpt2", "gpt4"],
                   help="tiktoken: the split pattern, when no <ranks>.json written by the export "
                        "records it (default gpt4)")
    m.add_argument("--out", required=True)
    return p


def _read(path):
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _train(a):
    t0 = time.perf_counter()
    tok = Tokenizer.train(a.input, vocab_size=a.vocab_size, pattern=a.pattern,
                          special_tokens=a.special, threads=a.threads,
                          progress=not a.no_progress)
    tok.save(a.out)
    print(f"wrote {a.out}: {tok} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def _info(tok):
    longest = sorted(range(tok.vocab_size), key=lambda i: -len(tok.token_bytes(i)))[:5]
    return {
        "vocab_size": tok.vocab_size,
        "pattern": tok.pattern,
        "special_tokens": tok.special_tokens,
        "merges": None if tok.merges is None else len(tok.merges),
        "hash": tok.hash(),
        "longest_tokens": [tok.token_bytes(i).decode("utf-8", "replace") for i in longest],
    }


def main(argv=None):
    a = _parser().parse_args(argv)
    try:
        if a.command == "train":
            _train(a)
        elif a.command == "encode":
            tok = Tokenizer.load(a.tokenizer)
            text = a.text if a.text is not None else _read(a.input)
            ids = tok.encode(text, allowed_special="all" if a.allow_special else frozenset())
            print(json.dumps(ids) if a.json else " ".join(map(str, ids)))
        elif a.command == "decode":
            tok = Tokenizer.load(a.tokenizer)
            ids = a.ids or [int(x) for x in sys.stdin.read().replace(",", " ").strip("[] \n").split()]
            sys.stdout.write(tok.decode(ids))
        elif a.command == "info":
            print(json.dumps(_info(Tokenizer.load(a.tokenizer)), indent=2, ensure_ascii=False))
        elif a.command == "export":
            tok = Tokenizer.load(a.tokenizer)
            if a.format == "hf":
                path = exports.save_hf_dir(tok, a.out)
                print(f"wrote {path} and tokenizer_config.json beside it", file=sys.stderr)
            else:
                path = tok.save_tiktoken(a.out)
                print(f"wrote {path} (tiktoken ranks) and {exports.tiktoken_meta_path(path)} "
                      f"(split pattern {tok.pattern}, special tokens)", file=sys.stderr)
        elif a.command == "import":
            if a.format == "hf":
                tok = Tokenizer.load_hf(a.input)
            else:
                tok = Tokenizer.load_tiktoken(a.input, pattern=a.pattern)
            tok.save(a.out)
            print(f"wrote {a.out}: {tok}", file=sys.stderr)
    except (ValueError, TypeError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
