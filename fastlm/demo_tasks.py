"""Demo task files built deterministically from the Python standard library (no download):

    python -m fastlm.demo_tasks --out tasks/

  classify_train.jsonl / classify_test.jsonl   {"text": ~120 bytes of source, "label": package}
        which of PACKAGES a snippet comes from (asyncio, email, json, xml, ...)
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

from fastlm.data.text import stdlib_files
from fastlm.tasks import write_jsonl

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


def build(out: str | Path, per_file: int = 6, seed: int = 0) -> dict[str, int]:
    """Write the task files into out; returns {file name: lines}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    rng = random.Random(seed)
    rows: dict[str, list] = {k: [] for k in ("classify_train", "classify_test", "mc",
                                             "sft_train", "generate")}
    line_pool: list[tuple[str, str]] = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        test = _h(rel) < TEST_FRACTION
        text = path.read_text(encoding="utf-8", errors="replace")
        package = rel.split("/")[0]
        if package in PACKAGES:
            split = "classify_test" if test else "classify_train"
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
    for name in ("sft_train", "generate"):  # cap: enough for a CPU demo
        rows[name] = rng.sample(rows[name], min(len(rows[name]), 2000 if name == "sft_train"
                                                else 200))
    for name, r in rows.items():
        rng.shuffle(r)
        write_jsonl(out / f"{name}.jsonl", r)
    return {f"{name}.jsonl": len(r) for name, r in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.demo_tasks", description=__doc__)
    p.add_argument("--out", required=True, help="folder for the jsonl files")
    p.add_argument("--per-file", type=int, default=6, help="classification snippets per file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, n in build(args.out, args.per_file, args.seed).items():
        print(f"{Path(args.out) / name}: {n} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
