"""The stages that make things: data, tokenizer, pretrain and sft.

    data       collect + clean + dedup (fastlm.data.prepare with byte tokens into
               DIR/data/prepared, a folder `fastlm data inspect` reads), then the kept documents
               in corpus order as DIR/data/docs.jsonl, the held-out ones as DIR/data/val.txt,
               and the builtin task files (fastlm.eval.demo_tasks) when the recipe uses them
    tokenizer  the BPE (fastlm.tokenizer) trained on the training documents only, with the chat
               template's special tokens from the start (so sft adds no embedding rows), then the
               documents sharded with it (prepare again: the same documents in the same order and
               the same val_fraction make the same split, which the stage checks)
    pretrain   python -m fastlm.train on those shards (in this process, or under torchrun with
               nproc > 1); a killed stage resumes from its last checkpoint
    sft        python -m fastlm.finetune --task sft from pretrain's checkpoint on the chat set
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fastlm import checkpoint
from fastlm.chat.template import SPECIAL_TOKENS
from fastlm.data import ShardDataset, prepare
from fastlm.data.clean import CleanConfig
from fastlm.data.dedup import DedupConfig
from fastlm.data.encoders import BYTE_EOT
from fastlm.data.pipeline import is_val
from fastlm.data.sources import expand_inputs
from fastlm.data.text import stdlib_files
from fastlm.eval import demo_tasks
from fastlm.finetune.loop import finetune
from fastlm.finetune.loop import parse_args as finetune_args
from fastlm.recipe.context import Context, StageError, StageInterrupted
from fastlm.recipe.fingerprint import file_info
from fastlm.recipe.spec import STDLIB, Recipe, cli_args
from fastlm.tokenizer import Tokenizer
from fastlm.train.loop import main as train_main
from fastlm.train.plot import read_metrics

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

EOT = "<|endoftext|>"


def input_files(recipe: Recipe) -> list[str]:
    """The data stage's inputs in a fixed order, file inputs capped at [data] max_bytes."""
    files: list[str] = []
    for item in recipe.data.inputs:
        if item == STDLIB:
            files += [str(p) for p in stdlib_files()[1]]
        else:
            files += expand_inputs([item if item.startswith("hf:") else str(recipe.resolve(item))])
    cap, total, kept = recipe.data.max_bytes, 0, []
    for f in files:
        if cap and not f.startswith("hf:"):
            if total >= cap:
                continue
            total += Path(f).stat().st_size
        kept.append(f)
    return kept


def _documents(prepared: Path, split: str) -> Iterator[str]:
    """The documents of a byte-level prepared split, in order (each starts with EOT)."""
    if not (prepared / "manifest.json").exists():
        return
    run = bytearray()
    started = False
    for shard in ShardDataset(prepared, split).shards:
        cuts = np.flatnonzero(shard == BYTE_EOT)
        pos = 0
        for cut in cuts.tolist():
            run += shard[pos:cut].astype(np.uint8).tobytes()
            if started:
                yield run.decode("utf-8")
            run, started, pos = bytearray(), True, cut + 1
        run += shard[pos:].astype(np.uint8).tobytes()
    if started:
        yield run.decode("utf-8")


def read_docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def data(ctx: Context) -> dict:
    r = ctx.recipe.data
    files = input_files(ctx.recipe)
    clean = CleanConfig(min_chars=r.min_chars, max_symbol_ratio=r.max_symbol_ratio or None,
                        max_repeated_line_frac=r.max_repeated_lines or None)
    manifest = prepare(files, ctx.dir / "prepared", "byte", r.workers or None, clean=clean,
                       dedup=DedupConfig(near=r.near_dedup), val_fraction=r.val_fraction,
                       progress=ctx.progress, overwrite=True)
    train, val = (_documents(ctx.dir / "prepared", s) for s in ("train", "val"))
    n_docs = manifest["cleaning"]["documents_out"]
    val_bytes = 0
    with open(ctx.dir / "docs.jsonl", "w", encoding="utf-8") as docs, \
            open(ctx.dir / "val.txt", "w", encoding="utf-8") as held_out:
        for k in range(n_docs):  # back in corpus order: prepare's split is is_val(k)
            if is_val(k, r.val_fraction):
                text = next(val)
                held_out.write(("\n\n" if val_bytes else "") + text)
                val_bytes += len(text.encode()) + 2
            else:
                text = next(train)
            docs.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    outputs = {"docs": file_info(ctx.dir / "docs.jsonl"), "val": file_info(ctx.dir / "val.txt"),
               "val_documents": manifest["splits"]["val"]["documents"], "documents": n_docs}
    if ctx.recipe.uses_builtin_tasks:
        written = demo_tasks.build(ctx.tasks_dir())
        outputs["tasks"] = {name: file_info(ctx.tasks_dir() / name) for name in written}
    report = manifest["cleaning"]
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"outputs": outputs,
            "metrics": {"tokens": tokens, "input_files": len(files),
                        "bytes_in": report.get("bytes_in"), "cleaning": report,
                        "train_documents": manifest["splits"]["train"]["documents"],
                        "val_documents": manifest["splits"]["val"]["documents"]}}


