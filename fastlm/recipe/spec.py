"""A recipe file: what each stage does, read and checked whole before any work starts.

    [recipe]     name, description, device ("auto" | "cpu" | "cuda"), seed, nproc, stages
    [data]       inputs, max_bytes, val_fraction, workers, min_chars, max_symbol_ratio,
                 max_repeated_lines, near_dedup, tasks
    [tokenizer]  vocab_size, pattern, shard_tokens
    [pretrain]   torchrun, and sub-tables [pretrain.model], [pretrain.train], [pretrain.optim],
                 ... : any `python -m fastlm.train` key (fastlm.config checks them)
    [eval]       max_bytes, mc, mc_limit, generate, generate_limit, max_new_tokens, batch_size
                 (eval and eval-sft both read it, so before and after sft are scored alike)
    [sft]        data, and sub-tables [sft.train], [sft.optim], [sft.lora], [sft.finetune]:
                 any `python -m fastlm.finetune` key
    [export]     formats ("hf", "gguf"), gguf_dtype
    [serve-check] message, max_tokens

Paths are relative to the recipe file (a shipped recipe's: to the current folder).
Task and chat files: "builtin" is the data stage's deterministic set built from the Python
standard library (fastlm.eval.demo_tasks: docstring summaries as the chat set, line endings as
multiple choice), "" is none, anything else is a jsonl path (relative to the recipe file).
Every problem (an unknown section, key or stage, a wrong type, a missing file, a package a chosen
stage needs) raises RecipeError with one line that names it.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastlm.config import ConfigError, load_config
from fastlm.finetune.loop import parse_args as finetune_args

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# The stages in the order they run; each writes DIR/<stage>/ (fastlm.recipe.stages).
STAGES = ("data", "tokenizer", "pretrain", "eval", "sft", "eval-sft", "export", "serve-check",
          "report")
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"
BUILTIN = "builtin"
STDLIB = "stdlib"  # a data input: this interpreter's standard library sources


class RecipeError(ValueError):
    """The recipe cannot run as written; the message is one line naming the problem."""


@dataclass
class RecipeSection:
    name: str = "recipe"
    description: str = ""
    device: str = "auto"
    seed: int = 1337
    nproc: int = 1  # pretrain processes (torchrun when > 1)
    stages: list[str] = field(default_factory=lambda: list(STAGES))


@dataclass
class DataSection:
    inputs: list[str] = field(default_factory=lambda: [STDLIB])
    max_bytes: int = 0  # file inputs are taken in order until this many bytes (0 = all)
    val_fraction: float = 0.01
    workers: int = 0  # 0 = every core
    min_chars: int = 1
    max_symbol_ratio: float = 0.0  # 0 = off
    max_repeated_lines: float = 0.0  # 0 = off
    near_dedup: bool = True


@dataclass
class TokenizerSection:
    vocab_size: int = 4096
    pattern: str = "gpt4"
    shard_tokens: int = 50_000_000


@dataclass
class PretrainSection:
    torchrun: list[str] = field(default_factory=list)  # extra torchrun args (multi-node)
    config: dict[str, Any] = field(default_factory=dict)  # "section.key" -> value


@dataclass
class EvalSection:
    max_bytes: int = 200_000  # of held-out text scored for bits per byte
    mc: str = BUILTIN
    mc_limit: int = 200
    generate: str = ""  # BLEU/chrF needs sacrebleu (the eval extra)
    generate_limit: int = 20
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass
class SftSection:
    data: str = BUILTIN
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: ["hf", "gguf"])
    gguf_dtype: str = "f32"


@dataclass
class ServeSection:
    message: str = "Summarise: def read_text(path, encoding=None):"
    max_tokens: int = 32


@dataclass
class Recipe:
    path: Path
    recipe: RecipeSection
    data: DataSection
    tokenizer: TokenizerSection
    pretrain: PretrainSection
    eval: EvalSection
    sft: SftSection
    export: ExportSection
    serve: ServeSection
    raw: dict[str, Any]  # the file as parsed: fingerprints hash its sections

    def section(self, stage: str) -> dict[str, Any]:
        """The settings a stage's fingerprint covers (eval-sft shares [eval])."""
        key = {"eval-sft": "eval", "serve-check": "serve"}.get(stage, stage)
        own = dataclasses.asdict(getattr(self, key)) if hasattr(self, key) else {}
        return {"recipe": {k: v for k, v in dataclasses.asdict(self.recipe).items()
                           if k in ("device", "seed")}, stage: own}

    def task_file(self, spec: str, builtin_dir: Path, name: str) -> Path | None:
        if not spec:
            return None
        return builtin_dir / f"{name}.jsonl" if spec == BUILTIN else self.resolve(spec)

    def resolve(self, spec: str) -> Path:
        """A path of the recipe: relative to the recipe file, or for a shipped recipe to the
        current folder (where the user keeps the data)."""
        path = Path(os.path.expanduser(spec))
        base = Path.cwd() if self.path.parent == SHIPPED else self.path.parent
        return path if path.is_absolute() else (base / path).resolve()

    @property
    def uses_builtin_tasks(self) -> bool:
        return BUILTIN in (self.eval.mc, self.eval.generate, self.sft.data)


