"""The chat template of fastlm's instruction tuning, and the token-level loss mask.

A conversation becomes one token sequence:

    <|system|>You are terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>

Role markers and <|end|> are special tokens (ids of their own, never produced by encoding plain
text, so user text cannot forge a turn). A prompt/response pair is the conversation
[user: prompt, assistant: response]. Training targets are the assistant's content and its
<|end|> (so the model learns to stop); everything else, the markers included, is masked with
IGNORE, so prompt tokens contribute no loss and receive no gradient through the loss.
Generation prompts end with "<|assistant|>" and stop at <|end|>.
"""
from __future__ import annotations

from typing import Any

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IGNORE = -100  # the target value fastlm.ops.cross_entropy skips


def messages_of(fields: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of an sft line: its 'messages', or prompt/response as two turns."""
    if "messages" in fields:
        return fields["messages"]
    return [{"role": "user", "content": fields["prompt"]},
            {"role": "assistant", "content": fields["response"]}]


def has_chat_tokens(tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in SPECIAL_TOKENS)


def encode_chat(tokenizer, messages: list[dict[str, str]],
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, trained) for a conversation: trained[i] is True where ids[i] is a token the
    model should learn to produce (assistant content and its <|end|>)."""
    special = tokenizer.special_tokens
    end = special["<|end|>"]
    ids: list[int] = []
    trained: list[bool] = []
    for m in messages:
        body = tokenizer.encode_ordinary(m["content"]) + [end]
        learn = m["role"] == "assistant"
        ids += [special[f"<|{m['role']}|>"]] + body
        trained += [False] + [learn] * len(body)
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
        trained.append(False)
    return ids, trained


def sft_example(tokenizer, messages: list[dict[str, str]],
                max_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of length <= max_len for next-token training: targets[i] is the token
    after inputs[i] where that token is trained, else IGNORE. Long conversations keep their
    beginning (the system and first user turns) and lose their tail."""
    ids, trained = encode_chat(tokenizer, messages)
    ids, trained = ids[:max_len + 1], trained[:max_len + 1]
    targets = [t if ok else IGNORE for t, ok in zip(ids[1:], trained[1:])]
    return ids[:-1], targets
