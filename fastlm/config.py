"""Typed configuration for training: one dataclass per section, defaults < TOML file < CLI.

    python -m fastlm.train --config run.toml --model.preset=tiny-llama --optim.lr=1e-3

Precedence, lowest first: the dataclass defaults below, the model preset (fastlm/configs/NAME.toml,
chosen by model.preset from wherever it is set; a preset holds a [model] table and may hold other
sections, e.g. a recipe's [train] and [optim]), the TOML file given with --config, then
`--section.key=value` on the command line. Every value is checked once, after merging: unknown
sections or keys, wrong types, values out of range and unknown choices raise ConfigError with a
message naming the key (`section.key`), where the value came from and what is allowed, so a run
fails before it loads data or builds a model.

A field that offers a fixed set of values is typed Literal[...], the one list of what is allowed
(checked, and named in the error). Field metadata carries the other checks: `min`/`max`
(inclusive), `gt` (exclusive lower bound), and `help` (shown by `python -m fastlm.train --help`).
model.arch is open (architectures register themselves), so fastlm.models.registry checks it.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastlm.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib


def _f(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


# ---------------------------------------------------------------------------------------------
# Sections
@dataclass
class ModelConfig:
    """Architecture and shape of the model (fastlm.models: `arch` picks the registered class;
    keys that only one family reads say so in their help)."""
    preset: str = _f("tiny", "named preset from fastlm/configs/NAME.toml ('' = none); "
                             "other model.* keys apply on top of it")
    arch: str = _f("gpt2", "model family (python -m fastlm.train --help lists them): gpt2 "
                           "(learned positions, LayerNorm, GELU), llama (RoPE, RMSNorm, SwiGLU, "
                           "GQA), bert, lstm, gru, gcnn")
    vocab_size: int = _f(50257, "number of token ids", min=1)
    block_size: int = _f(1024, "longest context (positions) the model supports", min=1)
    n_layer: int = _f(12, "transformer blocks", min=1)
    n_head: int = _f(12, "query heads", min=1)
    n_kv_head: int = _f(0, "key/value heads for grouped-query attention (0 = n_head)", min=0)
    n_embd: int = _f(768, "model width", min=1)
    mlp_hidden: int = _f(0, "MLP hidden width (0 = 4*n_embd for gpt2, ~8/3*n_embd rounded up "
                            "to a multiple of 256 for llama)", min=0)
    bias: bool = _f(True, "biases in linear layers and LayerNorm (gpt2 flavour)")
    tie_embeddings: bool = _f(True, "share the token embedding with the output head")
    dropout: float = _f(0.0, "dropout on embeddings and residual branches", min=0.0, max=0.99)
    norm_eps: float = _f(1e-5, "epsilon of LayerNorm/RMSNorm", gt=0.0)
    rope_theta: float = _f(10000.0, "RoPE base frequency (llama flavour)", gt=0.0)
    gelu: Literal["tanh", "exact"] = _f(
        "tanh", "gpt2 MLP activation: tanh (GPT-2's approximation, HF gelu_new) or exact (erf; "
                "nanoGPT's nn.GELU, HF gelu; 3x cheaper on CPUs)")
    mlm_probability: float = _f(0.15, "bert: share of tokens the masked-LM objective predicts "
                                      "(of those: 80% [MASK], 10% random, 10% kept)",
                                gt=0.0, max=1.0)
    type_vocab_size: int = _f(2, "bert: number of token-type (segment) ids", min=1)
    conv_kernel: int = _f(4, "gcnn: width of each causal convolution", min=1)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        """The MLP hidden width after applying the flavour's default."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 256 * math.ceil(8 * self.n_embd / 3 / 256)  # Llama's SwiGLU width, multiple_of=256

    def validate(self) -> None:
        _check_fields("model", self)
        # Late: importing the registry first runs fastlm.models' __init__, whose model classes
        # import this module (they take a ModelConfig), so it can only run once this module is
        # loaded; it also keeps torch out of importing fastlm.config.
        from fastlm.models import registry
        check = getattr(registry.get(self.arch).cls, "check_config", None)
        if check is not None:
            check(self)


