"""train.precision=auto (the default) and the inference --precision flag: what fastlm.precision
picks on faked hardware (CPU flags, CUDA capabilities), what a run logs and records in its
config.toml, that a resumed run keeps its checkpoint's precision, and that fp32 can be forced."""
from __future__ import annotations

import pytest
import torch

from fastlm import checkpoint, precision
from fastlm.config import ConfigError, parse_args
from fastlm.precision import resolve_precision
from fastlm.train.loop import main
from fastlm.train.step import TrainStep
from tests.test_train import TEXT, TINY

QUIET = [*TINY, "--sample.tokens=0", "--train.max_steps=2", "--eval.interval=2"]


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """fake_cpu(flags, speedup): /proc/cpuinfo as a CPU with these flags (None: no cpuinfo at
    all) whose bf16 matmuls measure `speedup` x fp32's."""
    def make(flags: str | None, speedup: float = 2.0):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
        path = tmp_path / "cpuinfo"
        if flags is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"processor\t: 0\nmodel name\t: fake\nflags\t\t: fpu sse2 {flags}\n"
                            f"\nprocessor\t: 1\nflags\t\t: fpu\n")
        monkeypatch.setattr(precision, "CPUINFO", path)
    return make


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("flags, choice, why", [
    ("avx512f avx512_bf16", "bf16", "avx512_bf16"),
    ("avx512f amx_bf16 amx_tile", "bf16", "amx_bf16"),
    ("avx512f avx512bw avx2", "fp32", "neither"),
    (None, "fp32", "unknown"),
])
def test_auto_on_cpu_follows_the_bf16_flags(fake_cpu, flags, choice, why):
    fake_cpu(flags)
    got, reason = resolve_precision("auto", "cpu")
    assert got == choice and why in reason


def test_auto_on_cpu_needs_bf16_measured_faster(fake_cpu):
    """A CPU can report avx512_bf16 and still run bf16 matmuls slower (measured on this
    project's 2-core Intel Xeon VM: 0.5x): then auto stays fp32 and says why."""
    fake_cpu("avx512_bf16", speedup=0.5)
    got, reason = resolve_precision("auto", "cpu")
    assert got == "fp32" and "ran 0.50x fp32's speed" in reason
    fake_cpu("avx512_bf16", speedup=2.5)
    got, reason = resolve_precision("auto", "cpu")
    assert (got, reason) == ("bf16", "auto: CPU has avx512_bf16, bf16 matmul 2.5x fp32 here")


def test_cpu_bf16_speedup_is_measured_on_one_thread_and_leaves_threads_alone():
    threads = torch.get_num_threads()
    precision.cpu_bf16_speedup.cache_clear()
    speedup = precision.cpu_bf16_speedup(n=64, reps=2)
    assert speedup > 0 and torch.get_num_threads() == threads


@pytest.mark.parametrize("capability, choice", [((7, 5), "fp32"), ((8, 0), "bf16"),
                                                ((9, 0), "bf16")])
def test_auto_on_cuda_needs_sm80(monkeypatch, capability, choice):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    got, reason = resolve_precision("auto", torch.device("cuda", 0))
    assert got == choice and f"sm_{capability[0]}{capability[1]}" in reason


def test_explicit_choices_are_kept_and_unknown_ones_name_the_allowed(fake_cpu):
    fake_cpu("avx512_bf16")
    for asked in ("fp32", "bf16", "fp16"):
        assert resolve_precision(asked, "cpu")[0] == asked
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16.*'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", "cpu", allowed=("auto", "fp32", "bf16"))


def test_config_default_is_auto_and_bad_values_name_the_key():
    assert parse_args([]).train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision"):
        parse_args(["--train.precision=fp8"])


def test_train_step_resolves_auto(fake_cpu):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for flags, want in (("avx512_bf16", torch.bfloat16), ("avx2", torch.float32)):
        fake_cpu(flags)
        step = TrainStep(model, opt, device=torch.device("cpu"), precision="auto")
        with step.autocast():
            out = model(torch.randn(2, 4))
        assert out.dtype == want


