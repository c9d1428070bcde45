"""Tokenizer benchmark: BPE training and encode/decode throughput against the peers.

    python -m fastlm.bench --ops bpe [--sizes small|medium|large]
    python -m fastlm.bench.bench_bpe [--sizes small] [--repeats 3] [--kinds train,encode]
                                     [--json PATH]

Corpus: this interpreter's standard-library sources (fastlm.data.text.stdlib_files), real text on
any machine: small = 4 MB of files in hash order, medium = 12 MB, large = all of it.

Training (rows kind=train): fastlm vs Hugging Face tokenizers' BpeTrainer (same GPT-4 split
regex, byte-level) and sentencepiece (model_type=bpe, byte_fallback; it splits on whitespace and
learns characters, so it is the nearest peer, not an identical task), at 4k and 32k vocab, on 1
thread and on every core. Each run is a fresh child process, reading the files itself; the row
has the median wall time of --repeats runs and the peak RSS the training added to the process
(VmHWM after, reset just before, minus RSS before), so interpreter and import sizes do not count.

Encode/decode (kind=encode/decode), on two corpora, GPT-4 split:
  prose  English prose the vocabulary never saw: the docstrings (200+ characters) of the stdlib,
         split by file (bench_bpe.prose_texts); a 16k vocabulary is trained on one half and the
         other half (~0.6 MB) is encoded;
  code   the stdlib sources above, with a 32k vocabulary trained on them.
Each vocabulary is exported to tiktoken (the same ranks: an equal-vocabulary comparison) and to a
HF tokenizer.json; all three must produce identical ids on the whole corpus (checked, or the run
fails). MB/s is UTF-8 input bytes (encode) or output bytes (decode) per second: "single" is one
call on the corpus as one string, "batch" one call on the list of documents. Each thread count
(1, 2 and every core) runs in its own child process (HF's thread pool is sized by
RAYON_NUM_THREADS), where all providers are timed interleaved, round after round (medians of
wall and of CPU time; on a shared machine CPU time is the fairer one-thread measure). The child
for 2+ threads also times fastlm's encode_batch on 1 thread in the same rounds: its "vs 1 thread"
column is the thread scaling (tokens/s), measured under the same load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

OP = "bpe"
CORPUS_BYTES = {"small": 4 << 20, "medium": 12 << 20, "large": None}
VOCABS = (4096, 32768)
EOT = "<|endoftext|>"


def corpus(size: str) -> list[str]:
    """Paths of the benchmark corpus (see the module docstring)."""
    from fastlm.data.text import stdlib_files

    root, files = stdlib_files()
    files = sorted(files, key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).digest())
    cap, out, total = CORPUS_BYTES[size], [], 0
    for p in files:
        if cap is not None and total >= cap:
            break
        out.append(str(p))
        total += p.stat().st_size
    return sorted(out)


def read_texts(paths):
    texts = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---- training, one child process per run --------------------------------------------------
def _rss_mb() -> float:
    """Current RSS; first resets the kernel's peak-RSS mark (VmHWM) to it, so that the peak read
    after training is the training's own, not an import's transient."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak may include earlier transients (an overestimate)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_child(spec: dict) -> dict:
    """Runs inside the child: train once, return seconds and the memory the training added."""
    files, vocab, threads, provider = spec["files"], spec["vocab"], spec["threads"], spec["provider"]
    if provider == "fastlm":
        from fastlm.tokenizer import Tokenizer
        before = _rss_mb()
        t0 = time.perf_counter()
        tok = Tokenizer.train(files, vocab_size=vocab, pattern="gpt4", special_tokens=[EOT],
                              threads=threads)
        seconds = time.perf_counter() - t0
        got = tok.vocab_size
    elif provider == "hf-tokenizers":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        from fastlm.tokenizer import patterns
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(patterns.HF_REGEXES["gpt4"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        before = _rss_mb()
        t0 = time.perf_counter()
        hf.train(files, trainer)
        seconds = time.perf_counter() - t0
        got = hf.get_vocab_size()
    elif provider == "sentencepiece":
        import sentencepiece as spm
        with tempfile.TemporaryDirectory() as d:
            before = _rss_mb()
            t0 = time.perf_counter()
            spm.SentencePieceTrainer.train(
                input=",".join(files), model_prefix=os.path.join(d, "m"), vocab_size=vocab,
                model_type="bpe", num_threads=threads, byte_fallback=True, character_coverage=1.0,
                input_sentence_size=0, minloglevel=2)
            seconds = time.perf_counter() - t0
        got = vocab
    else:
        raise ValueError(provider)
    peak = _peak_rss_mb()
    return {"seconds": seconds, "added_rss_mb": max(peak - before, 0.0), "vocab_size": got}


def _child(spec: dict, env_threads: int | None = None) -> dict:
    env = dict(os.environ)
    if env_threads:
        env["RAYON_NUM_THREADS"] = str(env_threads)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, "-m", "fastlm.bench.bench_bpe", "--child", f.name],
                             capture_output=True, text=True, env=env, timeout=1800,
                             check=False)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"bench child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except ImportError:
        return f"{module} is not installed (pip install {module})"


