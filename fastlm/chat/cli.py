"""Chat on top of a base language model: the prompt template and an interactive terminal chat.

    python -m fastlm.chat --checkpoint RUN_DIR [--temperature 0.8 --max-new-tokens 200 ...]

fastlm models are trained on plain text, without a chat template of their own, so a
conversation is written as a transcript the model continues:

    {system}\n\n          (only when there is a system message)
    User: {message}\n
    Assistant: {reply}\n
    ...
    Assistant:

and the reply ends at the next "\nUser:" (a stop string) or <|endoftext|>. The server
(fastlm.serve) uses the same template for /v1/chat/completions.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fastlm import checkpoint as ckpt
from fastlm.generate.decode import (
    SamplingParams,
    add_model_args,
    add_sampling_args,
    load_from_args,
    sampling_from_args,
    stream,
)

ROLES = {"user": "User", "assistant": "Assistant"}
STOP = ("\nUser:",)


def format_chat(messages: Sequence[dict]) -> str:
    """[{"role": "system"|"user"|"assistant", "content": str}, ...] -> the prompt text, ending
    with "Assistant:" for the model to continue. ValueError names a bad message."""
    if not messages:
        raise ValueError("messages: at least one message is needed")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: needs a 'role' and a string 'content'")  # noqa: TRY004 -- a request error (HTTP 400), like the others here
        role = m.get("role")
        if role == "system":
            parts.append(m["content"].strip() + "\n\n")
        elif role in ROLES:
            parts.append(f"{ROLES[role]}: {m['content'].strip()}\n")
        else:
            raise ValueError(f"messages[{i}].role: must be system, user or assistant, got {role!r}")
    return "".join(parts) + "Assistant:"


def chat_params(params: SamplingParams) -> SamplingParams:
    """params with the transcript's stop string added."""
    return SamplingParams(**{**params.__dict__, "stop": tuple(params.stop) + STOP})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.chat", description=__doc__.split("\n")[0])
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--system", default="", help="system message")
    args = ap.parse_args(argv)
    try:
        params = chat_params(sampling_from_args(args))
        lm = load_from_args(args)
    except (ValueError, OSError, ckpt.CheckpointError) as exc:
        print(f"fastlm.chat: {exc}", file=sys.stderr)
        return 2
    print(f"fastlm.chat: {lm.name} ({', '.join(lm.notes)}). Empty line or Ctrl-D quits, "
          "/reset forgets the conversation.", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        prompt = format_chat(history)
        ids = lm.tokenizer.encode(prompt, allowed_special="all")
        keep = max(1, lm.model.config.block_size - params.max_new_tokens)
        ids = ids[-keep:]  # the newest turns when the conversation outgrows the context
        print("bot> ", end="", flush=True)
        reply, n, t0 = "", 0, time.perf_counter()
        try:
            for ev in stream(lm.model, lm.tokenizer, [ids], params):
                n += ev.token is not None
                reply += ev.text
                print(ev.text, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            pass
        except ValueError as exc:
            print(f"\nfastlm.chat: {exc}", file=sys.stderr)
            history.pop()
            continue
        dt = time.perf_counter() - t0
        print()
        print(f"  [{n} tokens, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.strip()})


if __name__ == "__main__":
    sys.exit(main())
