"""The chat template: how a conversation becomes tokens, for training (sft) and for chatting.

Every user of a conversation goes through this file: fastlm.finetune's sft examples, the terminal
chat (fastlm.chat.cli), the server's /v1/chat/completions (fastlm.serve, and through it the web
page), and fastlm.eval's generate task on a chat-tuned model. So a model is always prompted with
exactly the tokens it was trained on.

The template. A conversation becomes one token sequence:

    <|system|>You are terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>

Role markers and <|end|> are special tokens (ids of their own, never produced by encoding plain
text, so user text cannot forge a turn). A prompt/response pair is the conversation
[user: prompt, assistant: response]. Training targets are the assistant's content and its
<|end|> (so the model learns to stop); everything else, the markers included, is masked with
IGNORE, so prompt tokens contribute no loss and receive no gradient through the loss.
A chat prompt ends with "<|assistant|>" and the reply stops at <|end|>.

The plain transcript, for a model whose tokenizer lacks those special tokens (a base model
trained on plain text, never fine-tuned for chat), which can only continue text:

    {system}\\n\\n          (only when there is a system message)
    User: {message}\\n
    Assistant: {reply}\\n
    ...
    Assistant:

and the reply stops at the next "\\nUser:" (or <|endoftext|>). chat_prompt() is the one place
that picks between the two.

jinja() spells the same choice as a Jinja template, for the files other tools read (the
chat_template of an exported tokenizer_config.json and the GGUF's tokenizer.chat_template): they
render it to text and encode that, which gives chat_prompt()'s ids (tests/test_interop_chat.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IGNORE = -100  # the target value fastlm.ops.cross_entropy skips
ROLES = ("system", "user", "assistant")
TEMPLATE_STOP = ("<|end|>",)  # as text: the decoder's stop strings see the special token's text
PLAIN_NAMES = {"user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)


def messages_of(fields: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of an sft line: its 'messages', or prompt/response as two turns."""
    if "messages" in fields:
        return fields["messages"]
    return [{"role": "user", "content": fields["prompt"]},
            {"role": "assistant", "content": fields["response"]}]


def check_messages(messages: Sequence[dict]) -> None:
    """ValueError naming the first bad message of [{"role": ..., "content": str}, ...]."""
    if not messages:
        raise ValueError("messages: at least one message is needed")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: needs a 'role' and a string 'content'")  # noqa: TRY004 -- a request error (HTTP 400), like the others here
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role: must be system, user or assistant, got "
                             f"{m.get('role')!r}")


def has_chat_tokens(tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in SPECIAL_TOKENS)


def encode_chat(tokenizer, messages: Sequence[dict[str, str]],
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


def format_plain(messages: Sequence[dict]) -> str:
    """The plain transcript's text of a conversation, ending with "Assistant:" for the model to
    continue (messages checked first)."""
    check_messages(messages)
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        else:
            parts.append(f"{PLAIN_NAMES[m['role']]}: {m['content'].strip()}\n")
    return "".join(parts) + "Assistant:"


# Jinja spellings of encode_chat and format_plain (one line each: no literal whitespace for
# trim_blocks/lstrip_blocks, which transformers and llama-cpp-python both set, to remove).
_JINJA_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
_JINJA_PLAIN = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ m['content'] | trim + '\\n\\n' }}{% else %}"
                "{{ ('User' if m['role'] == 'user' else 'Assistant') + ': ' + m['content'] | trim"
                " + '\\n' }}{% endif %}{% endfor %}{{ 'Assistant:' }}")


def jinja(tokenizer) -> str:
    """chat_prompt()'s choice as a Jinja chat template (messages, add_generation_prompt): the
    special-token template when the tokenizer has its tokens, else the plain transcript (which
    always ends with "Assistant:", as format_plain does)."""
    return _JINJA_TEMPLATE if has_chat_tokens(tokenizer) else _JINJA_PLAIN


def chat_prompt(tokenizer, messages: Sequence[dict]) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, stop strings) to generate the assistant's next turn of `messages`: the
    template when the tokenizer has its special tokens (exactly the ids sft trains on, up to
    and including <|assistant|>), else the plain transcript. ValueError names a bad message."""
    check_messages(messages)
    if has_chat_tokens(tokenizer):
        return encode_chat(tokenizer, messages, add_generation_prompt=True)[0], TEMPLATE_STOP
    return tokenizer.encode(format_plain(messages), allowed_special="all"), PLAIN_STOP
