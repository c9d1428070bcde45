"""`python -m fastlm <command> [args]` (or the `fastlm` script): every fastlm command in one list.

Each command is also `python -m fastlm.<module>`; `python -m fastlm` alone lists them.
"""
import runpy
import sys

from fastlm.command import run_command

# command -> (module run as __main__, one line on what it does)
COMMANDS = {
    "data": ("fastlm.data", "collect, clean, deduplicate, tokenize and shard a corpus"),
    "tokenizer": ("fastlm.tokenizer", "train, inspect and export a byte-level BPE tokenizer"),
    "train": ("fastlm.train", "pretrain a model (any registered architecture)"),
    "plot": ("fastlm.plot", "redraw a run's loss curves"),
    "eval": ("fastlm.eval", "perplexity, bits per byte and task scores of a checkpoint"),
    "finetune": ("fastlm.finetune", "classification or instruction (SFT) fine-tuning"),
    "generate": ("fastlm.generate", "sample text from a checkpoint"),
    "chat": ("fastlm.chat", "chat with a checkpoint in the terminal"),
    "serve": ("fastlm.serve", "OpenAI-compatible HTTP server and web chat page"),
    "export": ("fastlm.export", "export to Hugging Face transformers or GGUF (llama.cpp)"),
    "lm-eval": ("fastlm.lm_eval_adapter", "run lm-evaluation-harness tasks on a checkpoint"),
    "demo-tasks": ("fastlm.demo_tasks", "write small demo task files for eval and finetune"),
    "compare": ("fastlm.compare", "train several architectures on one budget and compare them"),
    "profile": ("fastlm.profile", "profile a training step: tokens/s, MFU, memory, power"),
    "bench": ("fastlm.bench", "kernel benchmarks against their peers"),
    "recipe": ("fastlm.recipe", "raw text to a served chat model, with a report card"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: python -m fastlm <command> [args]   (or: fastlm <command>)\n\ncommands:\n{rows}\n\n"
            "`python -m fastlm <command> --help` describes each.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastlm: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    sys.argv = [f"fastlm {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # the command's own exit status
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
