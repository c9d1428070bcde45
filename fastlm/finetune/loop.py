"""Fine-tune a fastlm checkpoint: sequence classification or instruction/chat SFT, full or LoRA.

    python -m fastlm.finetune --checkpoint PATH --task classify|sft --data FILE.jsonl
                              --out RUN_DIR [--overwrite] [--val FILE.jsonl] [--lora.rank=8 ...]
                              [--optim.lr=1e-3 --train.max_steps=300 --eval.interval=25 ...]

Options use the training config system (fastlm.config: --optim.*, --train.*, --eval.interval,
--kernels.backend, with fine-tuning defaults below; the model comes from the checkpoint) plus two
sections of their own:

  [lora]      rank (0 = full fine-tune), alpha, dropout, targets (comma-separated module-name
              suffixes; default the attention and MLP projections)
  [finetune]  val_fraction (held-out share of --data when there is no --val), patience
              (validations without improvement before stopping), max_len (0 = block_size)

classify  {"text", "label"} lines; a linear head on the last non-pad token's hidden state
          (fastlm.models.classifier), or on the [CLS] position of an encoder (model.arch=bert).
          The label list (sorted) is saved in the checkpoint manifest.
sft       {"prompt", "response"} or {"messages": [...]} lines through the chat template
          (fastlm.chat.template, which fastlm.chat and fastlm.serve prompt the result with):
          special tokens are added to the vocabulary (new embedding rows) when the base model
          lacks them, and the manifest's tokenizer record says how fastlm.restore.load finds
          the grown tokenizer; loss only on assistant tokens. Examples are padded
          (right, to the longest in the batch) rather than packed: ops.attention is causal-only,
          so packing would let an example attend to the one before it.

Validation every eval.interval steps; a checkpoint is written only when the validation loss
improves, so RUN_DIR/checkpoints holds the best one, and training stops after `patience`
validations without improvement. --out must not hold another run unless --overwrite (its run
files are deleted first), and must take a checkpoint before training starts. LoRA runs are
merged before saving: the checkpoint is a plain model that fastlm.eval (and anything else
reading checkpoints) loads without LoRA code.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from fastlm import checkpoint, ops
from fastlm import run_dir as run_dirs
from fastlm import config as config_mod
from fastlm.chat.template import IGNORE, SPECIAL_TOKENS, messages_of, sft_example
from fastlm.checkpoint import CheckpointError
from fastlm.command import run_command
from fastlm.models.classifier import Classifier
from fastlm.config import Config, ConfigError, load_config, to_dict
from fastlm.eval.core import encode_batch, label_ids
from fastlm.finetune.lora import DEFAULT_TARGETS, add_lora, lora_parameters, merge_lora
from fastlm.eval.scores import accuracy, majority_baseline
from fastlm.models import LanguageModel, build
from fastlm.train.optim import build_optimizer
from fastlm.restore import load
from fastlm.eval.tasks import Example, TaskError, read_jsonl
from fastlm.tokenizer import Tokenizer
from fastlm.train.logs import MetricsLog
from fastlm.train.runtime import SetupError, StopFlag, lr_at, pick_device
from fastlm.train.step import TrainStep


@dataclass
class LoraConfig:
    """LoRA adapters (fastlm.lora)."""
    rank: int = config_mod._f(0, "adapter rank (0 = full fine-tune)", min=0)
    alpha: float = config_mod._f(16.0, "scale numerator: the update is alpha/rank * B A", gt=0.0)
    dropout: float = config_mod._f(0.0, "dropout on the adapter input", min=0.0, max=0.99)
    targets: str = config_mod._f(",".join(DEFAULT_TARGETS), "module-name suffixes to adapt")


@dataclass
class FinetuneConfig:
    """Fine-tuning data and early stopping."""
    val_fraction: float = config_mod._f(0.1, "share of --data held out when --val is not given",
                                        gt=0.0, max=0.5)
    patience: int = config_mod._f(4, "validations without improvement before stopping", min=1)
    max_len: int = config_mod._f(0, "longest example in tokens (0 = model.block_size)", min=0)
    min_delta: float = config_mod._f(0.0, "a validation loss counts as better when it is lower "
                                          "than the best by more than this", min=0.0)


# Training defaults that suit fine-tuning a small model; anything on the command line wins.
DEFAULTS = {"train.max_steps": 300, "optim.lr": 1e-3, "optim.min_lr": 1e-4,
            "optim.warmup_steps": 20, "eval.interval": 25, "train.batch_size": 16,
            "optim.weight_decay": 0.0, "train.log_interval": 10}
OWN = {"lora": LoraConfig, "finetune": FinetuneConfig}
ALLOWED = ("optim", "train", "eval", "kernels")


@dataclass
class Args:
    checkpoint: str
    task: str
    data: str
    out: str
    val: str = ""
    overwrite: bool = False  # --out may hold another run, whose files are deleted
    cfg: Config = field(default_factory=Config)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def argv_keys(argv: list[str]) -> set[str]:
    return {a[2:].partition("=")[0] for a in argv if a.startswith("--")}


def parse_args(argv: list[str]) -> Args:
    """--checkpoint/--task/--data/--out/--val and --section.key=value options."""
    named: dict[str, str] = {}
    overrides: dict[str, Any] = dict(DEFAULTS)
    own: dict[str, dict] = {s: {} for s in OWN}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (see --help)")
        name, eq, value = arg[2:].partition("=")
        if name == "overwrite" and not eq:  # a bare flag
            named[name], i = "true", i + 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        section, dot, key = name.partition(".")
        if not dot:
            if name not in ("checkpoint", "task", "data", "out", "val", "overwrite"):
                raise ConfigError(f"unknown option '--{name}'; options are --checkpoint, --task, "
                                  "--data, --out, --val, --overwrite and --section.key=value "
                                  "(see --help)")
            named[name] = value
        elif section in OWN:
            keys = [f.name for f in dataclasses.fields(OWN[section])]
            if key not in keys:
                raise ConfigError(f"unknown key '{name}'; keys of [{section}]: {', '.join(keys)}")
            own[section][key] = (value, "the command line", True)
        elif section in ALLOWED:
            overrides[name] = value
        else:
            raise ConfigError(f"--{name}: fine-tuning takes [{', '.join(ALLOWED + tuple(OWN))}] "
                              "options; the model's shape comes from the checkpoint")
    user_lr = overrides["optim.lr"]
    if user_lr is not DEFAULTS["optim.lr"] and "optim.min_lr" not in argv_keys(argv):
        try:  # keep the default decay ratio under a user's lr (min_lr must stay <= lr)
            overrides["optim.min_lr"] = float(user_lr) / 10
        except ValueError:
            pass  # load_config names the bad optim.lr
    for required in ("checkpoint", "task", "data", "out"):
        if required not in named:
            raise ConfigError(f"--{required} is required (see --help)")
    if named["task"] not in ("classify", "sft"):
        raise ConfigError(f"--task must be classify or sft, got '{named['task']}'")
    if named.get("overwrite", "true") != "true":
        raise ConfigError("--overwrite takes no value")
    args = Args(named["checkpoint"], named["task"], named["data"], named["out"],
                named.get("val", ""), "overwrite" in named, load_config(overrides=overrides))
    for section, values in own.items():
        config_mod._apply(getattr(args, section), section, values)
    return args


# ---------------------------------------------------------------------------------------------
# Data
def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split by a hash of each line's content (not its position)."""
    val = [e for e in examples if _hash01(json.dumps(e.fields, sort_keys=True)) < fraction]
    train = [e for e in examples if _hash01(json.dumps(e.fields, sort_keys=True)) >= fraction]
    if not val or not train:  # too few lines for the hash to split: hold out the last one
        train, val = examples[:-1], examples[-1:]
    return train, val


