"""fastlm.train.flops: the FLOPs-per-token formula by hand and peak_flops' table; fastlm.profile:
MFU, a CPU run of the tiny preset (valid JSON, NVML fields null with the reason, the step against
its matmul time), a bf16 run through the trainer's step, and NVML without NVML."""
import json
import sys

import pytest
import torch

import fastlm.tools.profile as prof
from fastlm.config import ModelConfig, model_preset
from fastlm.tools import nvml
from fastlm.train import flops


def test_flops_per_token_gpt2_by_hand():
    # tiny: gpt2 flavour, C = 128, L = 4, V = 256, biases, tied head. Per block: 2 LayerNorms
    # (weight + bias: 2C each), qkv C*3C + 3C, proj C*C + C, MLP C*4C + 4C and 4C*C + C.
    C, L, V = 128, 4, 256
    block = 2 * (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    N = L * block + 2 * C + V * C  # + final LayerNorm + the (tied) output head's matmul
    for T in (128, 64):
        assert flops.flops_per_token(model_preset("tiny"), T) == 6 * N + 12 * L * T * C


def test_flops_per_token_llama_gqa_by_hand():
    cfg = ModelConfig(preset="", arch="llama", vocab_size=64, block_size=16, n_layer=2,
                      n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64, bias=False,
                      tie_embeddings=False)
    C, L, V, H, Hkv, D, F = 32, 2, 64, 4, 2, 8, 64
    # Per block: 2 RMSNorms (C), qkv C -> (H + 2 Hkv) D, proj C*C, SwiGLU up C -> 2F, down F*C.
    block = 2 * C + C * (H + 2 * Hkv) * D + C * C + C * 2 * F + F * C
    N = L * block + C + V * C  # + final RMSNorm + the untied head (the embedding is not a matmul)
    assert flops.flops_per_token(cfg, 16) == 6 * N + 12 * L * 16 * C == 136128


def test_flops_per_token_rejects_empty_sequences():
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        flops.flops_per_token(model_preset("tiny"), 0)


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", torch.float16, 835.5),
    ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312),
    ("NVIDIA A100 80GB PCIe", "bf16", 312),
    ("NVIDIA L4", torch.bfloat16, 121),
    ("NVIDIA L40S", torch.bfloat16, 362.05),
    ("Tesla T4", torch.float16, 65),
])
def test_peak_flops_known_gpus(name, dtype, tflops):
    assert flops.peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, dtype", [
    ("AMD EPYC 7B13", torch.bfloat16), ("Some Future GPU", torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", torch.float32), ("Tesla T4", torch.bfloat16),
])
def test_peak_flops_unknown_is_none(name, dtype):
    assert flops.peak_flops(name, dtype) is None


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    path, trace = out / "tiny.json", out / "trace.json"
    assert prof.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2",
                      "--seq-len", "64", "--device", "cpu", "--top", "5", "--json", str(path),
                      "--trace", str(trace)]) == 0
    return json.loads(path.read_text()), trace


def test_cpu_run_writes_valid_json(cpu_report):
    r, trace = cpu_report
    assert r["preset"] == "tiny" and r["batch"] == 2 and r["seq_len"] == 64
    assert r["tokens_per_step"] == 128 and r["steps"] == 2
    assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(128 / (r["step_ms"] / 1e3))
    assert r["flops_per_token"] == flops.flops_per_token(model_preset("tiny"), 64)
    assert r["peak_memory_bytes"] > 0
    assert r["mfu"] is None  # no known peak for a CPU
    for key in ("power_w", "energy_j_per_token", "energy_j_per_step", "nvml"):
        assert r[key] is None, key
    assert any("need an NVIDIA GPU" in n for n in r["notes"])
    assert 1 <= len(r["top_ops"]) <= 5
    assert all(op["name"] and op["self_ms"] > 0 and op["pct_of_step"] > 0 for op in r["top_ops"])
    assert r["device_type"] == "cpu" and r["torch"] and "date" in r
    assert json.loads(trace.read_text())  # a Chrome trace is JSON
    m = r["matmul"]  # the step against its matmul floor (CPU)
    assert m["matmul_ms"] > 0 and m["other_ms"] == pytest.approx(r["step_ms"] - m["matmul_ms"])
    assert m["step_over_matmul"] == pytest.approx(r["step_ms"] / m["matmul_ms"])
    assert 1 <= len(m["top_other"]) <= 5
    assert not {op["name"] for op in m["top_other"]} & prof.MATMUL_OPS