@dataclass
class DataConfig:
    """What to train on (fastlm.train_data): raw text or prepared shards, and the tokenizer."""
    path: str = _f("", "text file, folder or glob ('' = the Python standard library's .py "
                       "files), or prepared shards: a `python -m fastlm.data prepare` folder "
                       "or an llm.c folder/glob of .bin files")
    tokenizer: str = _f("byte", "'byte' or a fastlm tokenizer file (tokenizer.json); "
                                "model.vocab_size follows it")
    max_bytes: int = _f(8_000_000, "read at most this many training bytes (0 = all)", min=0)
    val_fraction: float = _f(0.1, "share of files (by hash of their path) held out for "
                                  "validation", gt=0.0, max=0.5)


@dataclass
class TrainConfig:
    """The training loop (fastlm.train)."""
    out_dir: str = _f("", "run directory ('' = runs/<timestamp>)")
    device: str = _f("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    seed: int = _f(1337, "seed for weights, batches and sampling", min=0)
    max_steps: int = _f(1500, "optimizer steps", min=1)
    max_seconds: float = _f(0.0, "also stop once this many seconds of wall clock have passed since "
                                 "training started (evaluations included; 0 = no limit): the "
                                 "step in flight completes, then the run evaluates and saves "
                                 "as at max_steps (fastlm.compare's per-arch budget)", min=0.0)
    batch_size: int = _f(16, "sequences per micro-batch", min=1)
    seq_len: int = _f(0, "tokens per sequence (0 = model.block_size)", min=0)
    grad_accum: int = _f(1, "micro-batches per optimizer step (per process)", min=1)
    tokens_per_step: int = _f(0, "target tokens per optimizer step over all processes; sets "
                                 "grad_accum = tokens_per_step / (batch_size * seq_len * "
                                 "processes), which must divide exactly (0 = use grad_accum)",
                              min=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off; the norm is "
                               "logged either way)", min=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "auto (bf16 where the hardware computes bf16 natively: CUDA sm_80+, CPUs with "
                "avx512_bf16 or amx_bf16; else fp32; a resumed run keeps its checkpoint's); "
                "fp32; bf16 (autocast); fp16 (autocast + gradient scaler)")
    compile: Literal["auto", "true", "false"] = _f(
        "auto", "torch.compile the model: auto = on on GPU, off on CPU")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in the "
                                               "backward instead of keeping them (less memory)")
    parallel: Literal["ddp", "fsdp"] = _f("ddp", "under torchrun: ddp (replicated weights) or "
                                                "fsdp (FSDP2 fully_shard per block)")
    max_bad_steps: int = _f(5, "a step whose loss or gradient norm is NaN/inf is skipped; stop "
                               "after this many in a row", min=1)
    log_interval: int = _f(10, "steps between training-loss lines in metrics.jsonl", min=1)
    progress: bool = _f(True, "show a tqdm progress bar")
    tensorboard: bool = _f(True, "also write the metrics as TensorBoard scalars to "
                                 "RUN_DIR/tensorboard (when the tensorboard package is installed)")


@dataclass
class OptimConfig:
    """The optimizer (fastlm.optim) and the learning-rate schedule (fastlm.schedule)."""
    name: Literal["adamw", "sgd"] = _f("adamw", "adamw or sgd")
    lr: float = _f(3e-3, "peak learning rate (tuned for the tiny default run; ~6e-4 suits "
                         "gpt2-124m)", gt=0.0)
    min_lr: float = _f(3e-4, "learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = _f(100, "linear warmup steps from 0 to lr", min=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = _f(
        "cosine", "after warmup: cosine or linear decay to min_lr, constant, or wsd (stable, then "
                  "linear decay over the last decay_fraction of the steps)")
    decay_fraction: float = _f(0.2, "wsd: share of max_steps spent decaying", min=0.0, max=1.0)
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas, e.g. --optim.betas=0.9,0.95",
                                    min=0.0, max=0.999999)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0.0)
    weight_decay: float = _f(0.1, "decoupled weight decay (not on norms, biases, embeddings)",
                             min=0.0)
    momentum: float = _f(0.9, "sgd momentum (0 = plain SGD)", min=0.0, max=0.999999)
    nesterov: bool = _f(False, "sgd: Nesterov momentum")