def train_rows(files, corpus_mb, repeats, env) -> list[dict]:
    rows = []
    providers = [("fastlm", None), ("hf-tokenizers", _available("tokenizers")),
                 ("sentencepiece", _available("sentencepiece"))]
    for vocab in VOCABS:
        base = None
        for threads in sorted({1, all_threads()}):
            for provider, missing in providers:
                row = {**env, "op": OP, "kind": "train", "provider": provider, "vocab": vocab,
                       "threads": threads, "corpus_mb": corpus_mb}
                if missing:
                    rows.append({**row, "skipped": missing})
                    continue
                spec = {"files": files, "vocab": vocab, "threads": threads, "provider": provider}
                runs = [_child(spec, threads) for _ in range(repeats)]
                row.update(seconds=statistics.median(r["seconds"] for r in runs),
                           added_rss_mb=statistics.median(r["added_rss_mb"] for r in runs),
                           vocab_size=runs[0]["vocab_size"], runs=repeats)
                if provider == "fastlm":
                    base = row
                elif base is not None:
                    row["fastlm_speedup"] = row["seconds"] / base["seconds"]
                rows.append(row)
                print(f"  train {provider} vocab={vocab} threads={threads}: "
                      f"{row['seconds']:.2f}s +{row['added_rss_mb']:.0f} MB", file=sys.stderr)
    return rows


# ---- encode / decode ----------------------------------------------------------------------
def prose_texts() -> tuple[list[str], list[str]]:
    """(training, held-out) English prose: the docstrings of 200+ characters in this interpreter's
    standard library (fastlm.data.text.stdlib_files), split by file: a file whose path's SHA-256
    starts with a byte < 128 gives held-out text, the others training text."""
    import ast

    from fastlm.data.text import stdlib_files

    root, files = stdlib_files()
    train, held = [], []
    for p in files:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        docs = [d for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef))
                and (d := ast.get_docstring(node)) and len(d) >= 200]
        h = hashlib.sha256(str(p.relative_to(root)).encode()).digest()[0]
        (held if h < 128 else train).extend(docs)
    return train, held


