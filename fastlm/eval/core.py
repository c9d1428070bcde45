"""Evaluate a checkpoint: perplexity and bits per byte on text, and task scores on jsonl files.

    python -m fastlm.eval --checkpoint RUN_DIR [--text PATH] [--task FILE.jsonl
                          --task-type mc|classify|generate] [--json OUT]

  text      perplexity and bits per byte with a sliding window: windows of --context tokens start
            every --stride tokens and each scores only the tokens no earlier window scored, so
            every token after the first window sees at least context - stride tokens of history.
            Without --text (and without --task) the run's own validation split is used.
            A masked-LM encoder (model.arch=bert) gets masked-token accuracy and
            pseudo-perplexity instead (fastlm.mlm_eval).
  mc        multiple choice by log-likelihood of each choice after the context: "accuracy" picks
            the largest sum of log-probabilities, "accuracy_norm" the largest per character
            (lm-evaluation-harness's acc and acc_norm).
  classify  a classification fine-tune (fastlm.finetune --task classify): accuracy, macro-F1.
  generate  greedy (or --temperature sampled) continuations of "source" scored against
            "reference" with sacrebleu BLEU and chrF (signatures printed).

Results print as a table, go to --json OUT, and are appended to RUN_DIR/metrics.jsonl as
{"kind": "eval", ...} when the checkpoint belongs to a run directory.

--precision auto (the default) scores text, mc and classify under bf16 autocast where the
hardware computes bf16 natively (fastlm.precision: CUDA sm_80+, CPUs with avx512_bf16/amx_bf16),
else in fp32; the weights stay float32, generate tasks decode in float32, and the results say
which precision was chosen. --precision fp32 forces float32.

Bits per byte = total NLL in bits / UTF-8 bytes of the scored tokens: unlike perplexity it does not
depend on how the tokenizer cuts text, so models with different tokenizers compare on it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastlm.chat.template import encode_chat, has_chat_tokens
from fastlm.checkpoint import CheckpointError
from fastlm.command import run_command
from fastlm.eval.scores import accuracy, bleu, macro_f1
from fastlm.precision import resolve_precision
from fastlm.restore import Restored, load
from fastlm.eval.tasks import Example, TaskError, read_jsonl

__all__ = [
    "bits_per_byte",
    "bleu",
    "classification_scores",
    "classify",
    "generate_greedy",
    "generation_scores",
    "loglikelihood",
    "main",
    "multiple_choice_accuracy",
    "perplexity",
    "score_text",
    "token_nll",
]


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", disable=not progress, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True, leave=False)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# Text: perplexity and bits per byte
def windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over target positions 0..n_targets-1: the window
    feeds inputs begin..end-1 and scores targets first_scored..end-1 (those not scored before)."""
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    out, scored, begin = [], 0, 0
    while scored < n_targets:
        end = min(begin + context, n_targets)
        out.append((begin, end, scored))
        scored = end
        begin += stride
    return out


@torch.no_grad()
def token_nll(model, ids: Sequence[int], context: int | None = None, stride: int | None = None,
              batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """NLL in nats (float64, length len(ids) - 1) of each token ids[1:] given the tokens before
    it, within a sliding window of `context` tokens advanced by `stride` (defaults: the model's
    block_size, and half of it)."""
    context = context or model.config.block_size
    stride = stride or max(1, context // 2)
    if context > model.config.block_size:
        raise ValueError(f"context {context} exceeds the model's block_size "
                         f"{model.config.block_size}")
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    if len(ids_t) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids_t)}")
    x_all, y_all = ids_t[:-1], ids_t[1:]
    nll = torch.full((len(y_all),), float("nan"), dtype=torch.float64)
    wins = windows(len(y_all), context, stride)
    device = _device(model)
    model.eval()
    bar = _bar(math.ceil(len(wins) / batch_size), "perplexity", progress)
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        T = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.long)  # (B, T), right-padded
        for row, (b, e, _) in enumerate(group):
            x[row, :e - b] = x_all[b:e]
        logits, _ = model(x.to(device))  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        for row, (b, e, first) in enumerate(group):
            pos = torch.arange(first - b, e - b, device=device)  # positions in the window
            tgt = y_all[first:e].to(device)
            nll[first:e] = -logp[row, pos, tgt].double().cpu()
        bar.update(1)
    bar.close()
    return nll


