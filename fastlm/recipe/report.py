"""The report card: DIR/report.md for people, DIR/report.json for programs, DIR/report/*.png.

Sections (those of the stages the recipe ran): a table of every stage (wall time, tokens,
tokens/s, MFU where known, peak memory), data cleaning, tokenizer stats, pretraining with its
loss curve, evaluation before and after sft, a sample conversation through the server, the
exported files with sizes and sha256, and the versions of everything that ran.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import fastlm
from fastlm.recipe.context import Context
from fastlm.train.plot import PlotUnavailable, plot_run

EVAL_ROWS = (("bits_per_byte", "bits per byte (held-out text)"), ("perplexity", "perplexity"),
             ("mc_accuracy", "multiple choice accuracy"),
             ("mc_accuracy_norm", "multiple choice accuracy (per char)"),
             ("chrf", "chrF (generate)"), ("bleu", "BLEU (generate)"))


def versions() -> dict[str, str | None]:
    def version_of(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"fastlm": getattr(fastlm, "__version__", None), "python": sys.version.split()[0],
            "torch": torch.__version__, "triton": version_of("triton"),
            "cuda": torch.version.cuda, "numpy": np.__version__, "platform": platform.platform(),
            "cpu": cpu, "cpu_cores": str(os.cpu_count()), "gpu": gpu}


def _num(value, fmt: str = ",.0f") -> str:
    return "—" if value is None else format(value, fmt)


def _mib(n) -> str:
    return "—" if not n else f"{n / 2**20:,.0f} MiB"


def _plot(run: Path, out: Path) -> str:
    """The run's loss curve copied into the report folder; the reason when there is none."""
    try:
        shutil.copyfile(plot_run(run), out)
        return out.name
    except PlotUnavailable as exc:
        return f"(no plot: {exc})"