def _interleaved(fns: dict, rounds: int, budget_s: float) -> dict:
    """Seconds per call of each fn, timed in turn round after round (so load drifts hit all
    alike) after one warm-up call each: {name: (median wall seconds, median CPU seconds)}. CPU
    time (of the whole process, every thread) is the fairer measure of one-thread work on a
    shared machine, where wall time includes waiting for a core."""
    for fn in fns.values():
        fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def _encode_child(spec: dict) -> list[dict]:
    """Runs inside the child (RAYON_NUM_THREADS set): every encode/decode row for one corpus and
    one thread count. Providers are timed interleaved (see _interleaved)."""
    from fastlm.tokenizer import Tokenizer

    threads, budget, name = spec["threads"], spec["budget"], spec["corpus"]
    tok = Tokenizer.load(spec["tokenizer"])
    texts = prose_texts()[1] if name == "prose" else read_texts(spec["files"])
    big = "\n\n".join(texts)
    n_bytes = len(big.encode("utf-8"))
    ids = tok.encode_ordinary(big)
    out_bytes = len(tok.decode_bytes(ids))
    fns = {("fastlm", "batch"): lambda: tok.encode_batch(texts, threads=threads,
                                                         disallowed_special=())}
    if threads == 1:
        fns[("fastlm", "single")] = lambda: tok.encode_ordinary(big)
        fns[("fastlm", "decode")] = lambda: tok.decode(ids)
    if spec["tiktoken"]:
        enc = tok.to_tiktoken()
        assert enc.encode_ordinary(big) == ids, "tiktoken ids differ from fastlm's"
        fns[("tiktoken", "batch")] = lambda: enc.encode_ordinary_batch(texts, num_threads=threads)
        if threads == 1:
            fns[("tiktoken", "single")] = lambda: enc.encode_ordinary(big)
            fns[("tiktoken", "decode")] = lambda: enc.decode(ids)
    if spec["hf"]:
        from tokenizers import Tokenizer as HF
        hf = HF.from_file(spec["hf"])
        assert hf.encode(big).ids == ids, "HF tokenizers ids differ from fastlm's"
        fns[("hf-tokenizers", "batch")] = lambda: [e.ids for e in hf.encode_batch(texts)]
        if threads == 1:
            fns[("hf-tokenizers", "single")] = lambda: hf.encode(big).ids
            fns[("hf-tokenizers", "decode")] = lambda: hf.decode(ids)
    if threads > 1:  # thread scaling: fastlm's batch on one thread in the same rounds
        fns[("fastlm", "batch-1t")] = lambda: tok.encode_batch(texts, threads=1,
                                                              disallowed_special=())
    medians = _interleaved(fns, rounds=spec["rounds"], budget_s=budget * len(fns))
    rows = []
    for (provider, mode), (seconds, cpu_seconds) in medians.items():
        size = out_bytes if mode == "decode" else n_bytes
        rows.append({"op": OP, "kind": "decode" if mode == "decode" else "encode",
                     "corpus": name, "provider": provider,
                     "mode": "batch" if mode == "batch-1t" else mode,
                     "threads": 1 if mode == "batch-1t" else threads,
                     "median_ms": seconds * 1e3, "mb_per_s": size / 1e6 / seconds,
                     "cpu_ms": cpu_seconds * 1e3, "cpu_mb_per_s": size / 1e6 / cpu_seconds,
                     "rounds_timed": spec["rounds"],
                     "tokens_per_s": len(ids) / seconds, "corpus_mb": n_bytes / 1e6,
                     "tokens": len(ids), "same_process": threads})
        print(f"  {name} {mode} {provider} threads={threads}: {rows[-1]['mb_per_s']:.1f} MB/s",
              file=sys.stderr)
    return rows


def _vocab_for(corpus_name: str, files) -> tuple[object, str]:
    """The tokenizer each corpus is encoded with: for code, 32k trained on the corpus itself (as
    the training rows do); for prose, 16k trained on the training half of the docstrings only, so
    that the encoded text is held out."""
    from fastlm.tokenizer import Tokenizer

    if corpus_name == "prose":
        train = prose_texts()[0]
        tok = Tokenizer.train(iter(train), vocab_size=16384, pattern="gpt4", special_tokens=[EOT])
        return tok, "held-out stdlib docstrings (English prose)"
    tok = Tokenizer.train(files, vocab_size=32768, pattern="gpt4", special_tokens=[EOT])
    return tok, "stdlib sources (code), vocabulary trained on them"