@dataclass
class EvalConfig:
    """Periodic validation (loss and bits per byte)."""
    interval: int = _f(100, "steps between validation runs (and at the end)", min=1)
    batches: int = _f(8, "fixed validation batches per run", min=1)


@dataclass
class CheckpointConfig:
    """Checkpoints under RUN_DIR/checkpoints (fastlm.checkpoint)."""
    interval: int = _f(0, "steps between checkpoints (0 = only at the end and on Ctrl-C)", min=0)
    keep_last: int = _f(3, "keep this many most recent checkpoints (plus the best)", min=1)
    resume: str = _f("", "checkpoint directory (or run directory: its latest) to resume from; "
                         "'latest' = train.out_dir's latest checkpoint, if any")
    overwrite: bool = _f(False, "start again in a train.out_dir that holds another run (its "
                                "checkpoints, metrics and logs are deleted first); never saved "
                                "as true in config.toml")


@dataclass
class KernelsConfig:
    """Which op backends to use (fastlm.ops.set_backend)."""
    backend: str = _f("", "'' = automatic, one backend ('cpu'), or per op "
                          "('layer_norm=cpu,rms_norm=reference'); FASTLM_BACKEND overrides it")


@dataclass
class SampleConfig:
    """The text sample printed at the end of training."""
    tokens: int = _f(200, "tokens to generate (0 = no sample)", min=0)
    prompt: str = _f("def ", "text to continue")
    temperature: float = _f(0.8, "softmax temperature", gt=0.0)
    top_k: int = _f(0, "sample among the k most likely tokens (0 = all)", min=0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # Not a section: the "section.key" names set by a file or the command line (not defaults or
    # presets), filled by load_config. A derived value such as model.vocab_size (from the
    # tokenizer) may replace only what nobody asked for.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def validate(self) -> None:
        """Every field's own checks, then the checks that relate fields."""
        for name in SECTIONS:
            section = getattr(self, name)
            section.validate() if hasattr(section, "validate") else _check_fields(name, section)
        if self.model.preset:  # a bad preset name fails here with the list of presets
            _preset_values(self.model.preset)
        if self.train.seq_len > self.model.block_size:
            raise ConfigError(f"train.seq_len ({self.train.seq_len}) must be <= "
                              f"model.block_size ({self.model.block_size})")
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"optim.min_lr ({self.optim.min_lr}) must be <= optim.lr "
                              f"({self.optim.lr})")
        if self.optim.nesterov and self.optim.name == "sgd" and self.optim.momentum == 0:
            raise ConfigError("optim.nesterov needs optim.momentum > 0")
        dev = self.train.device
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", dev):
            raise ConfigError(f"train.device: must be auto, cpu, cuda, cuda:N or mps; got '{dev}'")

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)
                             if f.name != "explicit"}


# ---------------------------------------------------------------------------------------------
# Checking and converting values
@typing.no_type_check
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} numbers" if args[0] is float else f"a {len(args)}-list"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}[tp]


def _convert(key: str, value: Any, tp: Any, source: str, text: bool = False) -> Any:
    """A value of type `tp` from a TOML/Python value, or (text=True) from command-line text;
    ConfigError if it is not one."""
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}{extra} "
                           f"(from {source})")

    if typing.get_origin(tp) is Literal:  # converted as its values' type; _check_value checks it
        return _convert(key, value, type(typing.get_args(tp)[0]), source, text)
    if text and isinstance(value, str) and tp is not str:
        text = value.strip()
        try:
            if tp is bool:
                lowered = text.lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise bad()
            if tp is int:
                return int(text)
            if tp is float:
                return float(text)
            if typing.get_origin(tp) is tuple:
                parts = [p for p in text.strip("[]()").split(",") if p.strip()]
                return _convert(key, [float(p) for p in parts], tp, source)
        except ValueError:
            raise bad() from None
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f" with {len(value)} items" if isinstance(value, (list, tuple)) else "")
        return tuple(_convert(key, v, a, source) for v, a in zip(value, args))
    raise TypeError(f"config type {tp} of {key} is not supported")  # a bug in this file


