"""python -m fastlm.data prepare INPUT... --out DIR [options] | inspect DIR

prepare: collect, clean, dedup, tokenize and shard INPUTs into DIR (manifest.json + shards) and
print the cleaning report. inspect: counts per split, every shard checked against its header and
its manifest checksum, the token range checked against the vocab, and a decoded sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fastlm.command import run_command
from fastlm.data.clean import CleanConfig
from fastlm.data.dedup import DedupConfig
from fastlm.data.encoders import ByteEncoder, load_encoder
from fastlm.data.loader import ShardDataset
from fastlm.data.manifest import MANIFEST_NAME, load_manifest, verify_shards
from fastlm.data.pipeline import format_report, prepare
from fastlm.data.sources import SourceOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="raw text -> token shards + manifest.json")
    pp.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="files, folders, globs (.txt .md source .jsonl .parquet .html .warc .wet, "
                         "optionally .gz/.zst) or hf:NAME[:CONFIG][@SPLIT]")
    pp.add_argument("--out", required=True, help="output folder")
    pp.add_argument("--tokenizer", default="byte", help="'byte' (default) or a fastlm tokenizer file")
    pp.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    pp.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    pp.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for val")
    pp.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/hf records")
    pp.add_argument("--no-html-extract", action="store_true",
                    help="keep raw HTML instead of extracting the main text (trafilatura)")
    pp.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    c = pp.add_argument_group("cleaning (each step optional; counts are reported)")
    c.add_argument("--invalid-utf8", choices=("replace", "drop"), default="replace")
    c.add_argument("--no-nfc", action="store_true", help="skip Unicode NFC normalisation")
    c.add_argument("--no-controls", action="store_true", help="keep control characters and NUL")
    c.add_argument("--no-whitespace", action="store_true", help="skip whitespace normalisation")
    c.add_argument("--lowercase", action="store_true")
    c.add_argument("--pii", action="store_true",
                   help="replace emails, phone numbers and IPs by <EMAIL>, <PHONE>, <IP>")
    c.add_argument("--min-chars", type=int, default=1)
    c.add_argument("--max-chars", type=int, default=None)
    c.add_argument("--max-symbol-ratio", type=float, default=None,
                   help="drop docs with more symbols per alphanumeric char (e.g. 0.5)")
    c.add_argument("--max-repeated-lines", type=float, default=None,
                   help="drop docs whose fraction of repeated lines exceeds this (e.g. 0.3)")
    c.add_argument("--lang", default="", help="comma-separated ISO codes to keep (needs py3langid)")
    c.add_argument("--min-lang-score", type=float, default=0.5)
    d = pp.add_argument_group("deduplication")
    d.add_argument("--no-exact-dedup", action="store_true")
    d.add_argument("--no-near-dedup", action="store_true")
    d.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="Jaccard similarity of word 5-gram sets counted as near-duplicate")
    d.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    d.add_argument("--ngram", type=int, default=5, help="words per shingle")

    ip = sub.add_parser("inspect", help="counts, checksums and a decoded sample of a data folder")
    ip.add_argument("dir", help="prepared folder, its manifest.json, or a folder of llm.c shards")
    ip.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    ip.add_argument("--sample-tokens", type=int, default=200)
    return p


def _prepare(args) -> int:
    clean = CleanConfig(
        invalid_utf8=args.invalid_utf8, nfc=not args.no_nfc, controls=not args.no_controls,
        whitespace=not args.no_whitespace, lowercase=args.lowercase, pii=args.pii,
        min_chars=args.min_chars, max_chars=args.max_chars,
        max_symbol_ratio=args.max_symbol_ratio, max_repeated_line_frac=args.max_repeated_lines,
        languages=tuple(x.strip() for x in args.lang.split(",") if x.strip()),
        min_language_score=args.min_lang_score)
    dedup = DedupConfig(exact=not args.no_exact_dedup, near=not args.no_near_dedup,
                        threshold=args.near_dup_threshold, num_perm=args.num_perm, ngram=args.ngram)
    sources = SourceOptions(text_field=args.text_field, extract_html=not args.no_html_extract)
    manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, workers=args.workers,
                       clean=clean, dedup=dedup, sources=sources, shard_tokens=args.shard_tokens,
                       val_fraction=args.val_fraction, progress=not args.quiet,
                       overwrite=args.overwrite)
    print(format_report(manifest))
    print(f"wrote {Path(args.out) / MANIFEST_NAME}")
    return 0


def _inspect(args) -> int:
    path = Path(args.dir)
    has_manifest = path.name == MANIFEST_NAME or (path / MANIFEST_NAME).exists()
    encoder = None
    if has_manifest:
        m = load_manifest(path)
        tok = m["tokenizer"]
        print(f"tokenizer   {tok['name']} (vocab {tok['vocab_size']}, eot {tok['eot_id']}, "
              f"hash {tok['hash'][:16]}...)  dtype {m['dtype']}  shard_tokens {m['shard_tokens']:,}")
        root = path.parent if path.name == MANIFEST_NAME else path
        problems = verify_shards(m, root, checksums=not args.no_verify)
        n_shards = sum(len(s["shards"]) for s in m["splits"].values())
        what = "headers and sizes" if args.no_verify else "headers, sizes and sha256"
        if problems:
            print("\n".join(f"BAD  {p}" for p in problems))
            print(f"{len(problems)} of {n_shards} shards failed the check ({what})")
            return 1
        print(f"shards      {n_shards} ok ({what} checked)")
        if tok["name"] == "byte":
            encoder = ByteEncoder()
        elif tok.get("path") and Path(tok["path"]).is_file():
            encoder = load_encoder(tok["path"])
            if encoder.hash != tok["hash"]:
                print(f"note: {tok['path']} changed since prepare; showing token ids")
                encoder = None
        splits = list(m["splits"])
    else:
        splits = ["train", "val"]
    first = None
    for split in splits:
        try:
            ds = ShardDataset(path, split, verify=False)
        except (ValueError, OSError) as exc:
            print(f"{split:<6} -- {exc}")
            continue
        hi = max(int(np.max(s)) for s in ds.shards if s.size)
        docs = ""
        if ds.manifest is not None:
            docs = f", {ds.manifest['splits'][split]['documents']:,} documents"
            if ds.vocab_size is not None and hi >= ds.vocab_size:
                print(f"BAD  {ds.source}: token id {hi} >= vocab size {ds.vocab_size}")
                return 1
        print(f"{split:<6} {ds.num_tokens:>14,} tokens in {len(ds.shards)} shards{docs}; "
              f"max token id {hi}")
        first = first or ds
    if has_manifest:
        print("cleaning report:")
        print("  " + format_report(m).replace("\n", "\n  "))
    if first is not None:
        sample = first.shards[0][:args.sample_tokens].tolist()
        print(f"sample (first {len(sample)} tokens of {first.paths[0].name}):")
        print(encoder.decode(sample) if encoder is not None else sample)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _prepare(args) if args.command == "prepare" else _inspect(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_command(main))
