"""Task files for evaluation and fine-tuning: JSON Lines, one example per line.

    mc        {"context": str, "choices": [str, ...], "label": int}        multiple choice
    classify  {"text": str, "label": str | int}                           classification
    generate  {"source": str, "reference": str}                           generation (BLEU/chrF)
    sft       {"prompt": str, "response": str}  or
              {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Every problem (bad JSON, a missing or mistyped field, a label outside the choices, an empty file)
raises TaskError naming the file and the 1-based line, so a user fixes the data, not the code.
Blank lines are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK_TYPES = ("mc", "classify", "generate", "sft")
ROLES = ("system", "user", "assistant")


class TaskError(ValueError):
    """Bad task data; the message names the file and line."""


@dataclass
class Example:
    """One parsed line: its fields and where it came from (for later error messages)."""
    fields: dict[str, Any]
    where: str  # "path:line"

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def _need(obj: dict, key: str, types: type | tuple, where: str, what: str) -> Any:
    if key not in obj:
        raise TaskError(f"{where}: missing field '{key}' ({what}); the line has "
                        f"{sorted(obj) or 'no fields'}")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise TaskError(f"{where}: field '{key}' must be {what}, got {type(value).__name__} "
                        f"{value!r:.60}")
    return value


def _check_mc(obj: dict, where: str) -> None:
    _need(obj, "context", str, where, "a string")
    choices = _need(obj, "choices", list, where, "a list of strings")
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: 'choices' must hold at least 2 non-empty strings")
    label = _need(obj, "label", int, where, "an integer index into 'choices'")
    if not 0 <= label < len(choices):
        raise TaskError(f"{where}: label {label} is outside choices 0..{len(choices) - 1}")


def _check_classify(obj: dict, where: str) -> None:
    _need(obj, "text", str, where, "a string")
    _need(obj, "label", (str, int), where, "a string or integer class name")


def _check_generate(obj: dict, where: str) -> None:
    _need(obj, "source", str, where, "a string")
    _need(obj, "reference", str, where, "a string")


def _check_sft(obj: dict, where: str) -> None:
    if "messages" in obj:
        messages = _need(obj, "messages", list, where, "a list of {role, content}")
        if not messages:
            raise TaskError(f"{where}: 'messages' is empty")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise TaskError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, "
                                f"'content': str}}, got {m!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise TaskError(f"{where}: no assistant message: nothing to learn from this line")
    else:
        if "prompt" not in obj and "response" not in obj:
            raise TaskError(f"{where}: an sft line needs 'prompt' and 'response' fields or a "
                            f"'messages' list; the line has {sorted(obj) or 'no fields'}")
        _need(obj, "prompt", str, where, "a string")
        _need(obj, "response", str, where, "a string")


_CHECKS = {"mc": _check_mc, "classify": _check_classify, "generate": _check_generate,
           "sft": _check_sft}


def read_jsonl(path: str | Path, task_type: str) -> list[Example]:
    """Parse and check every line of a task file; TaskError names the file and line."""
    if task_type not in _CHECKS:
        raise TaskError(f"unknown task type '{task_type}'; known: {', '.join(TASK_TYPES)}")
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TaskError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise TaskError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: each line must be a JSON object, got "
                            f"{type(obj).__name__}")
        _CHECKS[task_type](obj, where)
        examples.append(Example(obj, where))
    if not examples:
        raise TaskError(f"{path}: no examples (the file is empty or only blank lines)")
    return examples


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                          encoding="utf-8")
