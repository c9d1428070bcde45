"""fastlm.train features beyond the basic loop: tokenizer files, prepared shards (with the loader
position in checkpoints), optimizers, gradient accumulation, precision, activation
checkpointing, compile, NaN/inf steps, SIGTERM, resume fallbacks and the plot."""
from __future__ import annotations

import json
import math
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastlm import checkpoint
from fastlm.models.gpt import GPT
from fastlm.tokenizer import Tokenizer
from fastlm.train.loop import main
from tests.test_train import TEXT, TINY, read_metrics

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi"]
QUIET = [*TINY, "--sample.tokens=0"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    Tokenizer.train(iter([TEXT]), vocab_size=280, pattern="gpt4").save(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A prepared byte-level shard folder of 40 word-salad documents."""
    from fastlm.data import prepare

    root = tmp_path_factory.mktemp("shards")
    src = root / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
    prepare([str(src)], root / "out", workers=1, val_fraction=0.1, progress=False)
    return root / "out"


def weights(run_dir):
    return load_file(checkpoint.load(run_dir).path / "model.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# Tokenizers and data sources
def test_tokenizer_file_sets_vocab_bpb_and_is_saved(tmp_path, corpus, bpe_file, capsys):
    tok = Tokenizer.load(bpe_file)
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), f"--tokenizer={bpe_file}", *TINY,
                 "--train.max_steps=30", "--eval.interval=30"]) == 0
    cfg = checkpoint.load(run_dir).manifest["config"]
    assert cfg["model"]["vocab_size"] == tok.vocab_size == 280  # followed the tokenizer
    assert cfg["data"]["tokenizer"] == str(bpe_file)
    assert Tokenizer.load(run_dir / "tokenizer.json") == tok
    assert Tokenizer.load(checkpoint.load(run_dir).path / "tokenizer.json") == tok
    # Bits per byte use the measured bytes per token of the validation text.
    val_bytes = corpus.read_bytes()[int(len(TEXT) * 0.9):]
    bpt = len(val_bytes) / len(tok.encode(val_bytes.decode()))
    assert bpt > 1.5  # BPE merges: more than a byte per token
    _, val_rows = read_metrics(run_dir)
    assert val_rows[-1]["val_bpb"] == pytest.approx(val_rows[-1]["val_loss"] / math.log(2) / bpt,
                                                    rel=0.02)
    out = capsys.readouterr().out
    assert "tok.json, vocab 280" in out
    assert (run_dir / "sample.txt").read_text().startswith("def ")  # decoded by the tokenizer


def test_explicit_vocab_smaller_than_tokenizer_is_an_error(tmp_path, corpus, bpe_file):
    with pytest.raises(SystemExit, match=r"model.vocab_size \(256\) is smaller than the data's "
                                         r"vocabulary \(280\)"):
        main([f"--data={corpus}", f"--tokenizer={bpe_file}", "--model.vocab_size=256", *QUIET])


def test_missing_tokenizer_file(tmp_path, corpus):
    with pytest.raises(SystemExit, match="data.tokenizer: /nope.json is not 'byte' and no such"):
        main([f"--data={corpus}", "--tokenizer=/nope.json", *QUIET])


def test_shards_train_and_resume_with_loader_position(tmp_path, shards):
    common = [f"--data={shards}", *QUIET, "--eval.interval=10", "--train.max_steps=20"]
    straight, split, resumed = tmp_path / "straight", tmp_path / "split", tmp_path / "resumed"
    assert main([*common, "--out", str(straight)]) == 0
    main([*common, "--out", str(split), "--checkpoint.interval=10"])
    shutil.rmtree(split / "checkpoints" / "step_000020")
    state = checkpoint.load(split).train_state()
    assert state["data"]["loader"]["step"] == 10  # the loader's position is in the checkpoint
    main([*common, "--out", str(resumed), f"--resume={split}"])
    assert_same_weights(straight, resumed)
    assert read_metrics(resumed)[1][-1]["val_loss"] == read_metrics(straight)[1][-1]["val_loss"]
    cfg = checkpoint.load(straight).manifest["config"]
    assert cfg["model"]["vocab_size"] == 257  # byte shards carry an end-of-text token


def test_shards_made_by_another_tokenizer_are_refused(tmp_path, shards, bpe_file):
    with pytest.raises(SystemExit, match="shards were made with tokenizer 'byte'.*re-run "
                                         "prepare with the tokenizer you train with"):
        main([f"--data={shards}", f"--tokenizer={bpe_file}", *QUIET, "--train.max_steps=1"])


def test_llmc_bin_folder_trains(tmp_path, shards):
    folder = tmp_path / "llmc"
    folder.mkdir()
    for p in shards.glob("*.bin"):
        shutil.copy(p, folder / p.name)
    assert main([f"--data={folder}", "--out", str(tmp_path / "run"), *QUIET,
                 "--train.max_steps=3"]) == 0


# ---------------------------------------------------------------------------------------------
# Optimisation
def test_sgd_nesterov_trains(tmp_path, corpus):
    run_dir = tmp_path / "run"
    main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--optim.name=sgd",
          "--optim.nesterov=true", "--optim.lr=0.3", "--train.max_steps=40",
          "--eval.interval=40"])
    _, val = read_metrics(run_dir)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    opt = checkpoint.load(run_dir).optimizer_state()
    assert opt["param_groups"][0]["nesterov"] and "momentum_buffer" in opt["state"][0]


def test_tokens_per_step_sets_grad_accum_and_matches_a_big_batch(tmp_path, corpus):
    """2 micro-batches of 4 (tokens_per_step = 2 * 4 * 32) take the same steps as 1 batch of 8:
    the same windows (one generator draws both) and the mean of the two halves' gradients."""
    common = [f"--data={corpus}", *QUIET, "--train.max_steps=5", "--eval.interval=5",
              "--train.precision=fp32"]  # bf16 rounding differs between the two batchings
    big, accum = tmp_path / "big", tmp_path / "accum"
    main([*common, "--out", str(big), "--train.batch_size=8"])
    main([*common, "--out", str(accum), "--train.batch_size=4", "--train.tokens_per_step=256"])
    assert checkpoint.load(accum).manifest["config"]["train"]["tokens_per_step"] == 256
    wa, wb = weights(big), weights(accum)
    for name in wa:  # only summation order differs
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def test_tokens_per_step_must_divide(corpus):
    with pytest.raises(SystemExit, match=r"train.tokens_per_step \(1,000\) must be a multiple of "
                                         r"batch_size \* seq_len \* processes = 256; e.g. 1,024"):
        main([f"--data={corpus}", *QUIET, "--train.tokens_per_step=1000"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, corpus, precision):
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--train.max_steps=30",
                 "--eval.interval=30", f"--train.precision={precision}"]) == 0
    train_rows, val = read_metrics(run_dir)
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert train_rows[-1]["skipped"] == 0  # fp16: the scaler's own inf-gradient skips don't count
    assert {w.dtype for w in weights(run_dir).values()} == {torch.float32}  # fp32 master weights


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, corpus):
    common = [f"--data={corpus}", *QUIET, "--train.max_steps=6", "--eval.interval=6"]
    main([*common, "--out", str(tmp_path / "plain")])
    main([*common, "--out", str(tmp_path / "ckpt"), "--train.activation_checkpointing=true"])
    assert_same_weights(tmp_path / "plain", tmp_path / "ckpt")


