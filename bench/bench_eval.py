"""Perplexity throughput: fastlm.eval against the same model exported to transformers.

    python -m fastlm.bench --ops eval [--sizes small|medium]     small: tiny, medium: gpt2-124m
    python -m fastlm.bench.bench_eval [--sizes small] [--json PATH]

Both providers score the same token ids with non-overlapping windows of block_size (stride =
context) in batches of `batch` windows, and both turn logits into per-token NLL the same way
(log-softmax in float32, gather the targets), so the timing compares the models' forward passes
and the batching around them. fastlm's model is random-init (throughput does not depend on the
weights); fastlm.export.hf.export_hf writes it as a transformers directory, which
AutoModelForCausalLM loads. Each row records the perplexity both computed: they must agree
(a sanity check that the two models are the same function).
"""
from __future__ import annotations

import argparse
import math
import tempfile

import torch
import torch.nn.functional as F
from fastlm.bench import utils

from fastlm.config import model_preset
from fastlm.eval.core import token_nll
from fastlm.models.gpt import GPT

OP = "eval"
SIZES = {"small": ("tiny", 16, 2), "medium": ("gpt2-124m", 4, 1)}  # preset, windows, batch


def _hf_nll(model, ids: torch.Tensor, context: int, batch: int) -> torch.Tensor:
    x_all, y_all = ids[:-1], ids[1:]
    out = []
    with torch.no_grad():
        for b in range(0, len(y_all), context * batch):
            xs = x_all[b:b + context * batch].view(-1, context)  # (B, T)
            ys = y_all[b:b + context * batch].view(-1, context)
            logp = F.log_softmax(model(xs).logits.float(), -1)  # (B, T, V)
            out.append(-logp.gather(-1, ys[..., None])[..., 0].double().flatten())
    return torch.cat(out)


def run(args) -> list[dict]:
    size = args.sizes if isinstance(args.sizes, str) and args.sizes in SIZES else "small"
    preset, n_windows, batch = SIZES[size]
    device = torch.device("cpu")
    torch.manual_seed(0)
    cfg = model_preset(preset)
    model = GPT(cfg).eval()
    T = cfg.block_size
    ids = torch.randint(0, cfg.vocab_size, (n_windows * T + 1,))
    providers = {"fastlm": lambda: token_nll(model, ids.tolist(), T, T, batch)}
    skipped = None
    try:
        from transformers import AutoModelForCausalLM

        from fastlm.export.hf import export_hf
        tmp = tempfile.TemporaryDirectory()
        export_hf(model, tmp.name)
        hf = AutoModelForCausalLM.from_pretrained(tmp.name, dtype=torch.float32).eval()
        providers["transformers"] = lambda: _hf_nll(hf, ids, T, batch)
    except ImportError as exc:
        skipped = f"transformers or fastlm.export unavailable: {exc}"
    env = utils.environment(device)
    rows = []
    for name, fn in providers.items():
        if not utils.wanted(name):
            continue
        budget = getattr(args, "budget", None) or 3.0
        timing = utils.time_call(lambda i, fn=fn: fn(), device, warmup_s=0.0, budget_s=budget,
                                 min_runs=3)
        nll = fn()
        tokens = len(nll)
        rows.append({**env, "op": OP, "provider": name, "preset": preset, "shape": [batch, T],
                     "dtype": "float32", "mode": "fwd", "tokens": tokens, "batch": batch,
                     "context": T, "median_ms": timing.median_ms, "min_ms": timing.min_ms,
                     "max_ms": timing.max_ms, "runs": timing.runs,
                     "tokens_per_s": tokens / (timing.median_ms / 1e3),
                     "perplexity": math.exp(nll.mean().item())})
    if skipped:
        rows.append({**env, "op": OP, "provider": "transformers", "preset": preset,
                     "skipped": skipped})
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'provider':<14}{'preset':<12}{'tokens':>8}{'median ms':>12}{'tokens/s':>12}"
              f"{'perplexity':>12}")
    lines = [header]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['provider']:<14}{r['preset']:<12}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['provider']:<14}{r['preset']:<12}{r['tokens']:>8}"
                     f"{r['median_ms']:>12.1f}{r['tokens_per_s']:>12.0f}{r['perplexity']:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="small", choices=sorted(SIZES))
    p.add_argument("--budget", type=float, default=3.0)
    p.add_argument("--json")
    a = p.parse_args()
    result = run(a)
    print(format_table(result))
    if a.json:
        utils.write_json(result, a.json)
