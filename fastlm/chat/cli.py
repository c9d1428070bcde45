"""An interactive terminal chat with a checkpoint.

    python -m fastlm.chat --checkpoint RUN_DIR [--system "Be terse." --temperature 0.8
        --max-new-tokens 200 --precision auto|fp32|bf16 ...]

Each turn sends the whole conversation through fastlm.chat.template.chat_prompt, the same
prompt builder the server uses and the same template fastlm.finetune --task sft trains on: a
chat-tuned model sees <|user|>...<|end|><|assistant|> and stops at <|end|>; a base model without
the chat tokens continues a plain "User: ... Assistant:" transcript and stops at "\nUser:".
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from fastlm import checkpoint as ckpt
from fastlm.chat.template import chat_prompt
from fastlm.command import run_command
from fastlm.tokenizer import Tokenizer
from fastlm.generate.decode import (
    SamplingParams,
    add_model_args,
    add_sampling_args,
    load_from_args,
    sampling_from_args,
    stream,
)


def next_turn(tokenizer: Tokenizer, block_size: int, history: list[dict],
              params: SamplingParams) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling) of the assistant's next answer to `history`: chat_prompt's ids,
    the newest of them when the conversation outgrows the context, and its stop strings added
    to the user's."""
    ids, stop = chat_prompt(tokenizer, history)
    keep = max(1, block_size - params.max_new_tokens)
    return ids[-keep:], dataclasses.replace(params, stop=params.stop + stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.chat", description=__doc__.split("\n")[0])
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--system", default="", help="system message")
    args = ap.parse_args(argv)
    try:
        params = sampling_from_args(args)
        lm = load_from_args(args)
    except (ValueError, OSError, ckpt.CheckpointError) as exc:
        print(f"fastlm.chat: {exc}", file=sys.stderr)
        return 2
    print(f"fastlm.chat: {lm.meta.name} ({', '.join(lm.meta.notes)}). Empty line or Ctrl-D "
          "quits, /reset forgets the conversation.", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = input("you> ")
            line.encode("utf-8")  # a surrogate-escaped byte (stdin in a C locale) is not text
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeError:  # the conversation so far is kept: only this line is refused
            print("fastlm.chat: that line is not valid UTF-8 text; type it again",
                  file=sys.stderr)
            continue
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids, turn = next_turn(lm.tokenizer, lm.model.config.block_size, history, params)
        print("bot> ", end="", flush=True)
        reply, n, t0 = "", 0, time.perf_counter()
        try:
            for ev in stream(lm.model, lm.tokenizer, [ids], turn):
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
    sys.exit(run_command(main))