@pytest.mark.slow
def test_compile_on_cpu(tmp_path, corpus):
    common = [f"--data={corpus}", *QUIET, "--train.max_steps=4", "--eval.interval=4"]
    main([*common, "--out", str(tmp_path / "eager")])
    assert main([*common, "--out", str(tmp_path / "compiled"), "--train.compile=true"]) == 0
    wa, wb = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Faults
def _poison_losses(monkeypatch, bad_calls):
    """GPT.forward returns a NaN loss on the training calls numbered in bad_calls (1-based)."""
    original, calls = GPT.forward, {"n": 0}

    def forward(self, idx, targets=None, *args, **kwargs):
        logits, loss = original(self, idx, targets, *args, **kwargs)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls or "all" in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


def test_nan_steps_are_skipped_and_counted(tmp_path, corpus, monkeypatch):
    _poison_losses(monkeypatch, {3, 4})
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--train.max_steps=10",
                 "--eval.interval=10"]) == 0
    train_rows, _ = read_metrics(run_dir)
    assert train_rows[-1]["skipped"] == 2
    assert all(math.isfinite(r["loss"]) for r in train_rows)  # skipped steps are not averaged
    assert all(torch.isfinite(w).all() for w in weights(run_dir).values())
    assert checkpoint.load(run_dir).train_state()["skipped_steps"] == 2


