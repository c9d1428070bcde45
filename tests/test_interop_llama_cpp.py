"""llama.cpp (through llama-cpp-python) runs fastlm's GGUF export exactly as fastlm runs the
checkpoint: for BPE tokenizers of both split patterns and the byte tokenizer, on both
architectures, the same token ids for corpus chunks and random strings, the same logits (f32
KV cache) and the same greedy text; and the GGUF's chat template gives fastlm's chat prompt."""
import random

import numpy as np
import pytest
import torch

from fastlm.chat.template import SPECIAL_TOKENS, chat_prompt
from fastlm.export.gguf import export_gguf
from fastlm.tokenizer import Tokenizer
from tests.bpe_corpus import mixed_text, stdlib_text
from tests.interop import require
from tests.lm_fixtures import tiny_model

llama_cpp = require("llama_cpp")
pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

EOT = "<|endoftext|>"
GGML_TYPE_F32 = 0  # ggml_type of an f32 KV cache: llama.cpp's default f16 cache rounds
LOGIT_TOLERANCE = {"llama": 1e-4, "gpt2": 5e-3}


@pytest.fixture(scope="module", params=["gpt4", "gpt2", "byte"])
def tok(request):
    if request.param == "byte":
        return Tokenizer.byte([EOT])
    return Tokenizer.train(iter([stdlib_text(30_000), mixed_text(800)]), vocab_size=600,
                           pattern=request.param, special_tokens=[EOT, *SPECIAL_TOKENS])


def strings(n=150, seed=0):
    """Random strings over what splits differently: letters, digits, spaces, newlines,
    contractions, punctuation, non-Latin scripts, emoji."""
    rng = random.Random(seed)
    atoms = ["a", "Z", "é", "ß", "7", "42", "12345", " ", "  ", "\t", "\n", "\r\n", "'s", "'LL",
             "'ve", "!", "?!", "...", "(", "{}", "_", "日本", "Ωμέγα", "привет", "😀", "👍🏽", "ـ",
             "\u0301", "\u00a0", "int", " the", "def ", "x\n\n"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def corpus_chunks(n=60):
    text = stdlib_text(40_000, "json/__init__.py") + mixed_text(1500, seed=9)
    return [text[i * 700:(i + 1) * 700] for i in range(n)]


def load(path, n_ctx=64):
    # flash_attn off: llama.cpp's CPU flash attention rounds through f16 (logits 5e-3..9e-3 off)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                           type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                           verbose=False, seed=0)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """{arch: (fastlm model, llama.cpp model)} for this tokenizer."""
    out = {}
    for arch in ("gpt2", "llama"):
        model = tiny_model(arch, vocab_size=tok.vocab_size, block_size=64)
        path = export_gguf(model, tmp_path_factory.mktemp(arch), tok)
        out[arch] = model, load(path)
    return out


def test_token_ids_identical(tok, exported):
    _, llm = exported["llama"]
    texts = corpus_chunks() + strings()
    bad = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False)
           != tok.encode_ordinary(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenize differently, e.g. {bad[0]!r}"
    text = f"a{EOT}b"  # special tokens: parsed as such when asked, plain text otherwise
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(
        text, allowed_special="all")
    assert llm.detokenize(tok.encode_ordinary(texts[0])) == texts[0].encode()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_and_greedy_text_identical(tok, exported, arch):
    model, llm = exported[arch]
    ids = tok.encode_ordinary("def main(argv):\n    return 1")[:40]
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    diff = float(np.abs(theirs - ours).max())
    # Measured: llama 4.5e-6 (float32 throughout). gpt2 1.5e-3: ggml's GELU reads a float16
    # table of its input, llama.cpp's own rounding, not the export's.
    assert diff < LOGIT_TOLERANCE[arch], f"max |logit diff| {diff}"
    prompt = tok.encode_ordinary("import os\n")
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), 12, top_k=1)[0, len(prompt):].tolist()
    llm.reset()
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        got.append(token)
        if len(got) == 12:
            break
    assert got == want  # the same greedy ids, hence the same text
    # (special tokens a random model may emit are rendered differently by each; text is not)
    ordinary = [i for i in want if i not in tok.special_tokens.values()]
    assert llm.detokenize(ordinary) == tok.decode_bytes(ordinary)


def test_chat_template_in_metadata_gives_fastlm_prompt(tok, exported):
    """llama-cpp-python renders the GGUF's tokenizer.chat_template; its prompt ids are
    chat_prompt's (the special-token template, or the plain transcript for the byte tokenizer)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    _, llm = exported["llama"]
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=EOT, bos_token=EOT)
    prompt = formatter(messages=messages).prompt
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == chat_prompt(tok, messages)[0]
