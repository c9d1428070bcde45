"""The stages that check and ship a model: eval, eval-sft, export and serve-check.

    eval / eval-sft  fastlm.eval on pretrain's / sft's checkpoint, with the same [eval]
                     settings: bits per byte on the held-out text (DIR/data/val.txt), multiple
                     choice accuracy, and BLEU/chrF of generations when [eval] generate is set
    export           the final model (sft's, else pretrain's) as a transformers directory and a
                     GGUF file; when transformers is installed, the exported model's logits are
                     compared with fastlm's on held-out text
    serve-check      fastlm.serve on a loopback port, one chat through the official openai
                     client, the server stopped; the prompt the server built is compared with the
                     chat template's ids (fastlm.chat.template.chat_prompt) and the reply with
                     fastlm's own greedy decoding of those ids

Every stage records the checkpoint it read and that checkpoint's model sha256, so the report
(and the end-to-end test) can see that the model scored is the one exported and served.
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path

import torch

from fastlm.chat.template import chat_prompt
from fastlm.eval.core import evaluate_cli
from fastlm.eval.core import parse as eval_args
from fastlm.export.gguf import export_gguf
from fastlm.export.hf import export_hf
from fastlm.generate.decode import SamplingParams, stream
from fastlm.recipe.context import Context, StageError
from fastlm.recipe.fingerprint import file_info
from fastlm.restore import load

LOGITS_TOLERANCE = 1e-3  # fp32 both sides: only summation order differs


def _scores(ctx: Context, checkpoint: str) -> dict:
    e, tasks = ctx.recipe.eval, ctx.tasks_dir()
    common = ["--checkpoint", checkpoint, "--device", ctx.device, "--batch-size",
              str(e.batch_size)] + ([] if ctx.progress else ["--no-progress"])
    argv = [*common, "--text", str(ctx.root / "data" / "val.txt"), "--max-bytes", str(e.max_bytes)]
    mc = ctx.recipe.task_file(e.mc, tasks, "mc")
    if mc is not None:
        argv += ["--task", str(mc), "--task-type", "mc", "--limit", str(e.mc_limit)]
    results, _ = evaluate_cli(eval_args(argv))
    out = {"bits_per_byte": results["bits_per_byte"], "perplexity": results["perplexity"],
           "tokens": results["tokens"]}
    if mc is not None:
        out.update(mc_accuracy=results["accuracy"], mc_accuracy_norm=results["accuracy_norm"],
                   mc_examples=results["examples"], mc_chance=results["chance"])
    gen = ctx.recipe.task_file(e.generate, tasks, "generate")
    if gen is not None:
        results, _ = evaluate_cli(eval_args([*common, "--task", str(gen), "--task-type",
                                             "generate", "--limit", str(e.generate_limit),
                                             "--max-new-tokens", str(e.max_new_tokens)]))
        out.update(chrf=results.get("chrf"), bleu=results.get("bleu"),
                   generate_examples=results["examples"], generate_samples=results["samples"])
    return out


def _evaluate(ctx: Context, model_stage: str) -> dict:
    checkpoint = ctx.output(model_stage, "checkpoint")
    scores = _scores(ctx, checkpoint)
    return {"outputs": {"checkpoint": checkpoint,
                        "model_sha256": ctx.output(model_stage, "model_sha256")},
            "metrics": scores}


def evaluate(ctx: Context) -> dict:
    return _evaluate(ctx, "pretrain")


def evaluate_sft(ctx: Context) -> dict:
    return _evaluate(ctx, "sft")


def _sample_ids(ctx: Context, tokenizer, n: int) -> list[int]:
    text = (ctx.root / "data" / "val.txt").read_text(encoding="utf-8")[:20 * n]
    return tokenizer.encode_ordinary(text)[:n]


def hf_logits_diff(hf_dir: Path, model, ids: list[int]) -> float | None:
    """Largest |logit difference| of the exported model (transformers) and fastlm's on ids;
    None when transformers is not installed."""
    try:
        from transformers import AutoModelForCausalLM  # optional: the test extra
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits
        ours = model.cpu().float()(x)[0]
    return (theirs - ours).abs().max().item()


def export(ctx: Context) -> dict:
    stage, fmts = ctx.model_stage, ctx.recipe.export.formats
    checkpoint = ctx.output(stage, "checkpoint")
    model, tok, meta = load(checkpoint)
    files, diff = {}, None
    if "hf" in fmts:
        hf_dir = export_hf(model, ctx.dir / "hf", tok)
        files.update({f"hf/{p.name}": file_info(p) for p in sorted(hf_dir.iterdir())})
        ids = _sample_ids(ctx, tok, min(64, model.config.block_size))
        diff = hf_logits_diff(hf_dir, model, ids)
        if diff is not None and diff > LOGITS_TOLERANCE:
            raise StageError(f"the exported transformers model's logits differ from fastlm's by "
                             f"{diff:.3g} (> {LOGITS_TOLERANCE})")
    if "gguf" in fmts:
        path = export_gguf(model, ctx.dir / "gguf", tok, ctx.recipe.export.gguf_dtype, meta.name)
        files[f"gguf/{path.name}"] = file_info(path)
    return {"outputs": {"checkpoint": checkpoint,
                        "model_sha256": ctx.output(stage, "model_sha256"), "files": files},
            "metrics": {"hf_logits_max_abs_diff": diff}}


def serve_check(ctx: Context) -> dict:
    import openai  # optional: the official client (spec.parse checked it is installed)

    from fastlm.serve import BackgroundServer, create_app  # needs fastapi, optional too

    stage, s = ctx.model_stage, ctx.recipe.serve
    checkpoint = ctx.output(stage, "checkpoint")
    lm = load(checkpoint)
    messages = [{"role": "user", "content": s.message}]
    key = secrets.token_hex(16)
    try:
        server = BackgroundServer(create_app(lm, api_key=key))
    except RuntimeError as exc:
        raise StageError(str(exc)) from None
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0,
                               timeout=600)
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=lm.meta.name, messages=messages,
                                               max_tokens=s.max_tokens, temperature=0, seed=0)
        latency = time.perf_counter() - t0
    ids, stop = chat_prompt(lm.tokenizer, messages)
    if reply.usage.prompt_tokens != len(ids):
        raise StageError(f"the server prompted with {reply.usage.prompt_tokens} tokens; the chat "
                         f"template makes {len(ids)}")
    local = "".join(ev.text for ev in stream(lm.model, lm.tokenizer, [ids], SamplingParams(
        max_new_tokens=s.max_tokens, temperature=0.0, stop=stop)))
    text = reply.choices[0].message.content
    return {"outputs": {"checkpoint": checkpoint,
                        "model_sha256": ctx.output(stage, "model_sha256"),
                        "messages": messages, "reply": text, "template_ids": ids,
                        "prompt_tokens": reply.usage.prompt_tokens,
                        "completion_tokens": reply.usage.completion_tokens,
                        "finish_reason": reply.choices[0].finish_reason,
                        "local_reply": local, "matches_local": text == local},
            "metrics": {"tokens": reply.usage.completion_tokens, "latency_s": latency,
                        "tokens_per_s": reply.usage.completion_tokens / latency}}