def config_comment(run_dir) -> str:
    return (run_dir / "config.toml").read_text().splitlines()[0]


def test_default_run_logs_and_records_the_choice(tmp_path, corpus, fake_cpu, capsys):
    fake_cpu("avx512_bf16")
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET]) == 0
    out = capsys.readouterr().out
    assert "bf16 (auto: CPU has avx512_bf16, bf16 matmul 2.0x fp32 here)" in out
    assert config_comment(run_dir).startswith("# train.precision: asked auto, chose bf16 (auto:")
    assert 'precision = "bf16"' in (run_dir / "config.toml").read_text()
    assert checkpoint.load(run_dir).manifest["config"]["train"]["precision"] == "bf16"
    # the saved config repeats the run with the same precision wherever it runs
    assert parse_args(["--config", str(run_dir / "config.toml")]).train.precision == "bf16"


def test_fp32_can_be_forced_on_a_bf16_cpu(tmp_path, corpus, fake_cpu, capsys):
    fake_cpu("avx512_bf16 amx_bf16")
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET,
                 "--train.precision=fp32"]) == 0
    assert "fp32 (asked for)" in capsys.readouterr().out
    assert config_comment(run_dir) == "# train.precision: asked fp32, chose fp32 (asked for)"


def test_a_resumed_run_keeps_its_precision_on_other_hardware(tmp_path, corpus, fake_cpu,
                                                             capsys):
    run_dir = tmp_path / "run"
    fake_cpu("avx512_bf16")
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET]) == 0
    fake_cpu("avx2")  # resumed where auto alone would pick fp32
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY, "--sample.tokens=0",
                 "--train.max_steps=4", "--eval.interval=2", "--resume"]) == 0
    assert "bf16 (auto: kept from the resumed checkpoint)" in capsys.readouterr().out
    assert checkpoint.load(run_dir).manifest["config"]["train"]["precision"] == "bf16"
    # asking explicitly switches it
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY, "--sample.tokens=0",
                 "--train.max_steps=6", "--eval.interval=2", "--resume",
                 "--train.precision=fp32"]) == 0
    assert checkpoint.load(run_dir).manifest["config"]["train"]["precision"] == "fp32"


# -- generate / chat / serve (one loader: fastlm.generate.decode.load_from_args) and eval ------
def test_generate_loads_bf16_weights_where_auto_says_and_fp32_when_forced(tmp_path, fake_cpu,
                                                                          capsys):
    from fastlm.generate.decode import main as generate
    from tests.lm_fixtures import save_checkpoint, tiny_model

    ckpt = save_checkpoint(tmp_path / "run", tiny_model())
    common = ["--checkpoint", str(ckpt), "--prompt", "ab", "--max-new-tokens", "3",
              "--temperature", "0"]
    fake_cpu("avx512_bf16")
    assert generate(common) == 0
    assert "bfloat16 weights (auto: CPU has avx512_bf16" in capsys.readouterr().err
    assert generate([*common, "--precision", "fp32"]) == 0
    assert "float32 weights (asked for)" in capsys.readouterr().err
    fake_cpu("avx2")
    assert generate(common) == 0
    assert "float32 weights (auto: CPU has neither" in capsys.readouterr().err
    assert generate([*common, "--dtype", "bfloat16"]) == 0  # an explicit cast wins
    assert "bfloat16 weights (--dtype)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate([*common, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_eval_scores_under_the_auto_choice_and_fp32_when_forced(tmp_path, fake_cpu):
    from fastlm.eval.core import evaluate_cli, parse
    from tests.lm_fixtures import save_checkpoint, tiny_model

    ckpt = save_checkpoint(tmp_path / "run", tiny_model())
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:600])
    argv = ["--checkpoint", str(ckpt), "--text", str(text), "--no-progress"]
    fake_cpu("amx_bf16")
    auto, _ = evaluate_cli(parse(argv))
    fp32, _ = evaluate_cli(parse([*argv, "--precision", "fp32"]))
    assert (auto["precision"], fp32["precision"]) == ("bf16", "fp32")
    assert "amx_bf16" in auto["precision_reason"]
    # the same tokens scored; bf16 rounding moves the loss a little, not a lot
    assert auto["tokens"] == fp32["tokens"] and auto["bits_per_byte"] != fp32["bits_per_byte"]
    assert auto["bits_per_byte"] == pytest.approx(fp32["bits_per_byte"], rel=0.05)


