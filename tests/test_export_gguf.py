"""GGUF export: gguf's own reader gets every tensor back equal, the metadata llama.cpp needs, the
byte-level tokenizer; the RoPE row permutation keeps attention scores unchanged; llama.cpp
(llama-cpp-python, when installed) greedy-decodes the same tokens as fastlm."""
import numpy as np
import pytest
import torch

from fastlm.export.gguf import (
    GGUFExportError,
    export_gguf,
    gguf_tensors,
    rope_permute,
    rope_unpermute,
)
from fastlm.export.hf import main
from fastlm.generate.decode import BatchDecoder, SamplingParams
from fastlm.tokenizer import Tokenizer
from tests.interop import require
from tests.lm_fixtures import save_checkpoint, tiny_model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")


def read(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}

    def field(name):
        f = r.fields[name]
        if len(f.types) and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tobytes().decode() if f.types[-1] == gguf.GGUFValueType.STRING
                    else f.parts[i][0] for i in f.data]
        v = f.parts[f.data[0]]
        return v.tobytes().decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]
    return tensors, field


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tensors_and_metadata_read_back(tmp_path, arch, dtype):
    tok = Tokenizer.byte(["<|endoftext|>"])
    model = tiny_model(arch, vocab_size=260)  # ids 257..259: padding past the tokenizer
    path = export_gguf(model, tmp_path, tok, dtype)
    tensors, field = read(path)
    want = gguf_tensors(model)
    assert set(tensors) == set(want)
    for name, t in want.items():
        t = t.detach().float().numpy()
        if dtype == "f16" and t.ndim == 2:
            t = t.astype(np.float16)
        got = tensors[name].reshape(t.shape)
        assert got.dtype == t.dtype and np.array_equal(got, t), name
    cfg = model.config
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == cfg.n_layer
    assert field(f"{arch}.context_length") == cfg.block_size
    assert field(f"{arch}.attention.head_count") == cfg.n_head
    if arch == "llama":
        assert field("llama.attention.head_count_kv") == cfg.kv_heads
        assert field("llama.rope.dimension_count") == cfg.head_dim
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 260 and tokens[256] == "<|endoftext|>" and tokens[259] == "[PAD259]"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.eos_token_id") == 256


def _rope(x, interleaved):
    # x: (T, D) -> rotated with angles pos * theta^(-2i/D), pairs (i, i + D/2) or (2i, 2i + 1)
    T, D = x.shape
    ang = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = ang.cos(), ang.sin()
    a, b = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, :D // 2], x[:, D // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).reshape(T, D) if interleaved else torch.cat([ra, rb], -1)


def test_rope_permutation_keeps_scores():
    H, D, C, T = 3, 8, 12, 5
    wq, wk = torch.randn(H * D, C, dtype=torch.float64), torch.randn(H * D, C, dtype=torch.float64)
    x = torch.randn(T, C, dtype=torch.float64)
    assert torch.equal(rope_unpermute(rope_permute(wq, H), H), wq)
    for h in range(H):
        rows = slice(h * D, (h + 1) * D)
        ours = _rope(x @ wq[rows].T, False) @ _rope(x @ wk[rows].T, False).T
        theirs = (_rope(x @ rope_permute(wq, H)[rows].T, True)
                  @ _rope(x @ rope_permute(wk, H)[rows].T, True).T)
        torch.testing.assert_close(theirs, ours)


@pytest.fixture(scope="module")
def bpe():
    pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")
    from fastlm.chat.template import SPECIAL_TOKENS
    from tests.bpe_corpus import stdlib_text
    return {p: Tokenizer.train(iter([stdlib_text(8000)]), vocab_size=320, pattern=p,
                               special_tokens=["<|endoftext|>", *SPECIAL_TOKENS])
            for p in ("gpt4", "gpt2", "none")}


@pytest.mark.parametrize("pattern,pre", [("gpt4", "llama-bpe"), ("gpt2", "gpt-2")])
def test_tokenizer_metadata(tmp_path, bpe, pattern, pre):
    """The llama.cpp pre-tokenizer of the split pattern, the chat template and the ids of the
    special tokens llama.cpp stops at; no bos prepended."""
    from fastlm.chat.template import jinja
    tok = bpe[pattern]
    _, field = read(export_gguf(tiny_model("llama", vocab_size=tok.vocab_size), tmp_path, tok))
    assert field("tokenizer.ggml.pre") == pre
    assert field("tokenizer.chat_template") == jinja(tok)
    assert field("tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field("tokenizer.ggml.eot_token_id") == tok.special_tokens["<|end|>"]
    assert not field("tokenizer.ggml.add_bos_token")


def test_byte_tokenizer_gets_a_merge_that_never_applies(tmp_path):
    """llama.cpp refuses a gpt2 tokenizer without merges; the one written joins a two-character
    piece no merge makes (the llama.cpp test shows the ids stay single bytes)."""
    _, field = read(export_gguf(tiny_model("gpt2"), tmp_path, Tokenizer.byte()))
    assert field("tokenizer.ggml.merges") == ["ĀĀ Ā"]


def test_refuses_a_split_llama_cpp_cannot_reproduce(tmp_path, bpe):
    tok = bpe["none"]
    with pytest.raises(GGUFExportError, match="split pattern 'none' has no llama.cpp "
                                              "pre-tokenizer"):
        export_gguf(tiny_model("llama", vocab_size=tok.vocab_size), tmp_path / "x", tok)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
    with pytest.raises(GGUFExportError, match="tanh GELU"):
        export_gguf(tiny_model("gpt2", gelu="exact"), tmp_path)


def test_cli(tmp_path, capsys):
    save_checkpoint(tmp_path / "run", tiny_model("llama"))
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out",
                 str(tmp_path / "g"), "--gguf-dtype", "f16"]) == 0
    assert (tmp_path / "g" / "model.gguf").stat().st_size > 0
    with pytest.raises(ValueError, match="grouped-query"):
        export_gguf(tiny_model("gpt2", n_kv_head=2), tmp_path / "x")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_llama_cpp_greedy_matches(tmp_path, arch):
    llama_cpp = require("llama_cpp")
    model = tiny_model(arch, vocab_size=257)
    path = export_gguf(model, tmp_path, Tokenizer.byte(["<|endoftext|>"]))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=False)
    prompt = [5, 9, 200, 7]
    got = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(t)
        if len(got) == 8:
            break
    dec = BatchDecoder(model, [prompt], SamplingParams(temperature=0, max_new_tokens=8))
    while not dec.done:
        dec.step()
    assert got == dec.tokens[0]
