"""Data parallelism through torchrun on CPU (gloo, 2 processes): the 2-rank run takes the same
steps as a 1-rank run with the same global batch (DDP and FSDP2), rank 0 alone writes the run
directory, and a 2-rank checkpoint resumes in 1 process (the format has no world size)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastlm import checkpoint
from fastlm.train.loop import main
from tests.test_train import TEXT, read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ARGS = ["--model.n_layer=2", "--model.n_embd=32", "--model.n_head=2", "--model.block_size=32",
        "--optim.lr=1e-2", "--optim.warmup_steps=2", "--eval.batches=2",
        "--train.log_interval=1", "--train.progress=false", "--sample.tokens=0",
        "--train.max_steps=6", "--eval.interval=3", "--train.device=cpu",
        # the ranks-vs-one comparison is to 1e-5: fp32, whatever precision=auto picks on this CPU
        "--train.precision=fp32"]


def free_port() -> int:
    """A loopback port nobody holds now: fixed ports collided when two test runs shared a
    machine (EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, nproc, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "fastlm.train",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("parallel, per_rank", [
    ("ddp", ["--train.batch_size=4"]),
    # 2 ranks x 2 micro-batches of 2 (DDP syncs only the last one: no_sync) = 1 rank x 8;
    # validation takes eval.batches of batch_size x ranks windows: 4 x 4 = 2 x 8, the same ones
    pytest.param("ddp", ["--train.batch_size=2", "--train.grad_accum=2", "--eval.batches=4"],
                 marks=pytest.mark.slow),
    pytest.param("fsdp", ["--train.batch_size=4"], marks=pytest.mark.slow)])
def test_two_ranks_match_one_rank_at_the_same_global_batch(tmp_path, corpus, parallel, per_rank):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([f"--data={corpus}", "--out", str(one), *ARGS, "--train.batch_size=8"]) == 0
    proc = torchrun(tmp_path, 2, [f"--data={corpus}", "--out", str(two), *ARGS, *per_rank,
                                  f"--train.parallel={parallel}"])
    assert f"{parallel} x 2 processes" in proc.stdout
    assert proc.stdout.count("fastlm.train: run directory") == 1  # rank 0 alone prints
    (t1, v1), (t2, v2) = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in t2] == list(range(1, 7))  # rank 0 alone writes metrics
    for a, b in zip(t1 + v1, t2 + v2):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    wa = load_file(checkpoint.load(one).path / "model.safetensors")
    wb = load_file(checkpoint.load(two).path / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)
    # The 2-rank checkpoint resumes in one process (same global batch) and continues.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    assert main([f"--data={corpus}", "--out", str(resumed), *ARGS[:-3], "--train.max_steps=8",
                 "--eval.interval=4", "--train.batch_size=8", "--resume"]) == 0
    assert checkpoint.load(resumed).step == 8
    if parallel == "fsdp":  # a 1-process checkpoint resumes sharded (full state -> shards)
        again = tmp_path / "again"
        shutil.copytree(one, again)
        torchrun(tmp_path, 2, [f"--data={corpus}", "--out", str(again), *ARGS[:-3],
                               "--train.max_steps=8", "--eval.interval=4",
                               "--train.batch_size=4", "--train.parallel=fsdp", "--resume"])
        after = lambda run: [r for r in read_metrics(run)[0] + read_metrics(run)[1]
                             if r["step"] > 6]
        for a, b in zip(after(resumed), after(again), strict=True):
            key = "loss" if "loss" in a else "val_loss"
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
        wa = load_file(checkpoint.load(resumed).path / "model.safetensors")
        wb = load_file(checkpoint.load(again).path / "model.safetensors")
        for name in wa:
            # atol 1e-4, not 1e-5: the key bias's gradient is exactly zero in exact arithmetic
            # (softmax ignores a per-query constant), so it is rounding noise that Adam turns
            # into lr-sized steps; the runs' noise differs slightly (measured: 1e-5)
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-4, msg=name)