def perplexity(model, ids: Sequence[int], context: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> float:
    """exp(mean NLL per token) of ids[1:] (see token_nll)."""
    return math.exp(token_nll(model, ids, context, stride, batch_size).mean().item())


def score_text(model, tokenizer, text: str, context: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity, bits per byte and the counts behind them for one text."""
    ids = tokenizer.encode_ordinary(text)
    nll = token_nll(model, ids, context, stride, batch_size, progress)
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in ids[1:])
    total = nll.sum().item()
    return {"perplexity": math.exp(total / len(nll)),
            "bits_per_byte": total / math.log(2) / n_bytes,
            "nll_per_token": total / len(nll), "tokens": len(nll), "bytes": n_bytes}


def bits_per_byte(model, tokenizer, text: str, context: int | None = None,
                  stride: int | None = None, batch_size: int = 8) -> float:
    """Total NLL in bits / UTF-8 bytes of the scored tokens (tokenizer-independent)."""
    return score_text(model, tokenizer, text, context, stride, batch_size)["bits_per_byte"]


# ---------------------------------------------------------------------------------------------
# Multiple choice
@torch.no_grad()
def loglikelihood(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                  progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
    for each (context ids, continuation ids); long inputs lose context from the left."""
    L = model.config.block_size
    device = _device(model)
    model.eval()
    out: list[tuple[float, bool]] = []
    bar = _bar(math.ceil(len(requests) / batch_size), "loglikelihood", progress)
    for i in range(0, len(requests), batch_size):
        group = requests[i:i + batch_size]
        seqs = []
        for ctx, cont in group:
            if not cont:
                raise ValueError("loglikelihood: empty continuation")
            seq = (list(ctx) + list(cont))[-(L + 1):]
            seqs.append((seq, min(len(cont), len(seq) - 1)))
        T = max(len(s) - 1 for s, _ in seqs)
        x = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T), right-padded
        for row, (seq, _) in enumerate(seqs):
            x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
        logp = F.log_softmax(model(x.to(device))[0].float(), dim=-1)  # (B, T, V)
        for row, (seq, n) in enumerate(seqs):
            t = len(seq) - 1
            pos = torch.arange(t - n, t, device=device)
            tgt = torch.tensor(seq[-n:], device=device)
            lp = logp[row, pos]  # (n, V)
            out.append((lp[torch.arange(n, device=device), tgt].double().sum().item(),
                        bool((lp.argmax(-1) == tgt).all())))
        bar.update(1)
    bar.close()
    return out


def multiple_choice_accuracy(model, tokenizer, examples: Sequence, batch_size: int = 16,
                             progress: bool = False) -> dict:
    """accuracy (argmax of summed log-likelihood) and accuracy_norm (per character of the
    choice) over examples with "context", "choices" and "label"."""
    requests, owners = [], []
    for k, ex in enumerate(examples):
        ctx = tokenizer.encode_ordinary(ex["context"])
        for choice in ex["choices"]:
            requests.append((ctx, tokenizer.encode_ordinary(choice)))
            owners.append(k)
    scores = loglikelihood(model, requests, batch_size, progress)
    raw, norm, golds = [], [], []
    j = 0
    for ex in examples:
        n = len(ex["choices"])
        lls = [s for s, _ in scores[j:j + n]]
        j += n
        raw.append(max(range(n), key=lambda c: lls[c]))
        norm.append(max(range(n), key=lambda c: lls[c] / len(ex["choices"][c])))
        golds.append(ex["label"])
    return {"accuracy": accuracy(raw, golds), "accuracy_norm": accuracy(norm, golds),
            "examples": len(golds), "chance": sum(1 / len(ex["choices"]) for ex in examples)
            / len(examples)}


# ---------------------------------------------------------------------------------------------
# Classification
def encode_batch(tokenizer, texts: Sequence[str],
                 max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) with pad 0 and lengths (B,); texts longer than max_len tokens keep
    their beginning; an empty text becomes one pad token."""
    encoded = [tokenizer.encode_ordinary(t)[:max_len] or [0] for t in texts]
    T = max(len(e) for e in encoded)
    idx = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, e in enumerate(encoded):
        idx[row, :len(e)] = torch.tensor(e)
    return idx, torch.tensor([len(e) for e in encoded])


def label_ids(examples: Sequence[Example], labels: list[str], what: str) -> list[int]:
    """Class indices of examples' labels; TaskError naming file:line for a label not in labels."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for ex in examples:
        name = str(ex["label"])
        if name not in index:
            raise TaskError(f"{ex.where}: label {name!r} was not seen in {what} (known labels: "
                            f"{', '.join(labels)})")
        out.append(index[name])
    return out


@torch.no_grad()
def classify(classifier, tokenizer, texts: Sequence[str], batch_size: int = 32,
             progress: bool = False) -> list[int]:
    """Predicted class index of each text."""
    device = _device(classifier)
    classifier.eval()
    preds: list[int] = []
    max_len = classifier.gpt.config.block_size
    bar = _bar(math.ceil(len(texts) / batch_size), "classify", progress)
    for i in range(0, len(texts), batch_size):
        idx, lengths = encode_batch(tokenizer, texts[i:i + batch_size], max_len)
        logits, _ = classifier(idx.to(device), lengths=lengths.to(device))
        preds += logits.argmax(-1).tolist()
        bar.update(1)
    bar.close()
    return preds


def classification_scores(restored: Restored, examples: Sequence[Example], batch_size: int = 32,
                          progress: bool = False) -> dict:
    golds = label_ids(examples, restored.meta.labels, f"training of {restored.meta.path}")
    preds = classify(restored.model, restored.tokenizer, [ex["text"] for ex in examples],
                     batch_size, progress)
    return {"accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds),
            "examples": len(golds)}


# ---------------------------------------------------------------------------------------------
# Generation
@torch.no_grad()
def generate_greedy(model, prompt: list[int], max_new_tokens: int, stop: set[int],
                    temperature: float = 0.0,
                    generator: torch.Generator | None = None) -> list[int]:
    """New tokens after prompt: argmax each step (temperature 0) or sampled; ends before a stop
    token. No KV cache: each step re-runs the last block_size tokens."""
    device = _device(model)
    idx = torch.tensor([prompt or [0]], dtype=torch.long, device=device)  # (1, T0)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], last_only=True)
        logits = logits[0, -1].float()  # (V,)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        else:
            nxt = int(logits.argmax())
        if nxt in stop:
            break
        new.append(nxt)
        idx = torch.cat((idx, torch.tensor([[nxt]], device=device)), dim=1)
    return new


def generation_scores(restored: Restored, examples: Sequence[Example], max_new_tokens: int = 64,
                      temperature: float = 0.0, seed: int = 0, progress: bool = False) -> dict:
    """Continue each source (through the chat template for a chat-tuned model, stopping at
    <|end|>; plain text otherwise, stopping at a newline) and score with BLEU and chrF."""
    model, tok = restored.model, restored.tokenizer
    model.eval()
    chat = has_chat_tokens(tok)
    stop = {tok.special_tokens["<|end|>"]} if chat else set(tok.encode_ordinary("\n"))
    gen = torch.Generator().manual_seed(seed)
    hyps = []
    for ex in tqdm(examples, desc="generate", disable=not progress, file=sys.stderr,
                   mininterval=1.0, leave=False):
        if chat:
            prompt, _ = encode_chat(tok, [{"role": "user", "content": ex["source"]}],
                                    add_generation_prompt=True)
        else:
            prompt = tok.encode_ordinary(ex["source"])
        hyps.append(tok.decode(generate_greedy(model, prompt, max_new_tokens, stop, temperature,
                                               gen)))
    scores = bleu(hyps, [ex["reference"] for ex in examples])
    scores["examples"] = len(examples)
    scores["samples"] = [{"source": ex["source"], "hypothesis": h, "reference": ex["reference"]}
                         for ex, h in list(zip(examples, hyps))[:3]]
    return scores


# ---------------------------------------------------------------------------------------------
# Command line
def read_text(spec: str, max_bytes: int) -> tuple[str, str]:
    """(text, description) of a file, folder or glob (files joined by a blank line)."""
    from fastlm.data.text import SEPARATOR, expand_paths
    _, files = expand_paths(spec)
    data = SEPARATOR.join(f.read_bytes() for f in files)[:max_bytes or None]
    desc = f"{spec} ({len(files)} files, {len(data):,} bytes)"
    return data.decode("utf-8", errors="replace"), desc


def run_validation_text(restored: Restored, max_bytes: int) -> tuple[str, str]:
    """The validation split of the data the run was trained on (same split as fastlm.train)."""
    from fastlm.data.text import load_text
    data_cfg = restored.meta.config.get("data", {})
    data = load_text(data_cfg.get("path", ""), data_cfg.get("max_bytes", 0),
                     data_cfg.get("val_fraction", 0.1))
    val = bytes(data.val.numpy())[:max_bytes or None]
    desc = (f"validation split of {data_cfg.get('path') or 'the default corpus'} "
            f"({len(val):,} bytes)")
    return val.decode("utf-8", errors="replace"), desc


def print_table(results: dict) -> None:
    rows = [(k, v) for k, v in results.items()
            if not isinstance(v, (dict, list)) and not k.endswith("_signature")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {shown}")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastlm.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    p.add_argument("--text", help="text file, folder or glob for perplexity / bits per byte")
    p.add_argument("--task", help="task file (jsonl)")
    p.add_argument("--task-type", choices=("mc", "classify", "generate"))
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--context", type=int, default=0, help="window tokens (0 = block_size)")
    p.add_argument("--stride", type=int, default=0, help="window step (0 = context / 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-bytes", type=int, default=1_000_000,
                   help="score at most this many bytes of text (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use the first N task examples (0 = all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast where the hardware computes bf16 natively, else "
                        "fp32 (default auto)")
    args = p.parse_args(argv)
    if bool(args.task) != bool(args.task_type):
        p.error("--task and --task-type go together")
    return args


def evaluate_cli(args: argparse.Namespace) -> tuple[dict, Restored]:
    restored = load(args.checkpoint, args.device)
    choice, reason = resolve_precision(args.precision, args.device)
    device_type = next(restored.model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=choice == "bf16"):
        return _evaluate(args, restored, choice, reason)


def _evaluate(args: argparse.Namespace, restored: Restored, precision: str,
              reason: str) -> tuple[dict, Restored]:
    meta = restored.meta
    progress = not args.no_progress
    results: dict = {"checkpoint": str(meta.path), "step": meta.step, "precision": precision,
                     "precision_reason": reason}
    t0 = time.perf_counter()
    if args.task:
        examples = read_jsonl(args.task, args.task_type)[:args.limit or None]
        results.update(task=args.task, task_type=args.task_type)
        if args.task_type == "classify":
            if meta.task != "classify":
                raise TaskError(f"--task-type classify needs a classification fine-tune; "
                                f"{meta.path} is a {meta.task} checkpoint")
            results.update(classification_scores(restored, examples, args.batch_size, progress))
        else:
            if meta.task == "classify":
                raise TaskError(f"{meta.path} is a classifier; --task-type "
                                f"{args.task_type} needs a language model checkpoint")
            if getattr(restored.model, "objective", "causal") != "causal":
                raise TaskError(f"{meta.path} is a masked-LM encoder; --task-type "
                                f"{args.task_type} needs a causal language model")
            if args.task_type == "mc":
                results.update(multiple_choice_accuracy(restored.model, restored.tokenizer,
                                                        examples, args.batch_size, progress))
            else:  # decoding keeps float32: autocast's bf16 k/v do not fit the fp32 KV cache
                with torch.autocast(next(restored.model.parameters()).device.type,
                                    enabled=False):
                    results.update(generation_scores(restored, examples, args.max_new_tokens,
                                                     args.temperature, args.seed, progress))
    if args.text or not args.task:
        if meta.task == "classify":
            raise TaskError(f"{meta.path} is a classifier: evaluate it with "
                            "--task FILE.jsonl --task-type classify")
        text, desc = (read_text(args.text, args.max_bytes) if args.text
                      else run_validation_text(restored, args.max_bytes))
        if not text:
            raise TaskError(f"{args.text or 'validation split'}: no text to score")
        results["text"] = desc
        if getattr(restored.model, "objective", "causal") == "masked":  # encoders (bert)
            from fastlm.eval.mlm import mlm_scores
            results.update(mlm_scores(restored.model, restored.tokenizer, text,
                                      args.context or None, seed=args.seed,
                                      batch_size=args.batch_size))
        else:
            results.update(score_text(restored.model, restored.tokenizer, text,
                                      args.context or None, args.stride or None,
                                      args.batch_size, progress))
    results["time_s"] = round(time.perf_counter() - t0, 3)
    return results, restored


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        results, restored = evaluate_cli(args)
    except (CheckpointError, TaskError, FileNotFoundError, ValueError, ImportError) as exc:
        raise SystemExit(f"fastlm.eval: error: {exc}") from None
    print(f"fastlm.eval: {restored.meta.path}")
    print_table(results)
    for key in ("bleu_signature", "chrf_signature"):
        if key in results:
            print(f"  sacrebleu {key.split('_')[0]} signature: {results[key]}")
    for s in results.get("samples", []):
        print(f"  sample: {s['source']!r} -> {s['hypothesis']!r} (reference {s['reference']!r})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    metrics = restored.meta.run_dir / "metrics.jsonl"
    if metrics.exists():
        with open(metrics, "a") as f:
            f.write(json.dumps({"kind": "eval", **{k: v for k, v in results.items()
                                                   if k != "samples"}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