def tokenizer(ctx: Context) -> dict:
    r, f = ctx.recipe.tokenizer, ctx.recipe.data.val_fraction
    docs = ctx.root / "data" / "docs.jsonl"
    training = (d for k, d in enumerate(read_docs(docs)) if not is_val(k, f))
    tok = Tokenizer.train(training, vocab_size=r.vocab_size, pattern=r.pattern,
                          special_tokens=(EOT, *SPECIAL_TOKENS), progress=ctx.progress)
    path = ctx.dir / "tokenizer.json"
    tok.save(path)
    manifest = prepare([str(docs)], ctx.dir / "shards", str(path),
                       ctx.recipe.data.workers or None, dedup=DedupConfig(exact=False, near=False),
                       shard_tokens=r.shard_tokens, val_fraction=f, progress=ctx.progress,
                       overwrite=True)
    want = ctx.output("data", "val_documents")
    got = manifest["splits"]["val"]["documents"]
    if got != want:
        raise StageError(f"the token shards hold {got} validation documents, the data stage "
                         f"held out {want}: the split moved between the stages")
    val = (ctx.root / "data" / "val.txt").read_text(encoding="utf-8")[:1_000_000]
    val_tokens = len(tok.encode_ordinary(val))
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"outputs": {"tokenizer": file_info(path), "tokenizer_hash": tok.hash(),
                        "shards_tokenizer_hash": manifest["tokenizer"]["hash"],
                        "shards": str(ctx.dir / "shards"),
                        "shards_fingerprint": manifest["fingerprint"]},
            "metrics": {"tokens": tokens, "vocab_size": tok.vocab_size, "pattern": tok.pattern,
                        "special_tokens": list(tok.special_tokens),
                        "val_bytes_per_token": len(val.encode()) / max(val_tokens, 1),
                        "train_tokens": manifest["splits"]["train"]["tokens"],
                        "val_tokens": manifest["splits"]["val"]["tokens"]}}


def _checkpoint_record(path: Path) -> dict:
    ckpt = checkpoint.load(path)
    return {"checkpoint": str(ckpt.path), "step": ckpt.step,
            "model_sha256": ckpt.manifest["files"]["model.safetensors"]["sha256"]}


def _tokens_per_step(run: Path, nproc: int) -> int:
    cfg = tomllib.loads((run / "config.toml").read_text())
    t = cfg["train"]
    if t.get("tokens_per_step"):
        return t["tokens_per_step"]
    seq = t.get("seq_len") or cfg["model"]["block_size"]
    return t["batch_size"] * seq * t["grad_accum"] * nproc


def pretrain(ctx: Context) -> dict:
    run, nproc = ctx.dir / "run", ctx.recipe.recipe.nproc
    tok_dir = ctx.root / "tokenizer"
    config = {"train.device": ctx.recipe.recipe.device, "train.seed": ctx.recipe.recipe.seed,
              **({} if ctx.progress else {"train.progress": False}),
              **ctx.recipe.pretrain.config}
    argv = [f"--data.path={tok_dir / 'shards'}", f"--data.tokenizer={tok_dir / 'tokenizer.json'}",
            f"--train.out_dir={run}", "--resume", *cli_args(config)]  # resume: a killed stage
    if nproc > 1:
        launch = ctx.recipe.pretrain.torchrun or ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch,
               f"--nproc_per_node={nproc}", "-m", "fastlm.train", *argv]
        print("  " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, check=False).returncode  # the status is read below
    else:
        try:
            rc = train_main(argv)
        except SystemExit as exc:  # fastlm.train's own error line
            raise StageError(str(exc.code).removeprefix("fastlm.train: error: ")) from None
    if rc == 130:
        raise StageInterrupted("training stopped and saved a checkpoint")
    if rc:
        raise StageError(f"fastlm.train exited with status {rc}")
    latest = checkpoint.latest(run)
    if latest is None:
        raise StageError(f"{run}: training wrote no checkpoint")
    train_rows, val_rows = read_metrics(run)
    tok_s = [r["tokens_per_s"] for r in train_rows if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in train_rows if r.get("mfu") is not None]
    record = _checkpoint_record(latest)
    final = val_rows[-1] if val_rows else {}
    return {"outputs": {**record, "run": str(run),
                        "tokenizer_hash": checkpoint.load(latest).train_state()["tokenizer"]},
            "metrics": {"tokens": record["step"] * _tokens_per_step(run, nproc),
                        "tokens_per_s": sum(tok_s) / len(tok_s) if tok_s else None,
                        "mfu": sum(mfu) / len(mfu) if mfu else None,
                        "steps": record["step"], "val_loss": final.get("val_loss"),
                        "val_bpb": final.get("val_bpb"), "nproc": nproc}}


def chat_file(ctx: Context) -> Path:
    return ctx.recipe.task_file(ctx.recipe.sft.data, ctx.tasks_dir(), "sft_train")


def sft(ctx: Context) -> dict:
    config = {"train.device": ctx.recipe.recipe.device, "train.seed": ctx.recipe.recipe.seed,
              **({} if ctx.progress else {"train.progress": False}), **ctx.recipe.sft.config}
    data_file = chat_file(ctx)
    args = finetune_args(["--checkpoint", ctx.output("pretrain", "checkpoint"), "--task", "sft",
                          "--data", str(data_file), "--out", str(ctx.dir / "run"),
                          *cli_args(config)])
    summary = finetune(args)
    _, val_rows = read_metrics(ctx.dir / "run")
    before = val_rows[0]["val_loss"] if val_rows else None
    record = _checkpoint_record(Path(summary["best_checkpoint"]))
    return {"outputs": {**record, "run": str(ctx.dir / "run"), "chat_set": file_info(data_file)},
            "metrics": {"steps": summary["steps"], "stopped_early": summary["stopped_early"],
                        "chat_val_loss_before": before,
                        "chat_val_loss_after": summary["best"].get("val_loss"),
                        "chat_val_ppl_after": math.exp(summary["best"]["val_loss"])
                        if summary["best"].get("val_loss") is not None else None}}
