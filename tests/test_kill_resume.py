"""kill -9 at random points, saves included, then --resume (issue 19): the run ends with the
same weights as a run never killed, and no temporary checkpoint directory remains. A checkpoint
every step makes most kills land inside a save. Bounded: two kills, four short processes."""
import os
import random
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from fastlm import checkpoint
from tests.test_train import TINY, corpus  # noqa: F401 -- corpus is a fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--model.preset=tiny-llama", "--eval.interval=6", "--sample.tokens=0",
        "--train.max_steps=12", "--checkpoint.interval=1", "--train.tensorboard=false", *TINY]


def command(corpus, out, *extra):
    return [sys.executable, "-m", "fastlm.train", f"--data={corpus}", "--out", str(out), *ARGS,
            *extra]


def test_kill_9_anywhere_then_resume_equals_an_unkilled_run(tmp_path, corpus):
    whole = tmp_path / "whole"
    subprocess.run(command(corpus, whole), check=True, capture_output=True, cwd=ROOT,
                   timeout=300)
    killed = tmp_path / "killed"
    rng = random.Random(19)
    extra: list[str] = []
    for _ in range(2):
        proc = subprocess.Popen(command(corpus, killed, *extra), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for a first checkpoint of this attempt, then kill at a random moment
        start = checkpoint.latest(killed)
        deadline = time.monotonic() + 120
        while checkpoint.latest(killed) == start and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        extra = ["--resume"]
    subprocess.run(command(corpus, killed, "--resume"), check=True, capture_output=True,
                   cwd=ROOT, timeout=300)
    want = load_file(str(checkpoint.latest(whole) / "model.safetensors"))
    got = load_file(str(checkpoint.latest(killed) / "model.safetensors"))
    assert checkpoint.latest(killed).name == "step_000012"
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