def test_nan_every_step_stops_with_a_message(tmp_path, corpus, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--train.max_steps=4"])
    _poison_losses(monkeypatch, {"all"})
    status = main([f"--data={corpus}", *QUIET, "--train.max_steps=50", f"--resume={run_dir}",
                   "--train.max_bad_steps=3"])
    assert status == 3
    assert "3 steps in a row had a NaN/inf loss or gradient" in capsys.readouterr().err
    assert checkpoint.load(run_dir).step == 4  # the last good checkpoint is kept


def test_sigterm_saves_a_checkpoint(tmp_path, corpus, monkeypatch):
    from fastlm.data.text import TextData
    calls, original = {"n": 0}, TextData.train_batch

    def terminating_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGTERM)  # as a cluster scheduler does before killing
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TextData, "train_batch", terminating_batch)
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET,
                 "--train.max_steps=50"]) == 130
    assert checkpoint.load(run_dir).step == 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_corrupt_latest_checkpoint_falls_back_and_bare_resume(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    common = [f"--data={corpus}", "--out", str(run_dir), *QUIET]
    main([*common, "--train.max_steps=6", "--checkpoint.interval=3"])
    victim = run_dir / "checkpoints" / "step_000006" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*common, "--train.max_steps=8", "--resume"]) == 0  # bare: --out's latest
    out = capsys.readouterr().out
    assert "step_000006/model.safetensors: checksum mismatch" in out
    assert "falling back to the previous checkpoint" in out
    assert "steps   3 -> 8" in out


def test_bare_resume_without_checkpoints_starts_fresh(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--train.max_steps=2",
                 "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_plot_cli(tmp_path, corpus, capsys):
    from fastlm.train.plot import main as plot_main
    run_dir = tmp_path / "run"
    main([f"--data={corpus}", "--out", str(run_dir), *QUIET, "--train.max_steps=10"])
    (run_dir / "loss.png").unlink()
    assert plot_main([str(run_dir)]) == 0
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(tmp_path / "nothing")]) == 1
    assert "no such file" in capsys.readouterr().err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[1])
    assert rows[1]["mfu"] is None  # no GPU peak to measure against: unknown, not a guess


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    """SIGKILL mid-run (no handler runs), resume from the newest complete checkpoint: the weights
    and every loss row after it equal an uninterrupted run's bit for bit. A constant lr makes
    max_steps irrelevant to the steps, so the victim can be started with a huge one."""
    import os
    import subprocess
    import sys
    import time

    common = [f"--data={corpus}", *QUIET, "--optim.schedule=constant", "--eval.interval=10",
              "--train.log_interval=1", "--checkpoint.interval=10", "--checkpoint.keep_last=100",
              # bit for bit is the fp32 guarantee: with bf16 autocast (what auto picks on a
              # bf16-fast CPU) this run differed in the last bits after the resume
              "--train.precision=fp32"]
    straight, victim = tmp_path / "straight", tmp_path / "victim"
    main([*common, "--out", str(straight), "--train.max_steps=60"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "fastlm.train", *common, "--out", str(victim),
                             "--train.max_steps=1000000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = victim / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # kill between checkpoints, 3 steps after the first
            if metrics.exists() and '"step": 13,' in metrics.read_text():
                break
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    killed_at = checkpoint.load(victim).step
    assert 10 <= killed_at < 60
    assert main([*common, "--out", str(victim), "--train.max_steps=60", "--resume"]) == 0
    assert_same_weights(straight, victim)
    a, b = read_metrics(straight)[0], read_metrics(victim)[0]
    resumed = b[-(60 - killed_at):]  # the resumed run's rows come last
    key = lambda rows: [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]
    assert key(resumed) == key([r for r in a if r["step"] > killed_at])