# -- bench_train --vs-fp32: the claim's arithmetic ----------------------------------------------
def test_bench_train_times_each_run_to_the_fp32_runs_final_val_loss():
    from fastlm.bench import bench_train as bt

    fp32 = {"val_curve": [(0, 1.0, 5.0), (50, 20.0, 2.5), (100, 40.0, 2.0)]}
    auto = {"val_curve": [(0, 1.0, 5.0), (50, 10.0, 2.1), (100, 20.0, 1.9)]}
    never = {"val_curve": [(0, 1.0, 5.0), (100, 9.0, 2.2)]}
    assert bt.time_to_reach(auto["val_curve"], 2.0) == 20.0
    assert bt.time_to_reach(never["val_curve"], 2.0) is None
    rows = [{"provider": "fastlm-fp32", "threads": 1}, {"provider": "fastlm-auto", "threads": 1},
            {"provider": "fastlm-bf16", "threads": 1}]
    bt.add_time_to_fp32_loss(rows, {("fastlm-fp32", 1): [fp32], ("fastlm-auto", 1): [auto],
                                    ("fastlm-bf16", 1): [never]})
    assert [r["time_to_fp32_val_s"] for r in rows] == [40.0, 20.0, None]
    assert rows[1]["speedup_at_fp32_val"] == 2.0 and rows[0]["speedup_at_fp32_val"] == 1.0
    assert "speedup_at_fp32_val" not in rows[2] and rows[2]["fp32_target_val_loss"] == 2.0
    assert [r["steps_to_fp32_val"] for r in rows] == [100, 100, None]
    rows[0]["interleaved_step_ms"], rows[1]["interleaved_step_ms"] = 30.0, 15.0
    bt.add_interleaved_speedup_at_fp32_loss(rows)  # same steps, half the step time
    assert rows[1]["interleaved_speedup_at_fp32_val"] == 2.0


def test_bench_train_val_tol_counts_a_loss_within_it_as_reached():
    from fastlm.bench import bench_train as bt

    fp32 = {"val_curve": [(0, 1.0, 5.0), (50, 20.0, 2.004), (100, 40.0, 2.0)]}
    auto = {"val_curve": [(0, 1.0, 5.0), (50, 10.0, 2.02), (100, 20.0, 2.00006)]}
    runs = {("fastlm-fp32", 1): [fp32], ("fastlm-auto", 1): [auto]}
    strict = [{"provider": "fastlm-fp32", "threads": 1}, {"provider": "fastlm-auto", "threads": 1}]
    bt.add_time_to_fp32_loss(strict, runs)
    assert strict[1]["time_to_fp32_val_s"] is None  # 6e-5 above fp32's final loss: never
    loose = [{"provider": "fastlm-fp32", "threads": 1}, {"provider": "fastlm-auto", "threads": 1}]
    bt.add_time_to_fp32_loss(loose, runs, tol=0.01)
    assert loose[0]["fp32_target_val_loss"] == pytest.approx(2.01) and loose[0]["val_tol"] == 0.01
    assert [r["time_to_fp32_val_s"] for r in loose] == [20.0, 20.0]  # fp32 gets there sooner too
    assert loose[1]["speedup_at_fp32_val"] == 1.0


def test_bench_train_needs_nanogpt_unless_vs_fp32(capsys, tmp_path):
    from fastlm.bench import bench_train as bt

    text = tmp_path / "text.txt"  # not the shared corpus: a clean clone elsewhere has none
    text.write_text("To be, or not to be.\n" * 20)
    assert bt.parse_args(["--vs-fp32", "--data", str(text)]).precisions == ["auto", "fp32"]
    with pytest.raises(SystemExit):
        bt.parse_args([])
    assert "--nanogpt PATH is needed (or --vs-fp32" in capsys.readouterr().err
