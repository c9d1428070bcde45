"""Data pipeline: collect, clean, deduplicate, tokenize and shard a corpus; load it for training.

    from fastlm.data import prepare, ShardDataset, BatchLoader
    prepare(["corpus/", "more.jsonl.gz"], "data/mycorpus", tokenizer="byte", workers=8)
    ds = ShardDataset("data/mycorpus", "train")
    loader = BatchLoader(ds, batch_size=16, seq_len=1024, seed=0)
    x, y = loader.next()  # (B, T) int64 each

CLI: `python -m fastlm.data prepare INPUT... --out DIR` and `python -m fastlm.data inspect DIR`.
Modules: sources (collect), clean, dedup, encoders (tokenizers), shards (file format), manifest,
pipeline (prepare), loader (ShardDataset, BatchLoader). text.py is the trainer's plain-text
quick path (raw bytes, no shards).
"""
from fastlm.data.clean import CleanConfig
from fastlm.data.dedup import DedupConfig
from fastlm.data.loader import BatchLoader, ShardDataset
from fastlm.data.manifest import ManifestError
from fastlm.data.pipeline import PrepareError, prepare
from fastlm.data.shards import ShardError
from fastlm.data.sources import SourceError, SourceOptions

__all__ = ["prepare", "ShardDataset", "BatchLoader", "CleanConfig", "DedupConfig", "SourceOptions",
           "PrepareError", "ShardError", "ManifestError", "SourceError"]
