"""Export a fastlm BERT (fastlm.models.bert) as Hugging Face BertForMaskedLM (safetensors +
config.json, and tokenizer.json when a tokenizer is given). fastlm.export.hf.export_hf calls this
for model.arch = "bert"; transformers is not needed to write it.

The architecture already is BertForMaskedLM's (post-LN, exact GELU, learned positions, token
types, MLM transform + decoder + bias), so the mapping is by name, plus:
- fastlm fuses q, k, v into one matmul (rows q | k | v); BERT keeps query, key, value.
- The vocabulary is the tokenizer's ids followed by fastlm's four reserved specials ([PAD],
  [CLS], [SEP], [MASK]); the exported tokenizer gets them as special tokens with those ids, and
  config.json names [PAD] as pad_token_id.
- layer_norm_eps is the model's norm_eps (BERT's own is 1e-12, tiny-bert's preset too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastlm.models.bert import BERT, SPECIALS, mlp_width
from fastlm.tokenizer import Tokenizer


def hf_config(model: BERT) -> dict:
    cfg = model.config
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert",
            "vocab_size": model.n_tokens, "hidden_size": cfg.n_embd,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": mlp_width(cfg), "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": cfg.block_size, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
            "pad_token_id": model.pad_id, "tie_word_embeddings": cfg.tie_embeddings,
            "use_cache": False, "torch_dtype": "float32"}


def hf_tensors(model: BERT) -> dict[str, torch.Tensor]:
    """BertForMaskedLM's state dict (names and layouts) from the fastlm model's."""
    sd, C = model.state_dict(), model.config.n_embd
    e = "bert.embeddings."
    out = {e + "word_embeddings.weight": sd["wte.weight"],
           e + "position_embeddings.weight": sd["wpe.weight"],
           e + "token_type_embeddings.weight": sd["wtt.weight"],
           e + "LayerNorm.weight": sd["norm_emb.weight"], e + "LayerNorm.bias": sd["norm_emb.bias"]}
    for i in range(model.config.n_layer):
        f, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{f}attn.qkv.{kind}"].split(C, dim=0)
            out.update({f"{h}attention.self.query.{kind}": q,
                        f"{h}attention.self.key.{kind}": k,
                        f"{h}attention.self.value.{kind}": v,
                        f"{h}attention.output.dense.{kind}": sd[f"{f}attn.proj.{kind}"],
                        f"{h}attention.output.LayerNorm.{kind}": sd[f"{f}norm1.{kind}"],
                        f"{h}intermediate.dense.{kind}": sd[f"{f}mlp.up.{kind}"],
                        f"{h}output.dense.{kind}": sd[f"{f}mlp.down.{kind}"],
                        f"{h}output.LayerNorm.{kind}": sd[f"{f}norm2.{kind}"]})
    p = "cls.predictions."
    for kind in ("weight", "bias"):
        out[f"{p}transform.dense.{kind}"] = sd[f"head_dense.{kind}"]
        out[f"{p}transform.LayerNorm.{kind}"] = sd[f"head_norm.{kind}"]
    # transformers ties decoder.bias to predictions.bias; both are written so either loads.
    out[p + "bias"] = out[p + "decoder.bias"] = sd["lm_bias"]
    out[p + "decoder.weight"] = sd["lm_head.weight"]  # the token table itself when tied
    return out


def with_specials(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The tokenizer with BERT's reserved specials appended at the model's ids."""
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"export: the tokenizer has {tokenizer.vocab_size} ids but the BERT "
                         f"model's vocabulary (before its {len(SPECIALS)} specials) is "
                         f"{vocab_size}; the specials would get other ids")
    specials = dict(tokenizer.special_tokens)
    tokens = list(tokenizer.tokens)
    for name in SPECIALS:
        specials[name] = len(tokens)
        tokens.append(name.encode("utf-8"))
    return Tokenizer(tokens, specials, tokenizer.pattern, tokenizer.merges)


def export_bert(model: BERT, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write model (and tokenizer) as a BertForMaskedLM directory; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu().clone()
               for k, v in hf_tensors(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    if tokenizer is not None:
        with_specials(tokenizer, model.config.vocab_size).save_hf(out / "tokenizer.json")
        tc = {"tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": model.config.block_size, "clean_up_tokenization_spaces": False,
              "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return out