def load_examples(args: Args, task: str) -> tuple[list[Example], list[Example]]:
    train = read_jsonl(args.data, task)
    if args.val:
        return train, read_jsonl(args.val, task)
    if len(train) < 2:
        raise TaskError(f"{args.data}: one example cannot be split into train and validation; "
                        "add lines or pass --val FILE")
    return split(train, args.finetune.val_fraction)


def with_chat_tokens(model: LanguageModel, tokenizer: Tokenizer
                     ) -> tuple[LanguageModel, Tokenizer]:
    """Add the chat template's special tokens (as new ids after the vocabulary) when the
    tokenizer lacks them, growing the embedding and head when the model has no spare ids
    (a model of the same architecture, built through fastlm.models.build)."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return model, tokenizer
    specials = tokenizer.special_tokens
    tokens = tokenizer.tokens
    for t in missing:
        specials[t] = len(tokens)
        tokens.append(t.encode("utf-8"))
    tokenizer = Tokenizer(tokens, specials, tokenizer.pattern, tokenizer.merges)
    old = model.config
    if tokenizer.vocab_size <= old.vocab_size:  # spare ids in the embedding already
        return model, tokenizer
    cfg = dataclasses.replace(old, vocab_size=tokenizer.vocab_size)
    bigger = build(cfg).to(next(model.parameters()).device)
    state = model.state_dict()
    with torch.no_grad():
        for name, p in bigger.state_dict().items():
            src = state[name]
            if p.shape == src.shape:
                p.copy_(src)
            else:  # the embedding / head (vocabulary rows first): old rows kept; new rows
                # near the mean of the old ones, with noise so the new tokens differ even when
                # LoRA keeps the embedding frozen
                p[:old.vocab_size] = src
                mean = src.mean(0, keepdim=True)
                p[old.vocab_size:] = mean + 0.02 * torch.randn_like(p[old.vocab_size:])
    return bigger, tokenizer


def tokenizer_spec(tokenizer: Tokenizer, run_dir: Path) -> dict:
    """The manifest's tokenizer record, which fastlm.restore.load reads: byte tokens + specials
    in the manifest, otherwise RUN_DIR/tokenizer.json (written here)."""
    if tokenizer.pattern == "none" and tokenizer.tokens[:256] == [bytes([b]) for b in range(256)] \
            and tokenizer.vocab_size == 256 + len(tokenizer.special_tokens):
        return {"kind": "byte", "special_tokens": sorted(tokenizer.special_tokens,
                                                         key=tokenizer.special_tokens.get)}
    tokenizer.save(run_dir / "tokenizer.json")
    return {"kind": "file", "path": "tokenizer.json"}


def classify_batches(tokenizer, examples: list[Example], targets: list[int], max_len: int,
                     batch_size: int, order: list[int]) -> list[tuple]:
    out = []
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        idx, lengths = encode_batch(tokenizer, [examples[r]["text"] for r in rows], max_len)
        out.append((idx, torch.tensor([targets[r] for r in rows]), lengths))
    return out


def sft_tensors(tokenizer, examples: list[Example], max_len: int) -> list[tuple[list, list]]:
    """(inputs, targets) per example; examples whose response was cut off entirely are an
    error naming their line (nothing would be learned from them)."""
    out = []
    for ex in examples:
        x, y = sft_example(tokenizer, messages_of(ex.fields), max_len)
        if all(t == IGNORE for t in y):
            raise TaskError(f"{ex.where}: no response token fits in finetune.max_len={max_len} "
                            "tokens; shorten the prompt or raise finetune.max_len")
        out.append((x, y))
    return out


def sft_batches(pairs: list[tuple[list, list]], batch_size: int, order: list[int]) -> list[tuple]:
    out = []
    for i in range(0, len(order), batch_size):
        rows = [pairs[r] for r in order[i:i + batch_size]]
        T = max(len(x) for x, _ in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T), right-padded
        tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # pads carry no loss
        for r, (x, y) in enumerate(rows):
            idx[r, :len(x)], tgt[r, :len(y)] = torch.tensor(x), torch.tensor(y)
        out.append((idx, tgt, None))
    return out


# ---------------------------------------------------------------------------------------------
def forward(model: nn.Module, batch: tuple, device: torch.device):
    idx, tgt, lengths = batch
    if lengths is None:
        return model(idx.to(device), tgt.to(device))
    return model(idx.to(device), tgt.to(device), lengths.to(device))


@torch.no_grad()
def validate(model: nn.Module, batches: list[tuple], device: torch.device) -> dict:
    model.eval()
    total, n, preds, golds = 0.0, 0, [], []
    for batch in batches:
        logits, loss = forward(model, batch, device)
        total += loss.item() * len(batch[0])
        n += len(batch[0])
        if batch[2] is not None:  # classification: accuracy too
            preds += logits.argmax(-1).tolist()
            golds += batch[1].tolist()
    model.train()
    out = {"val_loss": total / n}
    if golds:
        out["val_accuracy"] = accuracy(preds, golds)
    return out


def finetune(args: Args) -> dict:
    """Run a fine-tune; returns the summary (also written to RUN_DIR/finetune.json)."""
    cfg = args.cfg
    try:
        ops.set_backend(cfg.kernels.backend)
    except ValueError as exc:
        raise SetupError(f"kernels.backend: {exc}") from None
    device = pick_device(cfg.train.device)
    base = load(args.checkpoint, "cpu")
    if not isinstance(base.model, LanguageModel):
        raise SetupError(f"--checkpoint {base.meta.path}: a {base.meta.task} fine-tune; start "
                         "from a language-model checkpoint")
    if args.task == "sft" and base.model.objective != "causal":
        raise SetupError(f"--checkpoint {base.meta.path}: a {base.model.config.arch} model "
                         f"({base.model.objective} objective) does not generate text; "
                         "--task sft needs a causal model (classify works with either)")
    torch.manual_seed(cfg.train.seed)
    gpt, tokenizer = base.model, base.tokenizer
    max_len = args.finetune.max_len or gpt.config.block_size
    if max_len > gpt.config.block_size:
        raise ConfigError(f"finetune.max_len ({max_len}) exceeds the model's block_size "
                          f"({gpt.config.block_size})")
    train_ex, val_ex = load_examples(args, args.task)
    extra: dict[str, Any] = {}
    if args.task == "classify":
        labels = sorted({str(e["label"]) for e in (train_ex if args.val else train_ex + val_ex)})
        if len(labels) < 2:
            raise TaskError(f"{args.data}: classification needs at least 2 labels, found "
                            f"{labels}")
        train_y = label_ids(train_ex, labels, f"the training data {args.data}")
        val_y = label_ids(val_ex, labels, f"the training data {args.data}")
        try:
            model: nn.Module = Classifier(gpt, len(labels))
        except ValueError as exc:
            raise SetupError(f"--checkpoint {base.meta.path}: {exc}") from None
        extra = {"labels": labels,
                 "majority_baseline": majority_baseline(train_y, val_y)}
        make = lambda ex, y, order: classify_batches(tokenizer, ex, y, max_len,
                                                     cfg.train.batch_size, order)
    else:
        gpt, tokenizer = with_chat_tokens(gpt, tokenizer)
        model = gpt
        train_pairs = sft_tensors(tokenizer, train_ex, max_len)
        val_pairs = sft_tensors(tokenizer, val_ex, max_len)
        train_y, val_y = train_pairs, val_pairs
        make = lambda ex, pairs, order: sft_batches(pairs, cfg.train.batch_size, order)
    lora = args.lora
    if lora.rank:
        targets = tuple(t.strip() for t in lora.targets.split(",") if t.strip())
        try:
            add_lora(gpt, lora.rank, lora.alpha, lora.dropout, targets)
        except ValueError as exc:
            raise SetupError(f"lora.targets: {exc}") from None
    model.to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, cfg.optim)  # --optim.name=sgd too
    train_step = TrainStep(model, optimizer, device=device, precision=cfg.train.precision,
                           grad_clip=cfg.train.grad_clip)
    cfg.train.precision = train_step.precision  # the saved config says what ran, not "auto"

    try:  # before any step: a directory that cannot take the result fails now
        run_dir = run_dirs.claim(args.out, overwrite=args.overwrite, resume_hint=False)
        run_dirs.check_writable(run_dir)
    except run_dirs.RunDirError as exc:
        raise SetupError(str(exc)) from None
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    spec = tokenizer_spec(tokenizer, run_dir)
    saved_config = {**to_dict(cfg), "model": dataclasses.asdict(gpt.config), "tokenizer": spec,
                    "finetune": {"task": args.task, "base": str(base.meta.path),
                                 "data": args.data,
                                 "lora": dataclasses.asdict(lora),
                                 **dataclasses.asdict(args.finetune), **extra}}
    print(f"fastlm.finetune: {args.task} from {base.meta.path} -> {run_dir}")
    print(f"  data    {len(train_ex)} train / {len(val_ex)} val examples from {args.data}"
          + (f" and {args.val}" if args.val else ""))
    print(f"  model   {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} "
          f"parameters" + (f" (LoRA rank {lora.rank}: {lora_parameters(model):,})"
                           if lora.rank else " (full fine-tune)"), flush=True)

    gen = torch.Generator().manual_seed(cfg.train.seed)
    val_batches = make(val_ex, val_y, list(range(len(val_ex))))
    epoch_batches: list[tuple] = []
    best, bad, step, t0 = math.inf, 0, 0, time.perf_counter()
    best_row: dict = {}
    best_path = None

    def evaluate_and_keep() -> bool:
        """Validate; save when best. Returns True when patience has run out."""
        nonlocal best, bad, best_row, best_path
        row = validate(model, val_batches, device)
        metrics.write(kind="val", step=step, **row, time_s=round(time.perf_counter() - t0, 3))
        tqdm.write(f"step {step:>5}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        if row["val_loss"] < best - args.finetune.min_delta:
            best, bad, best_row = row["val_loss"], 0, {"step": step, **row}
            to_save = model
            if lora.rank:  # save a merged copy; training goes on with the adapters
                to_save = copy.deepcopy(model)
                merge_lora(to_save)
            best_path = checkpoint.save(run_dir, step, to_save, optimizer, {"step": step},
                                        saved_config, row, keep_last=1)
            return False
        bad += 1
        return bad >= args.finetune.patience

    evaluate_and_keep()  # step 0: the base model is the first 'best'
    stopped_early = False
    bar = tqdm(total=cfg.train.max_steps, unit="step", disable=not cfg.train.progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    with StopFlag() as stop:
        while step < cfg.train.max_steps:
            if not epoch_batches:
                order = torch.randperm(len(train_ex), generator=gen).tolist()
                epoch_batches = make(train_ex, train_y, order)
            batch = epoch_batches.pop(0)
            lr = lr_at(step, cfg)
            loss = train_step(lambda _micro: forward(model, batch, device)[1], lr).loss
            step += 1
            bar.update(1)
            if step % cfg.train.log_interval == 0:
                metrics.write(kind="train", step=step, loss=loss.item(), lr=lr,
                              time_s=round(time.perf_counter() - t0, 3))
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            out_of_time = (cfg.train.max_seconds > 0
                           and time.perf_counter() - t0 >= cfg.train.max_seconds)
            if (step % cfg.eval.interval == 0 or step == cfg.train.max_steps or stop.requested
                    or out_of_time):
                if evaluate_and_keep():
                    stopped_early = True
                    break
                if stop.requested or out_of_time:  # train.max_seconds: as if max_steps were hit
                    break
    bar.close()
    summary = {"task": args.task, "run_dir": str(run_dir), "best_checkpoint": str(best_path),
               "steps": step, "stopped_early": stopped_early, "best": best_row,
               "time_s": round(time.perf_counter() - t0, 1), **extra}
    (run_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in best_row.items())
    print(f"fastlm.finetune: {'early stop' if stopped_early else 'done'} at step {step}; "
          f"best {shown} -> {best_path}")
    if "majority_baseline" in extra:
        print(f"  majority-class baseline on the validation split: "
              f"{extra['majority_baseline']:.4f}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        finetune(parse_args(sys.argv[1:] if argv is None else list(argv)))
    except (ConfigError, SetupError, TaskError, CheckpointError) as exc:
        raise SystemExit(f"fastlm.finetune: error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