SECTIONS = {"recipe": RecipeSection, "data": DataSection, "tokenizer": TokenizerSection,
            "pretrain": PretrainSection, "eval": EvalSection, "sft": SftSection,
            "export": ExportSection, "serve-check": ServeSection}
PRETRAIN_TABLES = ("model", "data", "train", "optim", "eval", "checkpoint", "kernels", "sample")
SFT_TABLES = ("train", "optim", "eval", "kernels", "lora", "finetune")
# fastlm.train keys a recipe's stages set themselves: a recipe may not point them elsewhere
OWNED_KEYS = {"data.path", "data.tokenizer", "train.out_dir", "checkpoint.resume"}


def _closest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _flatten(tables: dict, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    out = {}
    for table, values in tables.items():
        if table not in allowed or not isinstance(values, dict):
            raise RecipeError(f"{where}: unknown key or table '{table}'{_closest(table, allowed)};"
                              f" tables: {', '.join(allowed)}")
        for key, value in values.items():
            out[f"{table}.{key}"] = value
    return out


def _fill(cls, values: dict, where: str):
    """cls(**values), with one-line errors for unknown keys and wrong types."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise RecipeError(f"{where}: unknown key '{key}'{_closest(key, names)}; keys: "
                              f"{', '.join(names)}")
        default = names[key].default_factory() if callable(names[key].default_factory) \
            else names[key].default
        kind = type(default)
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise RecipeError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return cls(**values)


def cli_args(config: dict[str, Any]) -> list[str]:
    """--section.key=value arguments, as the commands' parsers read them."""
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return [f"--{k}={text(v)}" for k, v in config.items()]


def _check_config(overrides: dict[str, Any], where: str, sft: bool = False) -> None:
    owned = sorted(OWNED_KEYS & set(overrides))
    if owned:
        raise RecipeError(f"{where}: {owned[0]} is set by the recipe's stages; remove it")
    try:
        if sft:  # the finetune parser checks its own [lora] and [finetune] keys too
            finetune_args(["--checkpoint=-", "--task=sft", "--data=-", "--out=-",
                           *cli_args(overrides)])
        else:
            load_config(overrides=overrides)
    except ConfigError as exc:
        raise RecipeError(f"{where}: {str(exc).splitlines()[0]}") from None


def _need(module: str, package: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RecipeError(f"{why} needs the package '{package}' (pip install {package})")


def parse(path: str | Path, nproc: int | None = None) -> Recipe:
    """The recipe at path (or the shipped recipe of that name), checked; RecipeError if not."""
    path = Path(path)
    if not path.is_file() and (SHIPPED / f"{path.name}.toml").is_file():
        path = SHIPPED / f"{path.name}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml")))
        raise RecipeError(f"{path}: no such recipe file (shipped recipes: {shipped})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    for name in raw:
        if name not in SECTIONS:
            raise RecipeError(f"{path}: unknown section [{name}]{_closest(name, SECTIONS)}; "
                              f"sections: {', '.join(SECTIONS)}")
    where = path.name
    tables = {name: dict(raw.get(name, {})) for name in SECTIONS}
    pre = tables["pretrain"]
    pre_config = _flatten({k: pre.pop(k) for k in list(pre) if isinstance(pre[k], dict)},
                          PRETRAIN_TABLES, f"{where} [pretrain]")
    sft = tables["sft"]
    sft_config = _flatten({k: sft.pop(k) for k in list(sft) if isinstance(sft[k], dict)},
                          SFT_TABLES, f"{where} [sft]")
    recipe = Recipe(
        path=path.resolve(),
        recipe=_fill(RecipeSection, tables["recipe"], f"{where} [recipe]"),
        data=_fill(DataSection, tables["data"], f"{where} [data]"),
        tokenizer=_fill(TokenizerSection, tables["tokenizer"], f"{where} [tokenizer]"),
        pretrain=_fill(PretrainSection, {**pre, "config": pre_config}, f"{where} [pretrain]"),
        eval=_fill(EvalSection, tables["eval"], f"{where} [eval]"),
        sft=_fill(SftSection, {**sft, "config": sft_config}, f"{where} [sft]"),
        export=_fill(ExportSection, tables["export"], f"{where} [export]"),
        serve=_fill(ServeSection, tables["serve-check"], f"{where} [serve-check]"),
        raw=raw)
    if nproc is not None:
        recipe.recipe.nproc = nproc
    _check(recipe, where)
    return recipe


def _check(r: Recipe, where: str) -> None:
    """Everything that can be known wrong before any work starts."""
    for stage in r.recipe.stages:
        if stage not in STAGES:
            raise RecipeError(f"{where} [recipe] stages: unknown stage '{stage}'"
                              f"{_closest(stage, STAGES)}; stages: {', '.join(STAGES)}")
    if r.recipe.nproc < 1:
        raise RecipeError(f"{where} [recipe] nproc must be >= 1, got {r.recipe.nproc}")
    if r.recipe.device not in ("auto", "cpu", "cuda") and not r.recipe.device.startswith("cuda:"):
        raise RecipeError(f"{where} [recipe] device: auto, cpu, cuda or cuda:N, got "
                          f"{r.recipe.device!r}")
    if r.recipe.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"{where} [recipe] device = {r.recipe.device!r}, but torch "
                          f"{torch.__version__} sees no CUDA GPU here")
    if not 0.0 <= r.data.val_fraction < 1.0 or r.data.val_fraction == 0.0:
        raise RecipeError(f"{where} [data] val_fraction must be in (0, 1) (eval scores held-out "
                          f"text), got {r.data.val_fraction}")
    for item in r.data.inputs:
        if item == STDLIB or item.startswith("hf:"):
            continue
        spec = str(r.resolve(item))
        if not Path(spec).exists() and not glob.glob(spec, recursive=True):
            raise RecipeError(f"{where} [data] inputs: {item}: no such file, folder or glob")
    for key, spec in (("eval] mc", r.eval.mc), ("eval] generate", r.eval.generate),
                      ("sft] data", r.sft.data)):
        if spec and spec != BUILTIN and not r.resolve(spec).is_file():
            raise RecipeError(f"{where} [{key}: {spec}: no such file")
    for fmt in r.export.formats:
        if fmt not in ("hf", "gguf"):
            raise RecipeError(f"{where} [export] formats: unknown format '{fmt}' (hf, gguf)")
    _check_config(r.pretrain.config, f"{where} [pretrain]")
    _check_config(r.sft.config, f"{where} [sft]", sft=True)
    stages = set(r.recipe.stages)
    if "serve-check" in stages:
        for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                ("openai", "openai")):
            _need(module, package, f"{where}: the serve-check stage")
    if "export" in stages and "gguf" in r.export.formats:
        _need("gguf", "gguf", f"{where}: [export] formats = gguf")
    if stages & {"eval", "eval-sft"} and r.eval.generate:
        _need("sacrebleu", "sacrebleu", f"{where}: [eval] generate (BLEU/chrF)")
