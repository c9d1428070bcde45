"""bench/gpu_check.sh --smoke: the GPU check's stages run on the CPU at tiny sizes, into one
folder as on a GPU machine, and leave what a GPU call can bring back (at most 8 files of at most
16 MiB, at most two folders down) holding what each stage should write. A stage whose budget runs
out stops its step, still writes its summary, and says what was cut."""
import json
import os
import subprocess
import sys

import pytest

from fastlm.ops.dispatch import IMPLEMENTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fewer ops, one preset and a few tests than the script's own smoke run: the plumbing is the
# same, and this stays around a minute on a 2-core machine.
SMOKE_ENV = {"GPU_CHECK_OPS": "layer_norm,adamw_step", "PROFILE_PRESETS": "tiny",
             "GPU_CHECK_SMOKE_K": "cpu-cpu-torch.float32 and 1025", "PYTHON": sys.executable}


def gpu_check(*args, env=None):
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, **SMOKE_ENV, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    runs = {stage: gpu_check("--stage", stage, "--smoke", "--out", str(out))
            for stage in "abc"}
    return out, runs


def files_under(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]


def test_all_stages_fit_what_one_gpu_call_brings_back(smoke_dir):
    out, runs = smoke_dir
    for stage, run in runs.items():
        assert run.returncode == 0, f"stage {stage}:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    files = files_under(out)
    names = sorted(os.path.relpath(f, out) for f in files)
    assert names == ["a.log", "b.json", "b.log", "c.json", "c.log", "summary.json",
                     "summary.md"]
    assert len(files) <= 8
    assert all(os.path.getsize(f) <= 16 << 20 for f in files)
    assert all(os.path.relpath(f, out).count(os.sep) <= 2 for f in files)
    summary = json.loads((out / "summary.json").read_text())
    for stage in "abc":
        assert summary[stage]["finished"] and summary[stage]["limits"]["problems"] == []


def test_stage_a_runs_the_gpu_subset_and_parses_its_report(smoke_dir):
    out, _ = smoke_dir
    a = json.loads((out / "summary.json").read_text())["a"]
    assert [s["name"] for s in a["steps"]][:3] == ["environment", "backends", "gpu_subset tests"]
    tests = a["tests"][0]
    assert tests["selection"].startswith("-m 'gpu_subset and not cuda'")
    assert tests["passed"] >= 3 and tests["failed"] == tests["error"] == 0
    # the GPU selection is counted from the test files: every kernel op's file contributes
    assert a["gpu_selection"] > 100
    assert a["environment"]["torch"] and a["backends"]["chosen"]["layer_norm"] == "cpu"
    assert a["sanitizer"][0]["rc"] == 0
    assert "gpu_subset" in (out / "a.log").read_text()
    assert "## Stage a (smoke, CPU)" in (out / "summary.md").read_text()


def test_stage_b_writes_bench_rows_and_a_dispatch_proposal(smoke_dir):
    out, _ = smoke_dir
    rows = json.loads((out / "b.json").read_text())
    assert {r["op"] for r in rows} == {"layer_norm", "adamw_step"}
    assert all("median_ms" in r or "skipped" in r for r in rows)
    b = json.loads((out / "summary.json").read_text())["b"]
    assert b["ops"]["layer_norm"]["timed"] > 0 and b["ops"]["adamw_step"]["timed"] > 0
    proposed = {p["op"]: p for p in b["dispatch"]}
    assert set(proposed) == {"layer_norm", "adamw_step"}
    assert all(p["device"] == "cpu" and set(p["row"]) <= set(IMPLEMENTED[p["op"]])
               for p in proposed.values())
    assert '"layer_norm": {"cpu": (' in (out / "b.log").read_text()


def test_stage_c_profiles_and_records_the_dispatch(smoke_dir):
    out, _ = smoke_dir
    reports = json.loads((out / "c.json").read_text())
    assert [(r["preset"], r["compile"]) for r in reports] == [("tiny", False)]
    assert reports[0]["tokens_per_s"] > 0 and reports[0]["peak_memory_bytes"] > 0
    c = json.loads((out / "summary.json").read_text())["c"]
    assert set(c["dispatch"]["chosen"]) == set(IMPLEMENTED)
    assert [s["skipped"] for s in c["steps"] if "--compile" in s["name"]] == [
        "smoke: torch.compile on a CPU costs minutes"]
    assert "| tiny | False |" in (out / "summary.md").read_text()


def test_a_stage_out_of_time_stops_its_step_and_still_writes_its_summary(tmp_path):
    # 15 s of the 40 are kept for the summary; a profile of 100000 steps cannot finish in the rest
    run = gpu_check("--stage", "c", "--smoke", "--out", str(tmp_path), "--budget", "40",
                    env={"PROFILE_STEPS": "100000"})
    assert run.returncode == 1, run.stdout[-3000:]
    c = json.loads((tmp_path / "summary.json").read_text())["c"]
    steps = {s["name"]: s for s in c["steps"]}
    assert steps["profile tiny"]["timed_out"] and steps["profile tiny"]["rc"] != 0
    assert c["finished"] and c["seconds"] < 40
    assert "cut off" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "c.json").exists()  # nothing measured, nothing claimed


def test_bad_usage_and_no_gpu_are_clear_errors(tmp_path):
    run = gpu_check("--stage", "d")
    assert run.returncode == 2 and "usage: bash bench/gpu_check.sh" in run.stderr
    if not _has_nvidia_gpu():
        run = gpu_check("--stage", "a", "--out", str(tmp_path))
        assert run.returncode == 2 and "finds no NVIDIA GPU" in run.stderr
        assert list(tmp_path.iterdir()) == []


def _has_nvidia_gpu() -> bool:
    try:
        found = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True)
        return found.returncode == 0
    except OSError:
        return False