def encode_rows(files, budget, env, corpora=("prose", "code"), rounds=15) -> list[dict]:
    rows = []
    for name in corpora:
        with tempfile.TemporaryDirectory() as d:
            tok, about = _vocab_for(name, files)
            path = os.path.join(d, "tok.json")
            tok.save(path)
            hf_path = tok.save_hf(os.path.join(d, "tokenizer.json")) if not _available(
                "tokenizers") else None
            for threads in sorted({1, 2, all_threads()}):
                if threads > all_threads():
                    continue
                spec = {"files": files, "corpus": name, "tokenizer": path, "hf": hf_path,
                        "threads": threads, "tiktoken": not _available("tiktoken"),
                        "budget": budget, "rounds": rounds}
                rows += [{**env, **r, "vocab_size": tok.vocab_size, "about": about}
                         for r in _child_rows(spec, threads)]
    base = {(r["corpus"], r["mode"], r["threads"], r["same_process"]): r
            for r in rows if r["provider"] == "fastlm"}
    for r in rows:
        b = base.get((r["corpus"], r["mode"], r["threads"], r["same_process"]))
        if b and r["provider"] != "fastlm":
            r["fastlm_speedup"] = b["mb_per_s"] / r["mb_per_s"]
            r["fastlm_cpu_speedup"] = b["cpu_mb_per_s"] / r["cpu_mb_per_s"]
        one = base.get((r["corpus"], "batch", 1, r["same_process"]))
        if r["provider"] == "fastlm" and r["mode"] == "batch" and r["threads"] > 1 and one:
            r["thread_speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
    return rows


def _child_rows(spec, threads):
    return _child({"encode": spec}, threads)


# ---- entry points -------------------------------------------------------------------------
def run(args) -> list[dict]:
    import torch
    from fastlm.bench import utils
    size = args.sizes if isinstance(args.sizes, str) else "small"
    kinds = getattr(args, "kinds", "train,encode").split(",")
    files = corpus(size)
    corpus_mb = sum(os.path.getsize(p) for p in files) / 1e6
    env = {**utils.environment(torch.device("cpu")), "threads_available": all_threads()}
    print(f"bpe bench: {len(files)} stdlib files, {corpus_mb:.1f} MB", file=sys.stderr)
    rows = train_rows(files, corpus_mb, getattr(args, "repeats", 3), env) if "train" in kinds \
        else []
    if "encode" in kinds:
        rows += encode_rows(files, getattr(args, "budget", 1.0), env)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = []
    train = [r for r in rows if r.get("kind") == "train"]
    if train:
        lines.append("training (GPT-4 split; seconds = median wall time; MB = peak RSS added)")
        lines.append(f"{'vocab':>6} {'threads':>7}  {'provider':<14} {'seconds':>8} "
                     f"{'MB':>7}  {'fastlm faster':>13}")
        for r in train:
            if "skipped" in r:
                lines.append(f"{r['vocab']:>6} {r['threads']:>7}  {r['provider']:<14} skipped: "
                             f"{r['skipped']}")
                continue
            speed = f"{r['fastlm_speedup']:.1f}x" if "fastlm_speedup" in r else ""
            lines.append(f"{r['vocab']:>6} {r['threads']:>7}  {r['provider']:<14} "
                         f"{r['seconds']:>8.2f} {r['added_rss_mb']:>7.0f}  {speed:>13}")
    enc = [r for r in rows if r.get("kind") in ("encode", "decode")]
    if enc:
        lines.append("")
        lines.append("encode/decode (GPT-4 split, identical ids checked; MB/s of UTF-8 text; rows "
                     "with the same 'run' were timed interleaved in one process)")
        lines.append(f"{'corpus':<6} {'vocab':>6} {'run':>3} {'mode':<7} {'threads':>7}  "
                     f"{'provider':<14} {'MB/s':>8} {'Mtok/s':>7} {'CPU MB/s':>8}  "
                     f"{'fastlm faster':>13} {'(CPU time)':>10}  {'vs 1 thread':>11}")
        for r in enc:
            # rows from before the prose corpus (committed results) lack its fields
            r = {"corpus": "code", "vocab_size": "", "same_process": "", **r}
            mtok = f"{r['tokens_per_s'] / 1e6:.2f}" if "tokens_per_s" in r else "-"
            cpu_mb = f"{r['cpu_mb_per_s']:.1f}" if "cpu_mb_per_s" in r else "-"
            speed = f"{r['fastlm_speedup']:.2f}x" if "fastlm_speedup" in r else ""
            cpu_speed = f"{r['fastlm_cpu_speedup']:.2f}x" if "fastlm_cpu_speedup" in r else ""
            scale = f"{r['thread_speedup']:.2f}x" if "thread_speedup" in r else ""
            lines.append(f"{r['corpus']:<6} {r['vocab_size']:>6} {r['same_process']:>3} "
                         f"{r['mode']:<7} {r['threads']:>7}  {r['provider']:<14} "
                         f"{r['mb_per_s']:>8.1f} {mtok:>7} {cpu_mb:>8}  {speed:>13} "
                         f"{cpu_speed:>10}  {scale:>11}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small", choices=sorted(CORPUS_BYTES))
    p.add_argument("--repeats", type=int, default=3, help="training runs per row (median)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed encode runs per row")
    p.add_argument("--kinds", default="train,encode", help="train, encode or both (comma list)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with open(args.child) as f:
            spec = json.load(f)
        result = _encode_child(spec["encode"]) if "encode" in spec else _train_child(spec)
        print(json.dumps(result))
        return 0
    rows = run(args)
    print(format_table(rows))
    if args.json:
        from fastlm.bench import utils
        utils.write_json(rows, args.json)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