def _check_value(key: str, value: Any, tp: Any, meta: dict[str, Any], source: str = "") -> None:
    where = f" (from {source})" if source else ""
    choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if choices is not None and v not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {v!r}{where}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v}{where}")
        if isinstance(v, int) and not -2**63 <= v < 2**63:  # torch and numpy take int64 at most
            raise ConfigError(f"{key}: {v} does not fit a 64-bit integer{where}")
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{key}: must be >= {meta['min']}, got {v}{where}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{key}: must be <= {meta['max']}, got {v}{where}")
        if "gt" in meta and v <= meta["gt"]:
            raise ConfigError(f"{key}: must be > {meta['gt']}, got {v}{where}")


def _check_fields(section: str, obj: Any) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        value = getattr(obj, f.name)
        _convert(key, value, hints[f.name], "the config object")  # type check
        _check_value(key, value, hints[f.name], dict(f.metadata))


def _unknown(what: str, name: str, known: list[str], source: str,
             section: str = "") -> ConfigError:
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown {what} (from {source}).{hint} "
                       f"Known {'keys of [' + section + ']' if section else 'sections'}: "
                       f"{', '.join(known)}")


# ---------------------------------------------------------------------------------------------
# Presets
def list_presets() -> list[str]:
    """Names of the model presets shipped in fastlm/configs/."""
    root = importlib.resources.files("fastlm") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def _preset_data(name: str) -> dict[str, Any]:
    """The tables of preset `name`: a [model] table, and optionally other sections (a recipe
    such as shakespeare_char_cpu also sets [train], [optim], ...)."""
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"model.preset: unknown preset '{name}'; presets are "
                          f"{', '.join(presets)}")
    source = f"fastlm/configs/{name}.toml"
    text = (importlib.resources.files("fastlm") / "configs" / f"{name}.toml").read_text()
    data = _parse_toml(text, source)
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"{source}: a preset needs a [model] table, found {sorted(data)}")
    if "preset" in data["model"]:
        raise ConfigError(f"{source}: a preset cannot name another preset")
    return data


def _preset_values(name: str) -> dict[str, Any]:
    return _preset_data(name)["model"]


def _preset_sections(name: str) -> Raw:
    """The preset's tables other than [model], checked like a --config file's."""
    raw: Raw = {}
    source = f"fastlm/configs/{name}.toml"
    for section, table in _preset_data(name).items():
        if section == "model":
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{section}' must be a [section] table of keys")
        for key, value in table.items():
            _add_raw(raw, section, key, value, source)
    return raw


