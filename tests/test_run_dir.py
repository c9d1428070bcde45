"""A run directory belongs to one run (issue 19): train, finetune and export --from-hf refuse an
--out that holds another run unless --resume or --overwrite says what to do; checkpoints must
be writable before the first step; a failed save keeps training going and, at the end, names
the last good checkpoint; a torn metrics.jsonl line breaks neither the plot nor a resume."""
from __future__ import annotations

import json

import pytest

from fastlm import checkpoint, run_dir
from fastlm.train import plot
from fastlm.train.loop import main
from tests.test_train import TINY, corpus, read_metrics  # noqa: F401 -- corpus is a fixture

STEPS = ["--model.preset=tiny-llama", "--eval.interval=10", "--sample.tokens=0", *TINY]


def train(corpus, out, *extra):
    return main([f"--data={corpus}", "--out", str(out), *STEPS, *extra])


def test_out_holding_a_run_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train(corpus, out, "--train.max_steps=10", "--checkpoint.interval=5") == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        train(corpus, out, "--train.max_steps=5")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_text() == metrics
    # --overwrite starts again: only the new run's rows and checkpoints remain
    (out / "notes.txt").write_text("mine")  # not a run file: left alone
    assert train(corpus, out, "--train.max_steps=5", "--overwrite") == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000005"]
    train_rows, val_rows = read_metrics(out)
    assert [r["step"] for r in val_rows] == [0, 5] and (out / "notes.txt").exists()
    assert "overwrite = false" in (out / "config.toml").read_text()
    # --resume continues its own run; --overwrite with it would delete what it continues
    with pytest.raises(SystemExit, match="--overwrite would delete"):
        train(corpus, out, "--train.max_steps=10", "--resume", "--overwrite")
    assert train(corpus, out, "--train.max_steps=10", "--resume") == 0


def test_unwritable_checkpoints_fail_before_training(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(run_dir, "open", refuse, raising=False)
    with pytest.raises(SystemExit, match=r"checkpoints.*cannot write.*Permission denied"):
        train(corpus, out, "--train.max_steps=5")
    assert not (out / "metrics.jsonl").exists()  # not a step was trained


def test_failed_saves_keep_training_and_name_the_last_good(tmp_path, corpus, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    real = checkpoint._write

    def full_after_first(tmp, step, *args):
        if step > 5:
            raise OSError(28, "No space left on device")
        real(tmp, step, *args)

    monkeypatch.setattr(checkpoint, "_write", full_after_first)
    with pytest.raises(SystemExit, match=r"No space left.*last good checkpoint is .*step_000005"):
        train(corpus, out, "--train.max_steps=15", "--checkpoint.interval=5")
    err = capsys.readouterr()
    assert "training goes on" in err.out + err.err
    train_rows, _ = read_metrics(out)
    assert train_rows[-1]["step"] == 15  # the failed save at 10 did not stop training
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000005"]


def test_torn_metrics_line_is_skipped_and_trimmed_on_resume(tmp_path, corpus):
    out = tmp_path / "run"
    assert train(corpus, out, "--train.max_steps=10", "--checkpoint.interval=5") == 0
    rows_before = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows_before + '{"kind": "train", "step": 11, "lo')
    assert plot.read_metrics(out)[0][-1]["step"] == 10  # the torn line skipped
    assert plot.main([str(out)]) == 0
    assert train(corpus, out, "--train.max_steps=15", "--resume") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [5, 10, 15]


def test_finetune_and_import_refuse_a_run(tmp_path, corpus):
    from fastlm.export.hf import main as export_main
    from fastlm.finetune.loop import parse_args

    out = tmp_path / "run"
    assert train(corpus, out, "--train.max_steps=5") == 0
    assert parse_args(["--checkpoint", "x", "--task", "sft", "--data", "d", "--out", "o",
                       "--overwrite"]).overwrite
    with pytest.raises(run_dir.RunDirError, match="already holds a run"):
        run_dir.claim(out, resume_hint=False)
    assert export_main(["--from-hf", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert (out / "checkpoints" / "step_000005").is_dir()
