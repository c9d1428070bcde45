"""bench/bench_train.py's pieces: what it times in each trainer's log, the shared validation windows,
and the errors for a wrong nanoGPT folder or data file. (A real side-by-side run takes minutes
and needs nanoGPT's source: it is the benchmark itself, not a test.)"""
from __future__ import annotations

import json
import math

import pytest
import torch
from fastlm.bench import bench_train as bt

NANOGPT_LOG = """tokens per iteration will be: 768
step 0: train loss 4.2000, val loss 4.2100
iter 0: loss 4.1900, time 900.00ms, mfu -100.00%
iter 1: loss 4.0000, time 60.00ms, mfu -100.00%
iter 2: loss 3.9000, time 62.00ms, mfu -100.00%
step 3: train loss 3.5000, val loss 3.6000
saving checkpoint to out
iter 3: loss 3.4000, time 700.00ms, mfu 0.02%
iter 4: loss 3.3000, time 58.00ms, mfu 0.02%
step 6: train loss 3.1000, val loss 3.2500
"""


def test_nanogpt_log_leaves_out_warmup_and_evaluation_iterations():
    steps, val, val_step = bt.parse_nanogpt(NANOGPT_LOG, eval_interval=3)
    assert steps == pytest.approx([0.060, 0.062, 0.058])  # not iter 0, not iter 3 (it evaluated)
    assert (val, val_step) == (3.25, 6)
    with pytest.raises(bt.BenchError, match="log format"):
        bt.parse_nanogpt("nothing useful\n", 3)


def test_fastlm_steps_are_wall_time_between_rows_without_evaluations(tmp_path):
    rows = [{"kind": "val", "step": 0, "val_loss": 5.5, "time_s": 1.0},
            {"kind": "train", "step": 1, "tokens_per_s": 1.0, "time_s": 1.5},
            {"kind": "train", "step": 2, "tokens_per_s": 1.0, "time_s": 1.55},
            {"kind": "val", "step": 2, "val_loss": 3.0, "time_s": 2.5},
            {"kind": "train", "step": 3, "tokens_per_s": 1.0, "time_s": 2.54},
            {"kind": "val", "step": 3, "val_loss": 2.75, "time_s": 3.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, val, val_step = bt.parse_fastlm(path)
    assert steps == pytest.approx([0.05, 0.04])  # step 1 (warm-up) and eval time left out
    assert (val, val_step) == (2.75, 3)


def test_validation_windows_are_the_tail_tenth_without_overlap(tmp_path):
    text = bytes(range(32, 127)) * 80  # 7,600 ASCII bytes
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    x, y = bt.val_windows(path)
    val = torch.tensor(list(text[int(len(text) * 0.9):]))
    assert x.shape == y.shape == ((len(val) - 1) // bt.SEQ_LEN, bt.SEQ_LEN)
    assert torch.equal(x.flatten(), val[:x.numel()])
    assert torch.equal(y.flatten(), val[1:x.numel() + 1])


def test_mean_loss_weights_windows_equally():
    x = torch.zeros(5, 4, dtype=torch.long)
    y = torch.arange(5)[:, None].expand(5, 4).float()

    def model(xb, yb):  # loss of a batch = mean of its rows' values
        return None, yb.mean()

    assert math.isclose(bt.mean_loss(model, x, y, batch=2), 2.0)


def test_wrong_nanogpt_folder_names_what_is_missing(tmp_path):
    (tmp_path / "train.py").write_text("")
    with pytest.raises(bt.BenchError, match=r"missing model\.py, configurator\.py"):
        bt.check_nanogpt(tmp_path)


def test_bad_arguments_say_what_to_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bt.parse_args(["--nanogpt", str(tmp_path), "--data", str(tmp_path / "missing.txt")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "u.txt").write_text("héllo wörld\n" * 100)
    with pytest.raises(SystemExit):
        bt.parse_args(["--nanogpt", str(tmp_path), "--data", str(tmp_path / "u.txt")])
    assert "ASCII" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.parse_args(["--nanogpt", str(tmp_path), "--precisions", "fp8"])
    assert "unknown fp8" in capsys.readouterr().err


def test_summary_medians_ratios_and_table(tmp_path):
    for name in ("train.py", "model.py"):
        (tmp_path / name).write_text(f"# {name}\n")

    def run(tok_s, step_ms, full):
        return {"tokens_per_s": tok_s, "step_ms": step_ms, "val_loss": 2.0, "val_step": 10,
                "full_val_loss": full, "wall_s": 1.0, "loadavg": 1.5, "command": ["x"]}

    runs = {("nanogpt", 1): [run(1000.0, 10.0, 2.1), run(900.0, 11.0, 2.1)],
            ("fastlm-bf16", 1): [run(1500.0, 7.0, 2.0), run(1400.0, 7.5, 2.2)],
            ("fastlm-fp32", 2): [run(800.0, 12.0, 2.0)]}  # no nanoGPT row at 2 threads
    args = type("Args", (), {"nanogpt": tmp_path, "iters": 10, "val_tol": 0.01})
    interleaved = {1: {"nanogpt": 60.0, "fastlm-bf16": 40.0}}
    rows = {(r["provider"], r["threads"]): r for r in bt.summarize(runs, args, interleaved)}
    ours, base = rows[("fastlm-bf16", 1)], rows[("nanogpt", 1)]
    assert base["tokens_per_s"] == 950.0 and ours["tokens_per_s"] == 1450.0  # medians
    assert ours["speedup_vs_nanogpt"] == pytest.approx(1450 / 950)
    assert ours["full_val_bpc"] == pytest.approx(2.1 / math.log(2))
    assert ours["full_val_bpc_vs_nanogpt"] == pytest.approx(0.0)
    assert "speedup_vs_nanogpt" not in rows[("fastlm-fp32", 2)]
    assert ours["interleaved_speedup_vs_nanogpt"] == pytest.approx(1.5)
    assert "interleaved_step_ms" not in rows[("fastlm-fp32", 2)]
    assert ours["precision"] == "bf16" and base["precision"] == "fp32"
    assert ours["op"] == "train" and ours["device"] and ours["date"]
    table = bt.format_table(list(rows.values()))
    assert "1.53x" in table and "40.0 ms 1.50x" in table and "nanx" not in table