def _stage_table(records: dict[str, dict]) -> list[str]:
    rows = ["| stage | wall time | tokens | tokens/s | MFU | peak memory (RSS) | peak GPU memory |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    total = 0.0
    for name, rec in records.items():
        m = rec["metrics"]
        total += m["wall_s"]
        mfu = "—" if m.get("mfu") is None else f"{m['mfu']:.1%}"
        rss = max(m.get("peak_rss_bytes") or 0, m.get("peak_child_rss_bytes") or 0)
        rows.append(f"| {name} | {m['wall_s']:,.1f} s | {_num(m.get('tokens'))} | "
                    f"{_num(m.get('tokens_per_s'))} | {mfu} | {_mib(rss)} | "
                    f"{_mib(m.get('peak_gpu_bytes'))} |")
    rows.append(f"| **total** | {total:,.1f} s | | | | | |")
    return rows


def render(name: str, records: dict[str, dict], plots: dict[str, str],
           env: dict[str, str | None]) -> str:
    out = [f"# Report card: {name}", "", "## Stages", "", *_stage_table(records), "",
           ("MFU is known on GPUs with a listed peak (fastlm.train.flops); peak memory is the "
            "stage's resident-set high-water mark (torchrun children included)."), ""]
    if "data" in records:
        m = records["data"]["metrics"]
        out += ["## Data", "",
                f"- input files: {m['input_files']:,}, bytes in: {_num(m.get('bytes_in'))}",
                (f"- documents kept: {m['train_documents']:,} train + {m['val_documents']:,} "
                 "held out"), "", "| cleaning | count |", "|---|---:|",
                *[f"| {k.replace('_', ' ')} | {v:,} |" for k, v in sorted(m["cleaning"].items())],
                ""]
    if "tokenizer" in records:
        m, o = records["tokenizer"]["metrics"], records["tokenizer"]["outputs"]
        out += ["## Tokenizer", "",
                (f"- vocabulary: {m['vocab_size']:,} ({m['pattern']} split pattern; special "
                 f"tokens {', '.join(m['special_tokens'])})"),
                f"- bytes per token on held-out text: {m['val_bytes_per_token']:.3f}",
                f"- training tokens: {m['train_tokens']:,}, held-out tokens: {m['val_tokens']:,}",
                (f"- tokenizer sha256 {o['tokenizer']['sha256'][:16]}…, the shards' tokenizer "
                 f"hash {o['shards_tokenizer_hash'][:16]}…"), ""]
    if "pretrain" in records:
        m, o = records["pretrain"]["metrics"], records["pretrain"]["outputs"]
        out += ["## Pretraining", "",
                (f"- {m['steps']:,} steps on {m['nproc']} process(es), {_num(m.get('tokens'))} "
                 f"tokens; final val loss {_num(m.get('val_loss'), '.4f')}, "
                 f"{_num(m.get('val_bpb'), '.4f')} bits/byte"),
                f"- checkpoint {o['checkpoint']} (model sha256 {o['model_sha256'][:16]}…)",
                f"- loss curve: {plots.get('pretrain', '—')}", ""]
        if plots.get("pretrain", "").endswith(".png"):
            out += [f"![pretraining loss](report/{plots['pretrain']})", ""]
    if "eval" in records or "eval-sft" in records:
        before = records.get("eval", {}).get("metrics", {})
        after = records.get("eval-sft", {}).get("metrics", {})
        out += ["## Evaluation before and after SFT", "", "| metric | pretrained | after sft |",
                "|---|---:|---:|"]
        for key, label in EVAL_ROWS:
            if key in before or key in after:
                out.append(f"| {label} | {_num(before.get(key), '.4f')} | "
                           f"{_num(after.get(key), '.4f')} |")
        if "sft" in records:
            s = records["sft"]["metrics"]
            out.append(f"| chat set val loss (nats/token) | "
                       f"{_num(s['chat_val_loss_before'], '.4f')} | "
                       f"{_num(s['chat_val_loss_after'], '.4f')} |")
        out += [""]
        if "sft" in records:
            out += [(f"- sft: {records['sft']['metrics']['steps']:,} steps; loss curve: "
                     f"{plots.get('sft', '—')}"), ""]
            if plots.get("sft", "").endswith(".png"):
                out += [f"![sft loss](report/{plots['sft']})", ""]
    if "serve-check" in records:
        o = records["serve-check"]["outputs"]
        out += ["## Sample conversation", "",
                ("Through fastlm.serve and the official openai client (greedy, "
                 f"{o['completion_tokens']} tokens, finish: {o['finish_reason']}):"),
                "", f"> **user:** {o['messages'][0]['content']}", ">",
                f"> **assistant:** {o['reply']}", "",
                (f"- the server's prompt: {o['prompt_tokens']} tokens, the chat template's "
                 f"ids; reply equals fastlm's own greedy decoding: {o['matches_local']}"), ""]
    if "export" in records:
        o, m = records["export"]["outputs"], records["export"]["metrics"]
        out += ["## Exported files", "",
                f"From {o['checkpoint']} (model sha256 {o['model_sha256'][:16]}…).", "",
                "| file | bytes | sha256 |", "|---|---:|---|",
                *[f"| {k} | {v['bytes']:,} | `{v['sha256']}` |" for k, v in o["files"].items()],
                "", "- transformers logits vs fastlm's, max |difference|: "
                + ("transformers not installed" if m["hf_logits_max_abs_diff"] is None
                   else f"{m['hf_logits_max_abs_diff']:.2e}"), ""]
    out += ["## Versions", "", "| component | version |", "|---|---|",
            *[f"| {k} | {v if v is not None else '—'} |" for k, v in env.items()], ""]
    return "\n".join(out)


def report(ctx: Context) -> dict:
    records = dict(ctx.records)
    plots = {}
    for stage in ("pretrain", "sft"):
        if stage in records:
            plots[stage] = _plot(Path(records[stage]["outputs"]["run"]),
                                 ctx.dir / f"{stage}_loss.png")
    env = versions()
    md = render(ctx.recipe.recipe.name, records, plots, env)
    (ctx.root / "report.md").write_text(md)
    card = {"recipe": ctx.recipe.recipe.name, "recipe_file": str(ctx.recipe.path),
            "stages": records, "plots": plots, "versions": env}
    (ctx.root / "report.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    return {"outputs": {"report_md": str(ctx.root / "report.md"), "plots": plots},
            "metrics": {}}
