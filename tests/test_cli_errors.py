"""Bad input to the commands ends in one line naming the file, key or value (issue 19): a
non-UTF-8 --config, integers past int64, CPU out of memory, Hugging Face directories that are
truncated or of the wrong shape, a chat line that is not UTF-8."""
import os
import subprocess
import sys

import pytest

from fastlm.config import ConfigError, parse_args
from fastlm.export.hf import ExportError, export_hf, import_hf
from fastlm.generate.decode import main as generate_main
from fastlm.train import loop
from tests.lm_fixtures import save_checkpoint, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_not_utf8(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[train]\nseed = 1 # \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c.toml is not UTF-8"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("argv", [["--train.seed=18446744073709551616"],
                                  ["--train.batch_size=99999999999999999999"]])
def test_integers_past_int64(argv):
    with pytest.raises(ConfigError, match="does not fit a 64-bit integer"):
        parse_args(argv)


def test_toml_integer_past_int64(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nseed = 99999999999999999999\n")
    with pytest.raises(ConfigError, match=r"train.seed: .*64-bit.*c.toml"):
        parse_args(["--config", str(path)])


def test_generate_seed_past_int64(tmp_path, capsys):
    save_checkpoint(tmp_path, tiny_model())
    assert generate_main(["--checkpoint", str(tmp_path), "--prompt", "a",
                          "--seed", str(2**64)]) == 2
    assert "seed must be" in capsys.readouterr().err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                 "memory: you tried to allocate 1099511627776 bytes."),
    MemoryError()])
def test_cpu_out_of_memory_is_advice(monkeypatch, error):
    def train(cfg):
        raise error

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(SystemExit, match="out of memory.*--train.batch_size"):
        loop.main(["--train.max_steps=1"])


@pytest.fixture
def hf_dir(tmp_path):
    out = tmp_path / "hf"
    export_hf(tiny_model("llama"), out)
    return out


def test_hf_truncated_safetensors(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="model.safetensors: not a readable safetensors"):
        import_hf(hf_dir)


@pytest.mark.parametrize("name,content,message", [
    ("config.json", "[]", "config.json: the model config must be a JSON dict"),
    ("model.safetensors.index.json", "[]", "index.json: a sharded index must be a JSON dict"),
    ("model.safetensors.index.json", '{"weight_map": {"w": "../outside.safetensors"}}',
     "shard '../outside.safetensors' is not"),
    ("model.safetensors.index.json", '{"weight_map": {"w": "/etc/passwd"}}', "is not"),
])
def test_hf_files_of_the_wrong_shape(hf_dir, name, content, message):
    (hf_dir / name).write_text(content)
    with pytest.raises(ExportError, match=message):
        import_hf(hf_dir)


def test_chat_survives_a_line_that_is_not_utf8(tmp_path):
    save_checkpoint(tmp_path, tiny_model())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:surrogateescape"}
    for extra_env in ({}, env):  # a strict UTF-8 stdin, then one that escapes bad bytes
        done = subprocess.run(
            [sys.executable, "-m", "fastlm.chat", "--checkpoint", str(tmp_path),
             "--max-new-tokens", "3", "--temperature", "0"],
            input=b"hello\n\xff\xfebad\nagain\n\n", capture_output=True, timeout=120, cwd=ROOT,
            env=extra_env or None)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        err = done.stderr.decode(errors="replace")
        assert "not valid UTF-8" in err and err.count("tokens/s") == 2
