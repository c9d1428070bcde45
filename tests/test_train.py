"""python -m fastlm.train end to end on tiny inputs (metrics, checkpoints, resume, Ctrl-C, errors),
plus the pieces it is made of: text data (fastlm.data.text), checkpoints and the LR schedule."""
from __future__ import annotations

import itertools
import json
import math
import signal

import pytest
import torch

from fastlm import checkpoint
from fastlm.config import load_config, parse_args
from fastlm.data.text import expand_paths, load_text, split_files, stdlib_files
from fastlm.train.loop import main
from fastlm.train.runtime import lr_at

TEXT = ("def greet(name):\n    return 'hello, ' + name\n\n"
        "class Point:\n    x: int = 0\n    y: int = 0\n\n") * 60  # ~5 KB, very repetitive

TINY = ["--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
        "--train.batch_size=8", "--optim.lr=1e-2", "--optim.warmup_steps=5",
        "--eval.batches=2", "--train.log_interval=5", "--train.progress=false",
        "--sample.tokens=20"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def read_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "val"]


def test_train_smoke_overfits_and_writes_run_dir(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), "--train.max_steps=60",
                 "--eval.interval=30", "--model.preset=tiny-llama", *TINY]) == 0
    train_rows, val_rows = read_metrics(run_dir)
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert [r["step"] for r in val_rows] == [0, 30, 60]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_rows)
    # Overfitting repetitive text: the loss falls far below the uniform ln(256) = 5.55.
    assert val_rows[0]["val_loss"] > 5.0
    assert val_rows[-1]["val_loss"] < 2.5 and train_rows[-1]["loss"] < 2.5
    assert math.isclose(val_rows[-1]["val_bpb"], val_rows[-1]["val_loss"] / math.log(2))
    # The resolved config reads back to the same run.
    cfg = load_config(run_dir / "config.toml")
    assert cfg.model.arch == "llama" and cfg.train.max_steps == 60 and cfg.model.n_embd == 32
    # One checkpoint at the end, checksummed.
    ckpt = checkpoint.load(run_dir)
    assert ckpt.step == 60 and ckpt.path.name == "step_000060"
    assert set(ckpt.manifest["files"]) == {"model.safetensors", "optimizer.pt", "train_state.pt",
                                           "tokenizer.json"}  # the checkpoint is self-contained
    from fastlm.tokenizer import Tokenizer
    assert Tokenizer.load(ckpt.path / "tokenizer.json") == Tokenizer.byte()
    assert (run_dir / "loss.png").stat().st_size > 0
    assert ckpt.manifest["config"]["model"]["n_embd"] == 32
    assert ckpt.manifest["metrics"]["val_loss"] == val_rows[-1]["val_loss"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    out = capsys.readouterr().out
    assert "--- sample" in out and (run_dir / "sample.txt").read_text().startswith("def ")


def test_resume_continues_exactly(tmp_path, corpus):
    common = [f"--data={corpus}", *TINY, "--eval.interval=10", "--sample.tokens=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    main([*common, "--out", str(straight), "--train.max_steps=20"])
    main([*common, "--out", str(split), "--train.max_steps=20", "--checkpoint.interval=10"])
    # Drop the final checkpoint and continue from step 10 into a second run directory.
    import shutil
    shutil.rmtree(split / "checkpoints" / "step_000020")
    resumed = tmp_path / "resumed"
    main([*common, "--out", str(resumed), "--train.max_steps=20",
          f"--checkpoint.resume={split}"])
    a = checkpoint.load(straight)
    b = checkpoint.load(resumed)
    assert a.step == b.step == 20
    from safetensors.torch import load_file
    wa, wb = (load_file(c.path / "model.safetensors") for c in (a, b))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    assert read_metrics(resumed)[1][-1]["val_loss"] == read_metrics(straight)[1][-1]["val_loss"]


def test_ctrl_c_saves_a_checkpoint(tmp_path, corpus, monkeypatch):
    from fastlm.data.text import TextData
    calls = {"n": 0}
    original = TextData.train_batch

    def interrupting_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C in step 7
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextData, "train_batch", interrupting_batch)
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *TINY,
                 "--train.max_steps=50"]) == 130
    assert checkpoint.load(run_dir).step == 7  # the step in flight was completed, then saved
    assert read_metrics(run_dir)[0][-1]["step"] == 7


def test_bad_cli_key_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--train.max_stepz=5"])
    assert "unknown key 'train.max_stepz'" in str(exc.value)
    assert "Did you mean 'train.max_steps'" in str(exc.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    (["--data=/nonexistent/corpus.txt"], "--data /nonexistent/corpus.txt: no such file"),
    (["--kernels.backend=fastest"], "unknown backend 'fastest'"),
    (["--kernels.backend=cuda"], "backend 'cuda' cannot run here"),
    (["--train.device=cuda:0"], "torch sees no CUDA GPU"),
    (["--checkpoint.resume=/nonexistent/run"],
     "checkpoint.resume: /nonexistent/run: not a checkpoint directory"),
    (["--model.vocab_size=100"], "model.vocab_size (100) is smaller than the data's"),
])
def test_setup_errors_exit_with_a_message(tmp_path, corpus, args, expected):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        main([f"--data={corpus}", "--out", str(tmp_path / "run"), *TINY, *args])
    assert expected in str(exc.value)
    assert str(exc.value).startswith("fastlm.train: error: ")


