"""`python -m fastlm.bench dispatch`: bench rows -> the DISPATCH rows they justify."""
import json
import os
import subprocess
import sys

import pytest
from fastlm.bench import dispatch

from fastlm.ops.dispatch import DISPATCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11.0",
       "triton": "3.6.0", "commit": "abc1234", "date": "2026-12-07T12:00:00+00:00"}


def row(op, provider, ms, dtype="bfloat16", shape=(32768, 4096), mode="full", **extra):
    return {"op": op, "provider": provider, "median_ms": ms, "dtype": dtype,
            "shape": list(shape), "mode": mode, **ENV, **extra}


def synthetic():
    return [
        # layer_norm: triton 2x torch in bf16, cuda 1.5x in fp32 -> triton, cuda, torch
        row("layer_norm", "torch", 2.0), row("layer_norm", "fastlm-cuda", 1.6),
        row("layer_norm", "fastlm-triton", 1.0), row("layer_norm", "torch-compile", 0.5),
        row("layer_norm", "fastlm-reference", 9.0),
        row("layer_norm", "torch", 3.0, dtype="float32"),
        row("layer_norm", "fastlm-cuda", 2.0, dtype="float32"),
        row("layer_norm", "fastlm-triton", 2.5, dtype="float32"),
        row("layer_norm", "fastlm-triton", 1.0, mode="fwd"),  # another mode: not deciding
        row("layer_norm", "liger", None, skipped="ImportError: no liger_kernel"),
        # adamw_step: the fused AdamW is the torch backend, measured in mode "step"
        row("adamw_step", "torch-fused", 4.0, mode="step", shape=(12, 768, 50304)),
        row("adamw_step", "fastlm-cuda", 5.0, mode="step", shape=(12, 768, 50304)),
        row("adamw_step", "torch-foreach", 6.0, mode="step", shape=(12, 768, 50304)),
        # a re-run supersedes: the newer rms_norm row wins
        row("rms_norm", "torch", 1.0), row("rms_norm", "fastlm-triton", 2.0),
        {**row("rms_norm", "fastlm-triton", 0.5), "date": "2026-12-08T00:00:00+00:00"},
        # not an op of fastlm.ops: ignored
        row("bpe", "fastlm", 1.0),
    ]


def by_key(proposals):
    return {(p["op"], p["device"]): p for p in proposals}


def test_fastest_dispatchable_backend_first_with_the_number_behind_it():
    p = by_key(dispatch.propose(synthetic()))
    ln = p[("layer_norm", "cuda")]
    assert ln["current"] == "torch" and ln["mode"] == "full"
    assert ln["row"] == ["triton", "cuda", "torch"]  # geomean over dtypes: 1.73x, 1.56x, 1x
    assert ln["speedup_geomean"]["triton"] == pytest.approx((2.0 * 1.2) ** 0.5)
    bf16 = next(c for c in ln["cases"] if c["dtype"] == "bfloat16")
    assert (bf16["best"], bf16["best_ms"], bf16["speedup_vs_current"]) == ("triton", 1.0, 2.0)
    assert (bf16["best_peer"], bf16["best_peer_ms"]) == ("torch-compile", 0.5)
    f32 = next(c for c in ln["cases"] if c["dtype"] == "float32")
    assert f32["best"] == "cuda" and f32["speedup_vs_current"] == pytest.approx(1.5)
    # peers, the reference and skipped rows never enter a DISPATCH row
    assert set(ln["row"]) <= {"torch", "cuda", "triton"}


def test_torch_fused_is_adamws_torch_backend_and_unmeasured_backends_keep_their_place():
    p = by_key(dispatch.propose(synthetic()))
    adamw = p[("adamw_step", "cuda")]
    assert adamw["mode"] == "step" and adamw["row"] == ["torch", "cuda"]
    assert adamw["cases"][0]["best_peer"] == "torch-foreach"
    rms = p[("rms_norm", "cuda")]
    assert rms["row"][:2] == ["triton", "torch"]  # the newest triton row (0.5 ms) won
    assert rms["row"][2:] == [b for b in DISPATCH["rms_norm"]["cuda"] if b not in rms["row"][:2]]
    assert ("bpe", "cuda") not in p


