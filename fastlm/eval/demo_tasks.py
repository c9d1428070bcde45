"""Demo task files built deterministically from the Python standard library (no download):

    python -m fastlm.demo_tasks --out tasks/

  classify_train.jsonl / classify_test.jsonl   {"text": one line, "label": kind}
        what a line of the standard library is: "code", "comment" (its text, the '#' removed)
        or "docstring" (a line of prose from a docstring)
  package_train.jsonl / package_test.jsonl     {"text": ~120 bytes of source, "label": package}
        which of PACKAGES a snippet comes from (asyncio, email, json, xml, ...): a harder task
  mc.jsonl        {"context": start of a code line, "choices": 4 line endings, "label"}
        pick the real end of the line among endings taken from other lines
  sft_train.jsonl {"prompt": "Summarise: def f(a, b):", "response": first docstring line}
  generate.jsonl  {"source": the same prompt, "reference": the docstring line}   (test files)

Test files are a fixed share of the files by a hash of their path (as fastlm.data.text splits
validation text), so no test snippet comes from a file seen in fine-tuning. The same interpreter
gives the same files byte for byte; another Python version gives another (equally built) set.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import random
from pathlib import Path

from fastlm.command import run_command
from fastlm.data.text import stdlib_files
from fastlm.eval.tasks import write_jsonl

PACKAGES = ("asyncio", "email", "json", "xml", "multiprocessing", "importlib")
SNIPPET = 120  # bytes: under the tiny preset's 128-token context
TEST_FRACTION = 0.25


def _h(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def _snippets(text: str, rng: random.Random, n: int) -> list[str]:
    """Up to n snippets starting at line starts, stripped of surrounding blank space."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    out = []
    for s in rng.sample(starts, min(n, len(starts))):
        snippet = text[s:s + SNIPPET].strip()
        if len(snippet) >= SNIPPET // 2:
            out.append(snippet)
    return out


def _line_kinds(text: str, rng: random.Random, per_kind: int) -> list[dict]:
    """Up to per_kind lines of each kind (code, comment, docstring) of one file, 20-100 chars
    after stripping; comments lose their '#', so the model must tell prose styles apart."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    doc_lines: set[int] = set()  # 1-based line numbers inside docstrings and other strings
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno:
            doc_lines.update(range(node.lineno, node.end_lineno + 1))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno + 1, body[0].end_lineno))  # inner lines
    kinds: dict[str, list[str]] = {"code": [], "comment": [], "docstring": []}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if number in docstrings:
            kind, body = "docstring", stripped
        elif number in doc_lines:
            continue  # other multi-line strings: neither clearly code nor docstring
        elif stripped.startswith("#"):
            kind, body = "comment", stripped.lstrip("#").strip()
        else:
            kind, body = "code", stripped
        if 20 <= len(body) <= 100:
            kinds[kind].append(body)
    return [{"text": t, "label": kind} for kind, lines in kinds.items()
            for t in rng.sample(lines, min(per_kind, len(lines)))]


def _docstring_pairs(text: str) -> list[tuple[str, str]]:
    """(signature line, first docstring line) of functions with a one-line summary."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            sig = lines[node.lineno - 1].strip()
            if doc and sig.endswith(":") and len(sig) <= 60:
                summary = doc.strip().splitlines()[0].strip()
                if 10 <= len(summary) <= 60:
                    out.append((sig, summary))
    return out


def build(out: str | Path, per_file: int = 3, seed: int = 0) -> dict[str, int]:
    """Write the task files into out; returns {file name: lines}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("classify_train", "classify_test", "package_train",
                                             "package_test", "mc", "sft_train", "generate")}
    line_pool: list[tuple[str, str]] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        test = _h(rel) < TEST_FRACTION
        text = path.read_text(encoding="utf-8", errors="replace")
        package = rel.split("/")[0]
        rows["classify_test" if test else "classify_train"] += _line_kinds(text, rng, per_file)
        if package in PACKAGES:
            split = "package_test" if test else "package_train"
            rows[split] += [{"text": s, "label": package}
                            for s in _snippets(text, rng, per_file)]
        for sig, summary in _docstring_pairs(text):
            prompt = f"Summarise: {sig}"
            if test:
                rows["generate"].append({"source": prompt, "reference": summary})
            else:
                rows["sft_train"].append({"prompt": prompt, "response": summary})
        if test:
            for line in text.splitlines():
                line = line.strip()
                if 40 <= len(line) <= 100 and not line.startswith("#"):
                    cut = len(line) // 2
                    line_pool.append((line[:cut], line[cut:]))
    line_pool = rng.sample(line_pool, min(len(line_pool), 2000))
    for i in range(0, len(line_pool) - 3, 4):
        (ctx, real), others = line_pool[i], [e for _, e in line_pool[i + 1:i + 4]]
        label = rng.randrange(4)
        choices = others[:label] + [real] + others[label:]
        rows["mc"].append({"context": ctx, "choices": choices, "label": label})
    caps = {"sft_train": 2000, "generate": 200, "classify_train": 3000, "classify_test": 600}
    for name, cap in caps.items():  # enough for a CPU demo
        rows[name] = rng.sample(rows[name], min(len(rows[name]), cap))
    for name, r in rows.items():
        rng.shuffle(r)
        write_jsonl(out / f"{name}.jsonl", r)
    return {f"{name}.jsonl": len(r) for name, r in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.demo_tasks", description=__doc__)
    p.add_argument("--out", required=True, help="folder for the jsonl files")
    p.add_argument("--per-file", type=int, default=3, help="classification examples per file (per kind)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, n in build(args.out, args.per_file, args.seed).items():
        print(f"{Path(args.out) / name}: {n} examples")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
