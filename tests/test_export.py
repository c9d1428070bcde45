"""Hugging Face export/import: transformers loads the export offline and its logits and greedy
generation equal fastlm's; tiny random transformers models import with equal logits."""
import json

import pytest
import torch

from fastlm.export.hf import ExportError, export_hf, import_hf, main
from fastlm.generate.decode import generate
from fastlm.tokenizer import Tokenizer
from tests.lm_fixtures import save_checkpoint, tiny_model

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

VARIANTS = [("gpt2", {}), ("gpt2", {"bias": False, "tie_embeddings": False}),
            ("llama", {}), ("llama", {"tie_embeddings": True, "n_kv_head": 1})]


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


@pytest.mark.parametrize("arch,over", VARIANTS)
def test_export_logits_and_greedy_equal(tmp_path, arch, over):
    model = tiny_model(arch, **over)
    tok = Tokenizer.byte(["<|endoftext|>"]) if arch == "llama" else Tokenizer.byte()
    if tok.vocab_size > 256:
        model = tiny_model(arch, vocab_size=tok.vocab_size, **over)
    export_hf(model, tmp_path, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "LlamaForCausalLM")
    idx = torch.randint(0, 256, (2, 23))
    torch.testing.assert_close(hf_logits(hf, idx), model(idx)[0], rtol=1e-4, atol=1e-4)
    # greedy generation through transformers' own generate and tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompt = "fn main"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt)
    out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    ours = generate(model, tok, prompt, max_new_tokens=12, temperature=0)
    assert tok.decode(out[0, ids.shape[1]:].tolist()) == ours


def test_export_and_import_exact_gelu(tmp_path):
    """model.gelu=exact (nanoGPT's nn.GELU) exports as HF "gelu" and imports back as exact. The
    two GELUs move these logits by ~1e-3, 5x the tolerance, so a wrong activation on either side
    fails (checked first)."""
    model = tiny_model("gpt2", gelu="exact")
    idx = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(0))
    ours = model(idx)[0]
    for block in model.blocks:
        block.mlp.gelu = "tanh"
    assert (model(idx)[0] - ours).abs().max() > 1e-3  # the tolerance below can tell them apart
    for block in model.blocks:
        block.mlp.gelu = "none"
    export_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    torch.testing.assert_close(hf_logits(hf, idx), ours, rtol=0, atol=2e-4)
    back, _ = import_hf(tmp_path)
    assert back.config.gelu == "exact"
    torch.testing.assert_close(back(idx)[0], ours, rtol=0, atol=2e-4)


def test_export_rejects_gqa_gpt2(tmp_path):
    with pytest.raises(ExportError, match="grouped-query"):
        export_hf(tiny_model("gpt2", n_kv_head=2), tmp_path)


def _tiny_hf(arch, tie):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=32, n_layer=2,
                                      n_head=4, tie_word_embeddings=tie)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=72,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=40,
                                       rope_theta=500.0, tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_import_hf(tmp_path, arch, tie):
    hf = _tiny_hf(arch, tie)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, tok = import_hf(tmp_path)
    assert tok is None and model.config.arch == arch and model.config.tie_embeddings == tie
    idx = torch.randint(0, 300, (2, 17))
    torch.testing.assert_close(model(idx)[0], hf_logits(hf, idx), rtol=1e-4, atol=1e-4)
    # and back out again: the round trip is exact
    export_hf(model, tmp_path / "again")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again",
                                                             local_files_only=True).eval()
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), rtol=1e-5, atol=1e-5)


def test_import_refuses_pickles_and_bad_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match="config.json lacks"):
        import_hf(tmp_path)
    _tiny_hf("gpt2", True).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ExportError, match="pickles and are never loaded"):
        import_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="model_type='bert'"):
        import_hf(tmp_path)


def test_cli_round_trip(tmp_path, capsys):
    model = tiny_model("llama")
    save_checkpoint(tmp_path / "run", model)
    assert main(["--checkpoint", str(tmp_path / "run"), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    from fastlm.restore import load
    lm = load(tmp_path / "back")
    idx = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(lm.model(idx)[0], model(idx)[0], rtol=1e-6, atol=1e-6)
    assert "tokenizer.json" in lm.meta.notes[0]