def test_matmul_breakdown_separates_matmuls_from_the_rest():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    with torch.profiler.profile() as p:
        for _ in range(2):
            (a @ b).exp().sum()
    m = prof.matmul_breakdown(p, profile_steps=2, step_ms=1e3, k=10)
    names = [op["name"] for op in m["top_other"]]
    assert m["matmul_ms"] > 0 and "aten::mm" not in names
    assert "aten::exp" in names and "aten::sum" in names
    exp = next(op for op in m["top_other"] if op["name"] == "aten::exp")
    assert exp["calls"] == 1 and exp["self_ms"] > 0  # per profiled step
    assert m["other_ms"] == pytest.approx(1e3 - m["matmul_ms"])


def test_threads_option_applies_and_restores(monkeypatch):
    before = torch.get_num_threads()
    r = prof.profile("tiny", steps=1, warmup=0, batch=1, seq_len=16, device="cpu",
                     profile_steps=1, threads=1, log=lambda *_: None)
    assert r["threads"] == 1 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        prof.profile("tiny", threads=0, device="cpu", log=lambda *_: None)


def test_mfu_is_model_flops_over_the_peak(monkeypatch):
    monkeypatch.setattr(prof, "peak_flops", lambda name, dtype: 2e9)
    r = prof.profile("tiny", steps=1, warmup=0, batch=1, seq_len=32, device="cpu",
                     profile_steps=1, log=lambda *_: None)
    expected = flops.flops_per_token(model_preset("tiny"), 32) * r["tokens_per_s"] / 2e9
    assert r["mfu"] == pytest.approx(expected)
    assert r["peak_tflops"] == pytest.approx(2e-3)


def test_bf16_runs_the_trainers_autocast_step(monkeypatch):
    # --dtype bfloat16 is train.precision=bf16: every forward under the trainer's autocast
    import fastlm.train.step as step_module
    real, seen = step_module.precision_context, []
    monkeypatch.setattr(step_module, "precision_context",
                        lambda precision, device: seen.append(precision) or real(precision, device))
    r = prof.profile("tiny", steps=1, warmup=0, batch=1, seq_len=32, dtype="bf16",
                     device="cpu", profile_steps=1, log=lambda *_: None)
    assert r["dtype"] == "bfloat16" and r["step_ms"] > 0
    assert seen and set(seen) == {"bf16"}


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "tiny", "--seq-len", "4096", "--device", "cpu"], "exceeds the preset's"),
    (["--preset", "tiny", "--steps", "0", "--device", "cpu"], "--steps"),
    (["--preset", "tiny", "--dtype", "int8", "--device", "cpu"], "--dtype"),
    (["--preset", "tiny", "--threads", "0", "--device", "cpu"], "--threads"),
])
def test_bad_arguments_name_what_to_fix(argv, message, capsys):
    assert prof.main(argv) == 2
    assert message in capsys.readouterr().err


def test_nvml_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    reason = nvml.unavailable_reason()
    assert "pip install nvidia-ml-py" in reason and "NVIDIA GPU" in reason
    with pytest.raises(nvml.NVMLUnavailable, match="nvidia-ml-py is not installed"):
        nvml.NVMLSampler().start()
    with pytest.raises(nvml.NVMLUnavailable):
        nvml.device_info()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine has NVML")
def test_nvml_without_a_driver():
    pytest.importorskip("pynvml")
    reason = nvml.unavailable_reason()
    assert reason and "NVIDIA GPU" in reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_nvml_on_a_gpu():
    pytest.importorskip("pynvml")
    assert nvml.unavailable_reason() is None
    info = nvml.device_info()
    assert info["name"] and info["driver"]
    with nvml.NVMLSampler(interval_s=0.01) as sampler:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            a = a @ a.T / 4096
        torch.cuda.synchronize()
    s = sampler.summary()
    assert s["samples"] >= 2 and s["power_w"] > 0 and s["energy_j"] > 0
