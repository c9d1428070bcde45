"""fastlm.config: precedence (defaults < preset < TOML < CLI), presets, and every kind of error
naming the key at fault."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from fastlm.config import (
    SECTIONS,
    Config,
    ConfigError,
    ModelConfig,
    list_presets,
    load_config,
    model_preset,
    parse_args,
    to_toml,
)


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_train_the_tiny_preset():
    cfg = parse_args([])
    assert cfg.model == model_preset("tiny")
    assert cfg.model.arch == "gpt2" and cfg.model.vocab_size == 256
    assert cfg.kernels.backend == ""
    assert cfg.seq_len == cfg.model.block_size  # train.seq_len = 0 means the model's context


def test_precedence_defaults_preset_file_cli(tmp_path):
    path = write(tmp_path, """
[model]
preset = "tiny-llama"
n_layer = 3
[optim]
lr = 2e-3
warmup_steps = 7
""")
    cfg = parse_args(["--config", path, "--optim.lr=3e-3", "--train.batch_size", "5"])
    assert cfg.model.arch == "llama" and cfg.model.n_kv_head == 2  # from the preset
    assert cfg.model.n_layer == 3  # file over preset
    assert cfg.optim.warmup_steps == 7  # file over default
    assert cfg.optim.lr == 3e-3  # CLI over file
    assert cfg.train.batch_size == 5  # "--key value" form
    assert cfg.optim.min_lr == Config().optim.min_lr  # untouched default


def test_cli_preset_applies_under_file_model_keys(tmp_path):
    # The preset is chosen first wherever it is set; explicit model keys land on top of it.
    path = write(tmp_path, "[model]\nn_embd = 64\n")
    cfg = parse_args(["--config", path, "--model.preset=tiny-llama", "--model.n_head=2"])
    assert (cfg.model.preset, cfg.model.arch, cfg.model.n_embd, cfg.model.n_head) == (
        "tiny-llama", "llama", 64, 2)


def test_aliases_and_value_syntax():
    cfg = parse_args(["--data", "some/file.txt", "--out=runs/x", "--optim.betas=0.8,0.9",
                      "--train.progress=false", "--model.bias", "no", "--kernels.backend=cpu"])
    assert cfg.data.path == "some/file.txt" and cfg.train.out_dir == "runs/x"
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.progress is False and cfg.model.bias is False
    assert cfg.kernels.backend == "cpu"


def test_toml_round_trip(tmp_path):
    cfg = parse_args(["--model.preset=tiny-llama", "--sample.prompt=a \"quoted\"\tline\n",
                      "--optim.betas=0.9,0.99", "--train.max_steps=3"])
    path = write(tmp_path, to_toml(cfg))
    assert load_config(path) == cfg


def test_empty_preset_uses_dataclass_defaults():
    cfg = parse_args(["--model.preset="])
    assert cfg.model == ModelConfig(preset="")


@pytest.mark.parametrize("argv, expected", [
    # unknown section / key, with a suggestion
    (["--modle.n_layer=2"], "unknown config section 'modle'.*Did you mean 'model'"),
    (["--model.n_layers=2"], "unknown key 'model.n_layers'.*Did you mean 'model.n_layer'"),
    # wrong types
    (["--model.n_layer=two"], "model.n_layer: expected an integer, got 'two'"),
    (["--model.n_layer=2.5"], "model.n_layer: expected an integer"),
    (["--optim.lr=fast"], "optim.lr: expected a number"),
    (["--train.progress=maybe"], r"train.progress: expected a boolean \(true/false\)"),
    (["--optim.betas=0.9"], "optim.betas: expected a list of 2 numbers"),
    # out of range
    (["--model.n_layer=0"], "model.n_layer: must be >= 1, got 0"),
    (["--optim.lr=0"], "optim.lr: must be > 0.0, got 0.0"),
    (["--optim.lr=nan"], "optim.lr: must be a finite number"),
    (["--model.dropout=1.5"], "model.dropout: must be <= 0.99, got 1.5"),
    (["--optim.betas=0.9,1.5"], "optim.betas: must be <= 0.999999, got 1.5"),
    # unknown choices
    (["--model.arch=gpt3"], "model.arch: must be one of gpt2, llama.*; got 'gpt3'"),
    (["--optim.schedule=exp"], "optim.schedule: must be one of cosine, linear, constant, wsd"),
    (["--model.preset=huge"], "model.preset: unknown preset 'huge'; presets are .*tiny-llama"),
    (["--train.device=tpu"], "train.device: must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    # relations between keys
    (["--model.n_head=5"], r"model.n_embd \(128\) must be divisible by model.n_head \(5\)"),
    (["--model.preset=tiny-llama", "--model.n_kv_head=3"],
     r"model.n_head \(4\) must be divisible by model.n_kv_head \(3\)"),
    (["--model.preset=tiny-llama", "--model.n_embd=12", "--model.n_head=4"],
     "RoPE needs an even head size"),
    (["--train.seq_len=4096"], r"train.seq_len \(4096\) must be <= model.block_size \(128\)"),
    (["--optim.min_lr=1"], r"optim.min_lr \(1.0\) must be <= optim.lr"),
    # malformed arguments
    (["train.max_steps=3"], "unexpected argument 'train.max_steps=3'"),
    (["--steps=3"], "unknown option '--steps'"),
    (["--train.max_steps"], "--train.max_steps needs a value"),
    (["--config", "/nonexistent/run.toml"], "--config: cannot read /nonexistent/run.toml"),
])
def test_cli_errors_name_the_key(argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_args(argv)


def test_cli_errors_say_where_the_value_came_from(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = \"10\"\n")
    with pytest.raises(ConfigError, match=rf"train.max_steps: expected an integer, got '10' "
                                          rf"\(from {path}\)"):
        parse_args(["--config", path])


@pytest.mark.parametrize("text, expected", [
    ("[model]\nn_layer = true\n", "model.n_layer: expected an integer, got True"),
    ("[model]\nbias = 1\n", "model.bias: expected a boolean"),
    ("[optim]\nlr = \"1e-3\"\n", "optim.lr: expected a number, got '1e-3'"),
    ("[optim]\nbetas = [0.9, 0.95, 0.99]\n", "optim.betas: expected a list of 2 numbers.*3 items"),
    ("[data]\npath = 3\n", "data.path: expected a string, got 3"),
    ("[trian]\nmax_steps = 3\n", "unknown config section 'trian'.*Did you mean 'train'"),
    ("[train]\nmax_step = 3\n", "unknown key 'train.max_step'"),
    ("max_steps = 3\n", "'max_steps' must be a \\[section\\] table"),
    ("[train\nmax_steps = 3\n", "not valid TOML"),
])
def test_toml_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_args(["--config", write(tmp_path, text)])


def test_int_is_accepted_for_float_in_toml(tmp_path):
    cfg = parse_args(["--config", write(tmp_path, "[optim]\nlr = 1\nmin_lr = 0\n")])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_help_exits_zero_and_lists_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--model.n_layer=" in out and "--kernels.backend=" in out and "tiny-llama" in out


def test_presets_exist_and_have_published_shapes():
    assert {"tiny", "tiny-llama", "gpt2-124m", "gpt2-350m", "llama-125m"} <= set(list_presets())
    from fastlm.models.gpt import GPT
    expected = {"gpt2-124m": 124_439_808, "gpt2-350m": 354_823_168}  # GPT-2 small / medium
    for name in list_presets():
        cfg = model_preset(name)
        assert cfg.preset == name
        with torch.device("meta"):  # shapes only, no memory
            n = GPT(cfg).num_params()
        if name in expected:
            assert n == expected[name], name
    llama = model_preset("llama-125m")
    assert (llama.arch, llama.n_layer, llama.n_embd, llama.n_head, llama.n_kv_head,
            llama.hidden) == ("llama", 12, 768, 12, 4, 2048)
    with torch.device("meta"):
        assert 115e6 < GPT(llama).num_params() < 135e6


def test_recipe_preset_sets_other_sections_below_the_command_line(tmp_path):
    cfg = parse_args(["--model.preset=shakespeare_char_cpu", "--train.max_steps=7"])
    assert (cfg.model.n_layer, cfg.model.block_size, cfg.model.bias) == (4, 64, False)
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.betas) == (12, 1e-3, (0.9, 0.99))
    assert cfg.train.max_steps == 7  # the command line wins
    assert "train.batch_size" not in cfg.explicit  # preset values are not explicit settings
    path = write(tmp_path, "[model]\npreset = \"shakespeare_char_cpu\"\n[eval]\ninterval = 5\n")
    cfg = parse_args(["--config", path])
    assert cfg.eval.interval == 5 and cfg.eval.batches == 20  # file over preset


def test_model_preset_unknown_name():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        model_preset("gpt5")


@pytest.mark.parametrize("argv, expected", [
    (["--train.precision=fp8"],
     "train.precision: must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    (["--train.parallel=tp"], "train.parallel: must be one of ddp, fsdp; got 'tp'"),
    (["--model.gelu=relu"], "model.gelu: must be one of tanh, exact; got 'relu'"),
])
def test_choices_are_the_literal_types(argv, expected):
    """A field's Literal type is its one list of allowed values: checked and named."""
    section, key = argv[0][2:].partition("=")[0].split(".")
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)
    assert typing.get_origin(typing.get_type_hints(SECTIONS[section])[key]) is typing.Literal
    assert "choices" not in field.metadata
    with pytest.raises(ConfigError, match=expected):
        parse_args(argv)


def test_choice_of_the_wrong_type_says_what_is_expected(tmp_path):
    with pytest.raises(ConfigError, match="optim.name: expected a string, got 3"):
        parse_args(["--config", write(tmp_path, "[optim]\nname = 3\n")])


def test_explicit_keys_are_a_declared_field_not_compared():
    cfg = parse_args(["--train.max_steps=7", "--optim.lr=1e-3"])
    assert cfg.explicit == {"train.max_steps", "optim.lr"}
    assert Config().explicit == frozenset() and "explicit" not in SECTIONS
    assert dataclasses.replace(cfg, explicit=frozenset()) == cfg  # settings, not their origin

