"""Export to GGUF (llama.cpp's file format) through the `gguf` package.

    python -m fastlm.export --checkpoint RUN_DIR --format gguf --out DIR [--gguf-dtype f32|f16]

writes DIR/model.gguf with llama.cpp's architecture names: "llama" (llama flavour) or "gpt2"
(gpt2 flavour), the hyper-parameters under "<arch>.*", and a "gpt2"-type (byte-level BPE)
tokenizer: the same token strings and merges as the Hugging Face tokenizer.json export.

The tokenizer encodes in llama.cpp as in fastlm (tests/test_interop_llama_cpp.py):
- tokenizer.ggml.pre names the llama.cpp pre-tokenizer that splits text as the tokenizer's
  pattern does (PRE_TOKENIZERS). llama.cpp has none that keeps text whole, so a BPE trained with
  pattern "none" is refused: llama.cpp would split it and encode differently.
- A vocabulary without merges (the byte tokenizer) needs no splitting, but llama.cpp refuses a
  gpt2-type tokenizer without a merges list, and gguf cannot write an empty one: it gets one merge
  that can never apply (see NO_MERGE).
- The chat template (fastlm.chat.template.jinja) and the special-token ids go in the metadata:
  eos/bos <|endoftext|>, eot <|end|> for chat-tuned tokenizers; no bos is prepended, as in
  fastlm.

Layout differences:
- llama.cpp's Llama RoPE rotates adjacent feature pairs (2i, 2i+1), while fastlm (like
  transformers) rotates (i, i + D/2). The q and k projection rows are therefore permuted per head
  (rope_permute), as llama.cpp's own converter does for transformers checkpoints; the attention
  scores, and so the model's function, are unchanged.
- fastlm's fused SwiGLU up projection is split into ffn_gate and ffn_up; GPT-2's fused qkv stays
  one attn_qkv tensor. Weights are (out, in) as in fastlm; GGUF lists dims innermost first.
- 1-D tensors (norms, biases) stay float32 whatever --gguf-dtype says, as llama.cpp expects.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastlm.chat import template
from fastlm.models.base import LanguageModel
from fastlm.models.gpt import GPT
from fastlm.tokenizer import Tokenizer


class GGUFExportError(ValueError):
    pass


# fastlm split pattern -> llama.cpp pre-tokenizer with the same regex (llama-vocab.cpp); both
# also take a piece that is a whole token as that token, or reach it through the merges.
PRE_TOKENIZERS = {"gpt4": "llama-bpe", "gpt2": "gpt-2"}
# llama.cpp's BPE starts from one symbol per (byte-level) character and merges pairs of symbols
# listed in the merges; "ĀĀ" is two characters that no other merge makes, so this never applies.
NO_MERGE = "ĀĀ Ā"


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H * D, C) rows in rotate-half order -> interleaved-pair order, per head."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_permute."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor (fastlm layout (out, in), permuted where llama.cpp needs)."""
    cfg, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    if cfg.arch == "gpt2":
        if cfg.kv_heads != cfg.n_head:
            raise GGUFExportError("llama.cpp's gpt2 architecture has no grouped-query attention")
        out["position_embd.weight"] = sd["wpe.weight"]
    for i in range(cfg.n_layer):
        f, b = f"blocks.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[f + "norm1.weight"]
        out[b + "ffn_norm.weight"] = sd[f + "norm2.weight"]
        out[b + "attn_output.weight"] = sd[f + "attn.proj.weight"]
        out[b + "ffn_down.weight"] = sd[f + "mlp.down.weight"]
        if cfg.arch == "llama":
            H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
            q, k, v = sd[f + "attn.qkv.weight"].split([H * D, Hkv * D, Hkv * D], dim=0)
            gate, up = sd[f + "mlp.up.weight"].chunk(2, dim=0)
            out.update({b + "attn_q.weight": rope_permute(q, H),
                        b + "attn_k.weight": rope_permute(k, Hkv), b + "attn_v.weight": v,
                        b + "ffn_gate.weight": gate, b + "ffn_up.weight": up})
        else:
            out[b + "attn_qkv.weight"] = sd[f + "attn.qkv.weight"]
            out[b + "ffn_up.weight"] = sd[f + "mlp.up.weight"]
            for ours, theirs in (("norm1", "attn_norm"), ("norm2", "ffn_norm"),
                                 ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
                                 ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
                bias = sd.get(f + ours + ".bias")  # llama.cpp's gpt2 wants every bias
                n = sd[f + ours + ".weight"].shape[0]
                out[b + theirs + ".bias"] = bias if bias is not None else torch.zeros(n)
    if cfg.arch == "gpt2":
        bias = sd.get("norm_f.bias")
        out["output_norm.bias"] = bias if bias is not None else torch.zeros(cfg.n_embd)
    return out


def _vocab(tokenizer: Tokenizer, vocab_size: int
           ) -> tuple[list[str], list[int], list[str], str]:
    """Token strings (byte-level BPE characters, as in tokenizer.json), types, merges and the
    llama.cpp pre-tokenizer; GGUFExportError when llama.cpp cannot split text the same way."""
    import gguf
    with tempfile.TemporaryDirectory() as d:
        doc = json.loads(Path(tokenizer.save_hf(d)).read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in doc["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in doc["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], gguf.TokenType.CONTROL
    merges = list(doc["model"]["merges"])
    if not merges:  # single bytes only: how text is split cannot change the ids
        return tokens, [int(t) for t in types], [NO_MERGE], PRE_TOKENIZERS["gpt2"]
    if tokenizer.pattern not in PRE_TOKENIZERS:
        raise GGUFExportError(
            f"the tokenizer's split pattern {tokenizer.pattern!r} has no llama.cpp "
            f"pre-tokenizer (llama.cpp reproduces {', '.join(PRE_TOKENIZERS)}: "
            f"{', '.join(PRE_TOKENIZERS.values())}), so llama.cpp would tokenize text "
            "differently from fastlm; train the tokenizer with --pattern gpt4 or gpt2")
    return tokens, [int(t) for t in types], merges, PRE_TOKENIZERS[tokenizer.pattern]


def export_gguf(model: LanguageModel, out_dir: str | Path, tokenizer: Tokenizer | None = None,
                dtype: str = "f32", name: str = "fastlm") -> Path:
    """Write out_dir/model.gguf; returns its path."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install gguf") from None
    if dtype not in ("f32", "f16"):
        raise GGUFExportError(f"dtype must be f32 or f16, got {dtype!r}")
    cfg = model.config
    if cfg.arch not in ("gpt2", "llama"):
        raise GGUFExportError(f"model.arch={cfg.arch}: llama.cpp runs the gpt2 and llama "
                              "flavours only")
    if cfg.arch == "gpt2" and cfg.gelu != "tanh":
        raise GGUFExportError("llama.cpp's gpt2 architecture runs the tanh GELU; this model "
                              "was trained with model.gelu=exact")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise GGUFExportError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
                              f"{cfg.vocab_size}")
    vocab = _vocab(tokenizer, cfg.vocab_size) if tokenizer is not None else None
    tensors = gguf_tensors(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.gguf"
    arch = cfg.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_head_count_kv(cfg.kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32"
                    else gguf.LlamaFileType.MOSTLY_F16)
    if vocab is not None:
        tokens, types, merges, pre = vocab
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if tokenizer.eot_id is not None:
            w.add_eos_token_id(tokenizer.eot_id)
            w.add_bos_token_id(tokenizer.eot_id)
        if template.has_chat_tokens(tokenizer):  # llama.cpp ends a chat turn at eot
            w.add_eot_token_id(tokenizer.special_tokens["<|end|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(template.jinja(tokenizer))
    for tname, t in tensors.items():
        arr = t.detach().float().cpu().contiguous().numpy()
        if dtype == "f16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