def test_tiny_corpus_is_rejected_with_advice(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="bytes of training text; need at least 33"):
        main([f"--data={path}", *TINY])


# ---------------------------------------------------------------------------------------------
# Pieces
def test_lr_schedule_warmup_then_cosine():
    cfg = parse_args(["--optim.lr=1e-3", "--optim.min_lr=1e-4", "--optim.warmup_steps=10",
                      "--train.max_steps=110"])
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way through the decay
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_expand_paths_file_folder_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.txt", "sub/d.md", ".hidden/e.txt"):
        (tmp_path / name).write_text(name)
    root, files = expand_paths(str(tmp_path))
    assert root == tmp_path
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "a.txt", "b.txt", "sub/c.txt", "sub/d.md"]
    _, files = expand_paths(str(tmp_path / "**" / "*.txt"))
    assert [p.name for p in files] == ["a.txt", "b.txt", "c.txt"]
    _, files = expand_paths(str(tmp_path / "a.txt"))
    assert [p.name for p in files] == ["a.txt"]
    with pytest.raises(FileNotFoundError, match="the glob matches no files"):
        expand_paths(str(tmp_path / "*.csv"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        expand_paths(str(tmp_path / "missing"))


def test_split_is_by_file_and_deterministic(tmp_path):
    files = []
    for i in range(200):
        files.append(tmp_path / f"f{i}.txt")
    train, val = split_files(tmp_path, files, 0.1)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 5 < len(val) < 40
    # The same file lands on the same side whatever else is in the list.
    _, val2 = split_files(tmp_path, files[:100], 0.1)
    assert set(val2) == set(val) & set(files[:100])


def test_default_corpus_and_batches():
    root, files = stdlib_files()
    rel = [p.relative_to(root).parts for p in files]
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any({"site-packages", "test", "tests", "__pycache__"} & set(parts)
                   for parts in rel)
    data = load_text("", max_bytes=200_000, val_fraction=0.1)
    assert 190_000 <= len(data.train) <= 200_000 and 10_000 <= len(data.val) <= 20_000
    x, y = data.train_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    v1, v2 = data.val_batches(3, 4, 16), data.val_batches(3, 4, 16)
    assert len(v1) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2))


def test_single_file_splits_by_tail(corpus):
    data = load_text(str(corpus), val_fraction=0.1)
    raw = corpus.read_bytes()
    assert len(data.train) + len(data.val) == len(raw)
    assert bytes(data.val.tolist()) == raw[len(data.train):]


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "input.txt"])
def test_single_file_whose_name_hashes_into_validation_still_trains(tmp_path, name):
    """These names hash below val_fraction; a one-file corpus must still split by its tail."""
    path = tmp_path / name
    path.write_text("To be, or not to be, that is the question.\n" * 200)
    data = load_text(str(path), val_fraction=0.1)
    assert len(data.train) > 0 and len(data.val) > 0
    assert len(data.train) + len(data.val) == path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Checkpoint files
def _save(run_dir, step, val_loss, keep_last=2):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return checkpoint.save(run_dir, step, model, opt, {"step": step}, {"k": 1},
                           {"val_loss": val_loss}, keep_last)


def test_checkpoint_keeps_last_k_and_best(tmp_path):
    for step, val in [(10, 3.0), (20, 1.0), (30, 2.0), (40, 2.5), (50, 2.4)]:
        _save(tmp_path, step, val)
    kept = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert kept == ["step_000020", "step_000040", "step_000050"]  # best (20) + last 2
    assert checkpoint.latest(tmp_path).name == "step_000050"


def test_checkpoint_checksum_mismatch_names_the_file(tmp_path):
    path = _save(tmp_path, 5, 1.0)
    original = (path / "optimizer.pt").read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"optimizer.pt: checksum mismatch"):
        checkpoint.load(path)
    (path / "optimizer.pt").write_bytes(original)
    assert checkpoint.load(path).step == 5
    (path / "train_state.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"train_state.pt: missing"):
        checkpoint.load(path)


def test_resume_with_another_model_shape_says_how_to_fix(tmp_path, corpus):
    run_dir = tmp_path / "run"
    main([f"--data={corpus}", "--out", str(run_dir), *TINY, "--train.max_steps=2",
          "--sample.tokens=0"])
    with pytest.raises(SystemExit, match=r"other model settings \(model.n_embd=32\); add "
                                         rf"--config {run_dir}/config.toml"):
        main([f"--data={corpus}", *TINY, "--model.n_embd=64", "--train.max_steps=4",
              f"--checkpoint.resume={run_dir}"])


def test_kernels_backend_config_reaches_fastlm_ops(tmp_path, corpus, capsys):
    main([f"--data={corpus}", "--out", str(tmp_path / "run"), *TINY, "--train.max_steps=2",
          "--sample.tokens=0", "--kernels.backend=reference,layer_norm=torch"])
    out = capsys.readouterr().out
    assert "layer_norm=torch, rms_norm=reference, attention=reference" in out
