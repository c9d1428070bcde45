"""Export to and import from Hugging Face transformers' layout (safetensors + config.json).

    python -m fastlm.export --checkpoint RUN_DIR --format hf --out DIR
    python -m fastlm.export --checkpoint RUN_DIR --format gguf --out DIR  (fastlm.gguf_export)
    python -m fastlm.export --from-hf HF_DIR --out RUN_DIR     (a fastlm checkpoint to generate,
                                                               serve, evaluate or fine-tune;
                                                               --overwrite if RUN_DIR holds a run)
    from fastlm.export.hf import export_hf, import_hf

The gpt2 flavour becomes GPT2LMHeadModel, the llama flavour LlamaForCausalLM; both read back
into fastlm. transformers itself is not needed for either direction (only safetensors): the
mapping is by tensor name, below. Only safetensors files are read: a directory holding only
pytorch_model.bin is refused, never unpickled.

Layout differences the mapping handles:
- GPT-2 stores its linear layers as Conv1D, weight (in, out): fastlm's (out, in) is transposed.
  GPT-2 always has biases; a fastlm model without them exports zero biases (exactly the same
  function). GPT-2's "gelu_new" is the tanh GELU fastlm uses.
- fastlm fuses q, k, v into one matmul (rows q | k | v) and SwiGLU's gate and up (rows gate | up);
  Llama keeps separate q_proj, k_proj, v_proj, gate_proj, up_proj. fastlm's RoPE rotates feature
  pairs (i, i + D/2), the same convention as transformers' rotate_half, so no permutation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastlm import checkpoint as ckpt
from fastlm import run_dir as run_dirs
from fastlm.chat.template import has_chat_tokens
from fastlm.command import run_command
from fastlm.config import ConfigError, ModelConfig
from fastlm.models.base import LanguageModel
from fastlm.models.gpt import GPT
from fastlm.tokenizer import Tokenizer
from fastlm.tokenizer.exports import save_hf_dir


class ExportError(ValueError):
    """The model or directory cannot be converted; the message says why."""


# ---------------------------------------------------------------------------------------------
# fastlm -> Hugging Face
def _hf_config(cfg: ModelConfig, tokenizer: Tokenizer | None) -> dict:
    eos = tokenizer.eot_id if tokenizer is not None else None
    if cfg.arch == "gpt2":
        if cfg.kv_heads != cfg.n_head:
            raise ExportError("GPT2LMHeadModel has no grouped-query attention: a gpt2-flavour "
                              f"model with n_kv_head={cfg.n_kv_head} cannot be exported to it")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.hidden,
                "activation_function": "gelu" if cfg.gelu == "exact" else "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "scale_attn_weights": True, "use_cache": True,
                "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos,
                "eos_token_id": eos, "torch_dtype": "float32"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos, "eos_token_id": eos, "use_cache": True, "torch_dtype": "float32"}


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}

    def bias_of(name: str, n: int) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(n, dtype=sd["wte.weight"].dtype)

    for i in range(cfg.n_layer):
        f, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"] = sd[f + ours + ".weight"]
            out[h + theirs + ".bias"] = bias_of(f + ours + ".bias", cfg.n_embd)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            w = sd[f + ours + ".weight"]  # (out, in) -> Conv1D's (in, out)
            out[h + theirs + ".weight"] = w.t()
            out[h + theirs + ".bias"] = bias_of(f + ours + ".bias", w.shape[0])
    out["transformer.ln_f.weight"] = sd["norm_f.weight"]
    out["transformer.ln_f.bias"] = bias_of("norm_f.bias", cfg.n_embd)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    for i in range(cfg.n_layer):
        f, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[f + "attn.qkv.weight"].split([H * D, Hkv * D, Hkv * D], dim=0)
        gate, up = sd[f + "mlp.up.weight"].chunk(2, dim=0)
        out.update({h + "input_layernorm.weight": sd[f + "norm1.weight"],
                    h + "post_attention_layernorm.weight": sd[f + "norm2.weight"],
                    h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                    h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": sd[f + "attn.proj.weight"],
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": sd[f + "mlp.down.weight"]})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def export_hf(model: LanguageModel, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write model (and tokenizer) as a transformers model directory; returns it."""
    if model.config.arch == "bert":  # BertForMaskedLM: its own mapping (fastlm.export_bert)
        from fastlm.export.bert import export_bert
        return export_bert(model, out_dir, tokenizer)
    if model.config.arch not in ("gpt2", "llama"):
        raise ExportError(f"--format hf: model.arch={model.config.arch} has no Hugging Face "
                          "mapping (gpt2, llama and bert export); its checkpoint still serves "
                          "fastlm's eval and generate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = _hf_config(cfg, tokenizer)
    tensors = _gpt2_tensors(model) if cfg.arch == "gpt2" else _llama_tensors(model)
    tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:  # with the chat template: see fastlm.tokenizer.exports
        save_hf_dir(tokenizer, out / "tokenizer.json", model_max_length=cfg.block_size)
    gen = {"do_sample": False}
    if tokenizer is not None and tokenizer.eot_id is not None:
        gen.update(eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id)
    if tokenizer is not None and has_chat_tokens(tokenizer):
        # a chat reply ends at <|end|> (fastlm.chat.template), a document at <|endoftext|>
        gen["eos_token_id"] = [i for i in (tokenizer.eot_id, tokenizer.special_tokens["<|end|>"])
                               if i is not None]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face -> fastlm
def _read_json(file: Path, kind: type, what: str):
    """file parsed as JSON of type kind, else ExportError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ExportError(f"{file}: not readable JSON ({exc})") from None
    if not isinstance(value, kind):
        raise ExportError(f"{file}: {what} must be a JSON {kind.__name__}, got "
                          f"{type(value).__name__}")
    return value


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, dict, "a sharded index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                       for f in weight_map.values()):
            raise ExportError(f"{index}: 'weight_map' must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for name in files:  # a shard is a file of this folder, never a path out of it
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise ExportError(f"{index}: shard {name!r} is not a .safetensors file name in "
                                  f"{d}")
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        raise ExportError(f"{d}: no model.safetensors (or sharded index)"
                          + (f"; found {pickles}, which are pickles and are never loaded "
                             "(convert them to safetensors first)" if pickles else ""))
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(d / name)))
        except Exception as exc:  # noqa: BLE001 -- safetensors' errors have no common base
            raise ExportError(f"{d / name}: not a readable safetensors file "
                              f"({type(exc).__name__}: {exc})") from None
    return tensors


def _fastlm_config(hf: dict, block_size: int | None) -> ModelConfig:
    mt = hf.get("model_type")
    try:
        if mt == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu"):
                raise ExportError(f"config.json activation_function={act!r}: fastlm's GPT-2 "
                                  "runs the tanh GELU (gelu_new, gelu_pytorch_tanh) or the exact "
                                  "one (gelu)")
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise ExportError("config.json: scale_attn_by_inverse_layer_idx / "
                                  "reorder_and_upcast_attn are not supported")
            n_embd = hf["n_embd"]
            cfg = ModelConfig(preset="", arch="gpt2", vocab_size=hf["vocab_size"],
                              block_size=block_size or hf["n_positions"], n_layer=hf["n_layer"],
                              n_head=hf["n_head"], n_embd=n_embd,
                              gelu="exact" if act == "gelu" else "tanh",
                              mlp_hidden=hf.get("n_inner") or 4 * n_embd, bias=True,
                              tie_embeddings=hf.get("tie_word_embeddings", True),
                              norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        elif mt == "llama":
            if hf.get("rope_scaling"):
                raise ExportError(f"config.json rope_scaling={hf['rope_scaling']!r}: fastlm "
                                  "implements plain RoPE only")
            if hf.get("attention_bias") or hf.get("mlp_bias"):
                raise ExportError("config.json: attention_bias / mlp_bias are not supported")
            if hf.get("hidden_act", "silu") != "silu":
                raise ExportError(f"config.json hidden_act={hf['hidden_act']!r}: need silu")
            n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
            if hf.get("head_dim") not in (None, n_embd // n_head):
                raise ExportError(f"config.json head_dim={hf['head_dim']} differs from "
                                  f"hidden_size/num_attention_heads={n_embd // n_head}")
            rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get(
                "rope_theta", 10000.0)
            cfg = ModelConfig(preset="", arch="llama", vocab_size=hf["vocab_size"],
                              block_size=block_size or hf["max_position_embeddings"],
                              n_layer=hf["num_hidden_layers"], n_head=n_head,
                              n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                              mlp_hidden=hf["intermediate_size"], bias=False,
                              tie_embeddings=hf.get("tie_word_embeddings", False),
                              norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta)
        else:
            raise ExportError(f"config.json model_type={mt!r}: fastlm imports gpt2 and llama")
        cfg.validate()
    except KeyError as exc:
        raise ExportError(f"config.json lacks {exc}") from None
    except ConfigError as exc:
        raise ExportError(f"config.json: {exc}") from None
    return cfg


def _from_gpt2(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    sd = {"wte.weight": t["wte.weight"], "wpe.weight": t["wpe.weight"],
          "norm_f.weight": t["ln_f.weight"], "norm_f.bias": t["ln_f.bias"]}
    for i in range(cfg.n_layer):
        f, h = f"blocks.{i}.", f"h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[f + ours + ".weight"] = t[h + theirs + ".weight"]
            sd[f + ours + ".bias"] = t[h + theirs + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            sd[f + ours + ".weight"] = t[h + theirs + ".weight"].t()
            sd[f + ours + ".bias"] = t[h + theirs + ".bias"]
    sd["lm_head.weight"] = t["wte.weight"] if cfg.tie_embeddings else t["lm_head.weight"]
    return sd


def _from_llama(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"wte.weight": t["model.embed_tokens.weight"], "norm_f.weight": t["model.norm.weight"]}
    for i in range(cfg.n_layer):
        f, h = f"blocks.{i}.", f"model.layers.{i}."
        a, m = h + "self_attn.", h + "mlp."
        sd.update({
            f + "norm1.weight": t[h + "input_layernorm.weight"],
            f + "norm2.weight": t[h + "post_attention_layernorm.weight"],
            f + "attn.qkv.weight": torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"],
                                              t[a + "v_proj.weight"]], dim=0),
            f + "attn.proj.weight": t[a + "o_proj.weight"],
            f + "mlp.up.weight": torch.cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]], 0),
            f + "mlp.down.weight": t[m + "down_proj.weight"]})
    sd["lm_head.weight"] = (t["model.embed_tokens.weight"] if cfg.tie_embeddings
                            else t["lm_head.weight"])
    return sd


def import_hf(hf_dir: str | Path, block_size: int | None = None
              ) -> tuple[GPT, Tokenizer | None]:
    """A local transformers GPT-2 or Llama directory -> (fastlm GPT in eval mode, its tokenizer
    when tokenizer.json is a byte-level BPE fastlm can read, else None). block_size caps the
    context (a 128k-position Llama does not need a 128k RoPE table to be evaluated)."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ExportError(f"{d}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(d / "config.json", dict, "the model config")
    cfg = _fastlm_config(hf, block_size)
    tensors = _read_tensors(d)
    try:
        sd = (_from_gpt2 if cfg.arch == "gpt2" else _from_llama)(cfg, tensors)
    except KeyError as exc:
        raise ExportError(f"{d}: the safetensors lack tensor {exc}") from None
    model = GPT(cfg)
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise ExportError(f"{d}: tensor for {k} has shape {tuple(v.shape)}, the config "
                              f"implies {tuple(own[k].shape)}")
    if cfg.arch == "gpt2" and block_size:
        sd["wpe.weight"] = sd["wpe.weight"][:block_size]
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    tok = None
    if (d / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.load_hf(d / "tokenizer.json")
        except (ValueError, KeyError):
            tok = None  # not a byte-level BPE: the caller passes its own tokenizer
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.export", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fastlm checkpoint or run directory to export")
    src.add_argument("--from-hf", help="Hugging Face model directory to import")
    ap.add_argument("--format", default="hf", choices=["hf", "gguf"], help="export format")
    ap.add_argument("--gguf-dtype", default="f32", choices=["f32", "f16"],
                    help="gguf: matrix precision (norms and biases stay f32)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: found next to "
                    "the checkpoint, else bytes)")
    ap.add_argument("--block-size", type=int, default=None, help="import: cap the context")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--overwrite", action="store_true",
                    help="--from-hf: --out holds a run; delete its run files and import there")
    args = ap.parse_args(argv)
    try:
        if args.checkpoint:
            from fastlm.restore import load
            model, tok, meta = load(args.checkpoint, tokenizer=args.tokenizer)
            if meta.task == "classify":
                raise ExportError(f"{meta.path}: a classification fine-tune has no Hugging Face "
                                  "or GGUF mapping; export its base language model")
            if args.format == "gguf":
                from fastlm.export.gguf import export_gguf
                path = export_gguf(model, args.out, tok, args.gguf_dtype, meta.name)
                print(f"fastlm.export: {meta.name} -> {path} ({model.config.arch})")
                return 0
            export_hf(model, args.out, tok)
            written = json.loads((Path(args.out) / "config.json").read_text())
            print(f"fastlm.export: {meta.name} -> {args.out} ({model.config.arch}: "
                  f"{written['architectures'][0]})")
        else:
            from fastlm.train.optim import AdamW
            run_dirs.claim(args.out, overwrite=args.overwrite, resume_hint=False)
            model, tok = import_hf(args.from_hf, args.block_size)
            from dataclasses import asdict
            path = ckpt.save(args.out, 0, model, AdamW(model.parameters()), {"step": 0},
                             {"model": asdict(model.config)}, {"imported_from": args.from_hf})
            if tok is not None:
                tok.save(Path(args.out) / "tokenizer.json")
            print(f"fastlm.export: {args.from_hf} -> {path}"
                  + ("" if tok else " (no readable tokenizer.json: pass --tokenizer later)"))
    except (ExportError, OSError, ValueError, ckpt.CheckpointError) as exc:
        print(f"fastlm.export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
