"""TensorBoard logging of python -m fastlm.train (fastlm.tensorboard_log): the event files hold the
same scalars as metrics.jsonl, and the switch and the missing-package path behave."""
from __future__ import annotations

import json
import math

import pytest

from fastlm.train import logs as tensorboard_log
from fastlm.train.loop import main

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 120
TINY = ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
        "--train.batch_size=4", "--optim.lr=1e-2", "--optim.warmup_steps=2", "--eval.batches=2",
        "--eval.interval=6", "--train.max_steps=12", "--train.log_interval=3",
        "--train.progress=false", "--sample.tokens=0"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def needs_tensorboard():
    reason = tensorboard_log.unavailable_reason()
    if reason is not None:
        pytest.skip(f"tensorboard not installed: {reason}")


def read_events(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_file_scalars_match_metrics_jsonl(tmp_path, corpus, capsys):
    needs_tensorboard()
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY]) == 0
    assert f"tboard  {run_dir / 'tensorboard'}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key in ("kind", "step", "time_s") or value is None:
                continue
            expected.setdefault(f"{r['kind']}/{key}", []).append((r["step"], float(value)))
    events = read_events(run_dir / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/val_loss",
            "val/val_bpb"} <= set(events)
    assert "train/mfu" not in events  # null on CPU: unknown is not written as a number
    assert set(events) == set(expected)
    for tag, points in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got, points):  # event files store float32
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30), (tag, a, b)
    assert [s for s, _ in events["train/loss"]] == [3, 6, 9, 12]
    assert [s for s, _ in events["val/val_loss"]] == [0, 6, 12]


def test_switch_off_writes_no_event_files(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY,
                 "--train.tensorboard=false"]) == 0
    assert "tboard  off (--train.tensorboard=false)" in capsys.readouterr().out
    assert not (run_dir / "tensorboard").exists()
    assert (run_dir / "metrics.jsonl").stat().st_size > 0


def test_missing_package_says_how_to_install_and_training_goes_on(tmp_path, corpus, capsys,
                                                                   monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("TensorBoard logging requires TensorBoard version 1.15 or above")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY]) == 0
    out = capsys.readouterr().out
    assert "tboard  skipped:" in out and "pip install tensorboard" in out
    assert not (run_dir / "tensorboard").exists()
