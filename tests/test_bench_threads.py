"""bench/bench_threads.py: thread counts take turns, rows carry tokens/s, speedup and the load
average, bad arguments are one clear line."""
import json

import pytest
import torch

from fastlm.bench import bench_threads


def test_thread_counts_take_turns_and_are_restored():
    seen = []
    before = torch.get_num_threads()
    times = bench_threads.measure(lambda i: seen.append((i, torch.get_num_threads())), [1, 2],
                                  rounds=2, steps=2)
    # per round and count: one untimed step, then the timed ones; steps are numbered on
    assert [n for _, n in seen] == [1, 1, 1, 2, 2, 2] * 2
    assert [i for i, _ in seen] == list(range(12))
    assert {n: len(t) for n, t in times.items()} == {1: 4, 2: 4}
    assert torch.get_num_threads() == before


def test_cli_writes_rows(tmp_path):
    path = tmp_path / "threads.json"
    assert bench_threads.main(["--presets", "tiny", "--threads", "1,2", "--precisions", "fp32",
                               "--rounds", "1", "--steps", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [(r["preset"], r["threads"]) for r in rows] == [("tiny", 1), ("tiny", 2)]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_ms"] * 1e3)
        assert r["samples"] == 1 and r["device_type"] == "cpu"
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[0]["step_ms"] / rows[1]["step_ms"])


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads"), (["--threads", "a"], "--threads"),
    (["--precisions", "int8"], "--precisions"), (["--rounds", "0"], "--rounds"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_threads.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unknown_preset_is_a_clear_error(capsys):
    assert bench_threads.main(["--presets", "nope", "--threads", "1", "--rounds", "1",
                               "--steps", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_step_floor_replays_the_steps_matmuls(tmp_path):
    from fastlm.bench import bench_step_floor

    path = tmp_path / "floor.json"
    assert bench_step_floor.main(["--preset", "tiny", "--batch", "1", "--seq-len", "16",
                                  "--steps", "2", "--json", str(path)]) == 0
    (r,) = json.loads(path.read_text())
    # tiny: 4 blocks x (qkv, proj, fc, fc2) + the head, each with its backward products
    assert r["matmul_calls"] >= 17 and r["threads"] == 1
    assert r["step_cpu_ms"] > r["matmul_cpu_ms"] > 0
    assert r["step_over_matmul"] == pytest.approx(r["step_cpu_ms"] / r["matmul_cpu_ms"])


def test_step_floor_records_shapes_strides_and_dtypes(monkeypatch):
    """A bf16 step's products replay in bf16 and a transposed operand stays transposed: the
    floor of a bf16 step timed in float32 was twice its real matmul time."""
    from fastlm.bench import bench_step_floor

    a, b = torch.randn(5, 7), torch.randn(3, 7).t()
    a16, b16 = a.bfloat16(), b.bfloat16()
    calls = bench_step_floor.recorded_matmuls(
        lambda _i: (a @ b, torch.addmm(torch.randn(3), a, b), a16 @ b16))
    assert calls == [("aten::mm", [([5, 7], [7, 1], "float"), ([7, 3], [1, 7], "float")]),
                     ("aten::addmm", [([3], [1], "float"), ([5, 7], [7, 1], "float"),
                                      ([7, 3], [1, 7], "float")]),
                     ("aten::mm", [([5, 7], [7, 1], "c10::BFloat16"),
                                   ([7, 3], [1, 7], "c10::BFloat16")])]
    replayed = []
    monkeypatch.setattr(torch, "mm",
                        lambda x, y: replayed.append((x.dtype, x.stride(), y.dtype, y.stride())))
    bench_step_floor.replayer([calls[2]])()
    assert replayed == [(torch.bfloat16, (7, 1), torch.bfloat16, (1, 7))]