def model_preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset ("tiny", "tiny-llama", "gpt2-124m", ...)."""
    cfg = ModelConfig(preset=name)
    _apply(cfg, "model", {k: (v, f"fastlm/configs/{name}.toml", False)
                          for k, v in _preset_values(name).items()})
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading
# section -> key -> (value, where it came from, whether it is command-line text to parse)
Raw = dict[str, dict[str, tuple[Any, str, bool]]]


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def _add_raw(raw: Raw, section: str, key: str, value: Any, source: str,
             text: bool = False) -> None:
    if section not in SECTIONS:
        raise _unknown(f"config section '{section}'", section, list(SECTIONS), source)
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in keys:
        raise _unknown(f"key '{section}.{key}'", key, keys, source, section)
    raw.setdefault(section, {})[key] = (value, source, text)


def _raw_from_toml(path: str | Path, raw: Raw) -> None:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config: {path} is not UTF-8 text (byte {exc.start}); TOML files "
                          "are UTF-8") from None
    for section, table in _parse_toml(text, str(path)).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{section}' must be a [section] table of keys, "
                              f"got {table!r}")
        for key, value in table.items():
            _add_raw(raw, section, key, value, str(path))


def _apply(obj: Any, section: str, values: dict[str, tuple[Any, str, bool]]) -> None:
    hints = _hints(type(obj))
    meta = {f.name: dict(f.metadata) for f in dataclasses.fields(obj)}
    for key, (value, source, text) in values.items():
        name = f"{section}.{key}"
        converted = _convert(name, value, hints[key], source, text)
        _check_value(name, converted, hints[key], meta[key], source)
        setattr(obj, key, converted)


def load_config(config_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """The resolved Config: defaults < model preset < TOML file < overrides.

    overrides maps "section.key" to a value: a Python value of the field's type, or a string as
    typed on the command line ("3e-4", "true", "0.9,0.95").
    """
    raw: Raw = {}
    if config_file is not None:
        _raw_from_toml(config_file, raw)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"'{dotted}': options are written section.key=value, "
                              f"e.g. model.n_layer=4")
        _add_raw(raw, section, key, value, "the command line", isinstance(value, str))
    cfg = Config()
    model_raw = raw.get("model", {})
    if "preset" in model_raw:
        value, source, _ = model_raw["preset"]
        cfg.model.preset = _convert("model.preset", value, str, source)
    if cfg.model.preset:
        cfg.model = model_preset(cfg.model.preset)
        for section, values in _preset_sections(cfg.model.preset).items():
            _apply(getattr(cfg, section), section, values)
    for section, values in raw.items():
        _apply(getattr(cfg, section), section, values)
    cfg.validate()
    cfg.explicit = frozenset(f"{s}.{k}" for s, values in raw.items() for k in values)
    return cfg


# ---------------------------------------------------------------------------------------------
# Command line
USAGE = """usage: python -m fastlm.train [--config FILE.toml] [--data PATH] [--out RUN_DIR]
                             [--tokenizer byte|FILE] [--resume [PATH]] [--overwrite]
                             [--section.key=value ...]
       torchrun --nproc_per_node=N -m fastlm.train ...   (DDP or FSDP2: --train.parallel)

  --config FILE.toml  settings file ([section] tables of key = value)
  --data PATH         text file, folder or glob, or prepared shards (same as --data.path)
  --out RUN_DIR       run directory (same as --train.out_dir)
  --tokenizer T       byte or a tokenizer file (same as --data.tokenizer)
  --resume [PATH]     continue from PATH (a checkpoint or run directory); bare: from --out's
                      latest checkpoint if it has one (same as --checkpoint.resume)
  --overwrite         --out holds another run: delete its run files and start again there
                      (same as --checkpoint.overwrite=true; without either flag such an
                      --out is refused)
  --section.key=V     any key below; precedence: defaults < preset < --config < command line
"""


def help_text() -> str:
    lines = [USAGE, f"model presets: {', '.join(list_presets())}"]
    default = load_config()  # with the default preset applied: the values a bare run uses
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]  {cls.__doc__}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(default, section), f.name)
            shown = _toml_value(value)
            if isinstance(value, str) and value and not any(c.isspace() for c in value):
                shown = value  # plain words need no quotes on a command line
            if isinstance(value, tuple):
                shown = ",".join(map(str, value))
            lines.append(f"  --{section}.{f.name}={shown}  {f.metadata['help']}")
    return "\n".join(lines)


ALIASES = {"--data": "data.path", "--out": "train.out_dir", "--tokenizer": "data.tokenizer",
           "--resume": "checkpoint.resume", "--overwrite": "checkpoint.overwrite"}


def parse_args(argv: list[str]) -> Config:
    """Config from command-line arguments; ConfigError names the bad argument.

    Accepts `--key=value` and `--key value`. `--help` raises SystemExit(0) after printing."""
    config_file = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}'; options look like "
                              "--section.key=value (see --help)")
        name, eq, value = arg[2:].partition("=")
        if name == "resume" and not eq and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
            value, eq = "latest", "="  # bare --resume: the run directory's latest checkpoint
        if name == "overwrite" and not eq:
            value, eq = "true", "="  # a bare flag
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_file = value
        elif f"--{name}" in ALIASES:
            overrides[ALIASES[f"--{name}"]] = value
        elif "." in name:
            overrides[name] = value
        else:
            raise ConfigError(f"unknown option '--{name}'; options are --config, --data, --out, "
                              "--tokenizer, --resume, --overwrite and --section.key=value "
                              "(see --help)")
    return load_config(config_file, overrides)


# ---------------------------------------------------------------------------------------------
# Writing (tomllib only reads)
def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {s: {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = "".join(c if c.isprintable() and c not in '"\\' else
                          f"\\u{ord(c):04x}" for c in value)
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The config as a TOML file that --config reads back to the same Config."""
    out = []
    for section, values in to_dict(cfg).items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)
