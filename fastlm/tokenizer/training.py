"""Training a byte-level BPE vocabulary: stream the inputs into the native pre-token counter
(parallel, memory bounded), then learn merges (fastlm._bpe; rules in csrc/bpe/bpe_trainer.h).
Without the native module the pure-Python reference does the same, slowly.
"""
import warnings

from fastlm.tokenizer import inputs as _inputs
from fastlm.tokenizer import patterns, reference

READ_BYTES = 4 << 20  # per read from a file


def _progress(total, desc, unit, enabled, **kw):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **kw)


def learn(inputs, n_new_tokens, pattern, special_tokens, threads, progress=False, native=None):
    """(tokens: list[bytes], merges: list[(int, int)]) learned from `inputs` (see inputs.py)."""
    patterns.check(pattern)
    kind, source = _inputs.resolve(inputs)
    if native is None:
        return _learn_reference(kind, source, n_new_tokens, pattern, special_tokens)
    trainer = native.Trainer(pattern, list(special_tokens), threads or 0)
    if kind == "files":
        total = sum(p.stat().st_size for p in source)
        bar = _progress(total, "counting", "B", progress, unit_scale=True, unit_divisor=1024)
        for path in source:
            with open(path, "rb") as f:
                while chunk := f.read(READ_BYTES):
                    trainer.feed(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            trainer.end_document()
    else:
        bar = _progress(None, "counting", "char", progress, unit_scale=True)
        for batch in _inputs.batches(source):
            trainer.feed_texts(batch)
            if bar is not None:
                bar.update(sum(map(len, batch)))
    if bar is not None:
        bar.close()
    merge_bar = _progress(n_new_tokens, "merging", "tok", progress)
    done = [256]

    def report(n_tokens):
        merge_bar.update(n_tokens - done[0])
        done[0] = n_tokens

    tokens, merges = trainer.train(n_new_tokens, report if merge_bar is not None else None)
    if merge_bar is not None:
        merge_bar.close()
    return tokens, [tuple(m) for m in merges]


def _learn_reference(kind, source, n_new_tokens, pattern, special_tokens):
    warnings.warn("fastlm._bpe is not built: training with the pure-Python reference (slow)")
    if kind == "files":
        docs = (p.read_bytes() for p in source)
    else:
        docs = (t for batch in _inputs.batches(source) for t in batch)
    counts = reference.count_pieces(docs, pattern, special_tokens)
    return reference.train(counts, n_new_tokens)