def test_a_backend_with_a_failed_test_is_left_out(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_layer_norm" '
        'name="test_matches_reference[cuda-triton-torch.bfloat16-(17, 1025)]">'
        '<failure message="max |diff| 1e-1"/></testcase>'
        '<testcase classname="tests.test_layer_norm" '
        'name="test_matches_reference[cuda-cuda-torch.bfloat16-(17, 1025)]"/>'
        '<testcase classname="tests.test_layer_norm" '
        'name="test_matches_reference[cpu-cuda-torch.bfloat16-(1, 7)]"><skipped/></testcase>'
        '</testsuite></testsuites>')
    failed = dispatch.failed_backends(str(junit))
    assert failed == {("layer_norm", "cuda"): {"triton"}}
    ln = by_key(dispatch.propose(synthetic(), failed=failed))[("layer_norm", "cuda")]
    assert "triton" not in ln["row"] and ln["row"][0] == "cuda"
    assert ln["excluded"] == {"triton": "a test failed on this device"}


@pytest.mark.parametrize("test_id, expected", [
    ("tests/test_layer_norm.py::test_matches_reference[cuda-triton-torch.float32-(1, 7)]",
     ("layer_norm", "cuda", {"triton"})),
    ("tests/test_adamw_step.py::test_matches_reference_over_many_steps[cuda-cuda-torch.float32-"
     + "param]", ("adamw_step", "cuda", {"cuda"})),
    ("tests/test_layer_norm.py::test_matches_reference[cuda-torch-torch.float32-(1, 7)]",
     ("layer_norm", "cuda", {"torch"})),
    ("tests/test_attention.py::test_triton_matches_reference[cuda-torch.bfloat16-(1, 1, 1, 1, 1,"
     + " 32)-True]", ("attention", "cuda", {"triton"})),
    ("tests/test_model.py::test_something[cuda]", None),
    ("tests/test_layer_norm.py::test_bad_input_is_a_clear_error[triton]", None),
])
def test_test_ids_name_op_device_and_backend(test_id, expected):
    assert dispatch.parse_test_id(test_id) == expected


def test_printed_lines_paste_into_dispatch_py():
    text = dispatch.render(dispatch.propose(synthetic()), synthetic(), ["b.json"])
    line = next(ln for ln in text.splitlines() if ln.startswith('    "layer_norm": '))
    assert line == ('    "layer_norm": {"cpu": ("cpu", "torch"), '
                    '"cuda": ("triton", "cuda", "torch")},')
    assert eval("{" + line.strip() + "}")["layer_norm"]["cuda"] == ("triton", "cuda", "torch")
    assert "bfloat16 32768x4096: triton 1 ms, 2.00x torch (2 ms)" in text
    assert "NVIDIA H100 80GB HBM3 (torch 2.11.0, triton 3.6.0, commit abc1234" in text
    single = dispatch.dispatch_line("attention", {"cuda": ["torch"]})
    assert single == '    "attention": {"cuda": ("torch",)},'


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastlm.bench", "dispatch", *args], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_on_bench_json_measured_here(tmp_path):
    rows = tmp_path / "rows.json"
    bench = subprocess.run(
        [sys.executable, "-m", "fastlm.bench", "--ops", "layer_norm", "--sizes", "64x32",
         "--dtypes", "float32", "--budget", "0.01", "--providers", "torch,fastlm-cpu",
         "--device", "cpu", "--json", str(rows)], check=False, cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr[-2000:]
    out = tmp_path / "proposal.json"
    run = run_cli(str(rows), "--json", str(out))
    assert run.returncode == 0, run.stderr
    (p,) = json.loads(out.read_text())
    assert (p["op"], p["device"], p["current"]) == ("layer_norm", "cpu", "cpu")
    assert sorted(p["row"]) == sorted(DISPATCH["layer_norm"]["cpu"])
    assert {c["best"] for c in p["cases"]} <= {"cpu", "torch"}
    assert '    "layer_norm": {"cpu": (' in run.stdout


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"op": "layer_norm"}')
    run = run_cli(str(bad))
    assert run.returncode != 0 and "not a list of bench rows" in run.stderr + run.stdout
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([row("bpe", "fastlm", 1.0)]))
    run = run_cli(str(empty))
    assert run.returncode == 1 and "no timed rows of fastlm's ops" in run.stdout
    run = run_cli(str(empty), "--tests", str(tmp_path / "missing.xml"))
    assert run.returncode == 2 and "--tests: no such file" in run.stderr
