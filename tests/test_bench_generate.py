"""bench_generate's llama.cpp rows at tiny size: its batched low-level decoding gives llama.cpp's
greedy tokens for every row (equal to fastlm's on an f32 GGUF), and the bench writes one row per
(engine, precision, batch, threads)."""
import json

import pytest
import torch
from fastlm.bench import bench_generate as bench

from fastlm.generate.decode import BatchDecoder, SamplingParams
from tests.interop import require
from tests.lm_fixtures import tiny_model

llama_cpp = require("llama_cpp")
pytest.importorskip("gguf", reason="GGUF export needs the gguf package")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model("gpt2", vocab_size=257, block_size=64)
    paths = bench.gguf_files(model, ["f32", "q8_0"], str(tmp_path_factory.mktemp("gguf")))
    return model, paths


def fastlm_greedy(model, prompts, new):
    dec = BatchDecoder(model, prompts, SamplingParams(max_new_tokens=new, temperature=0))
    while not dec.done:
        dec.step()
    return dec.tokens


def test_batched_llama_cpp_greedy_equals_fastlm_f32(exported):
    """Three sequences in one llama_decode per step: a wrong position or sequence id would give
    another row's (or no) context and different tokens."""
    model, paths = exported
    prompts = torch.randint(0, 257, (3, 9), generator=torch.Generator().manual_seed(1)).tolist()
    llm = bench.LlamaCpp(paths["f32"], "f32", batch=3, seq_len=24, threads=1)
    try:
        got = llm.generate(prompts, 12)
        assert got == fastlm_greedy(model, prompts, 12)
        assert llm.generate(prompts[:1], 12) == got[:1]  # the cache is cleared between calls
    finally:
        llm.close()


def test_quantized_gguf_decodes(exported):
    _, paths = exported
    llm = bench.LlamaCpp(paths["q8_0"], "q8_0", batch=2, seq_len=16, threads=1)
    try:
        out = llm.generate([[1, 2, 3], [4, 5, 6]], 5)
    finally:
        llm.close()
    assert [len(o) for o in out] == [5, 5] and all(0 <= t < 257 for o in out for t in o)


def test_unknown_gguf_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF type"):
        bench.gguf_files(tiny_model("gpt2"), ["q4_k"], str(tmp_path))


def test_cpu_clock_needs_one_thread():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--clock", "cpu", "--threads", "1,2"])


def test_rows_per_engine_precision_batch_threads(tmp_path):
    path = tmp_path / "gen.json"
    assert bench.main(["--preset", "tiny", "--batches", "1,2", "--prompt", "5", "--new", "16",
                       "--repeats", "1", "--server-clients", "0", "--no-hf", "--threads", "1",
                       "--llama-cpp", "auto,q8_0", "--continuous", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    keys = {(r["engine"], r["precision"].split()[0], r["batch"], r["threads"]) for r in rows}
    assert keys == {(e, p, b, 1) for b in (1, 2) for e, p in
                    [("fastlm", "float32"), ("llama.cpp", "f32"), ("llama.cpp", "q8_0")]}
    assert [r["batch"] for r in rows if r["provider"] == "fastlm.continuous"] == [2]
    for r in rows:
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["t_first_s"])
        if r["t_total_s"] > r["t_first_s"]:  # under load a 16-step difference can vanish
            assert r["decode_tokens_per_s"] == pytest.approx(
                r["batch"] * 16 / (r["t_total_s"] - r["t_first_s"]))
        assert r["llama_cpp"]["system_info"]  # what the ggml build runs, in every row
    for r in rows:
        if r["engine"] == "llama.cpp":
            ours = next(o for o in rows if o["provider"] == "fastlm" and o["batch"] == r["batch"])
            assert r["fastlm_decode_speedup"] == pytest.approx(
                ours["decode_tokens_per_s"] / r["decode_tokens_per_s"], nan_ok=True)
