"""Tokenizer files: the JSON format (round trip, clear errors on corrupt files), exports to tiktoken
and Hugging Face tokenizers that encode identically on real text, imports back, and the CLI."""
import json

import pytest

from fastlm.tokenizer import Tokenizer, TokenizerFileError
from fastlm.tokenizer.cli import main as cli
from tests.bpe_corpus import mixed_text, stdlib_text

pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

EOT = "<|endoftext|>"


@pytest.fixture(scope="module", params=["gpt2", "gpt4", "none"])
def tok(request):
    return Tokenizer.train(iter([stdlib_text(40_000), mixed_text(1000)]), vocab_size=1200,
                           pattern=request.param, special_tokens=[EOT, "<|fim|>"])


def real_text():
    return stdlib_text(60_000, "argparse.py") + mixed_text(1500, seed=3) + " 1234567 x12345"


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back == tok and back.hash() == tok.hash()
    assert back.merges == tok.merges and back.special_tokens == tok.special_tokens
    text = real_text()
    assert back.encode(text) == tok.encode(text)


@pytest.mark.parametrize("damage,match", [
    (lambda s: s[: len(s) // 2], "not valid JSON"),
    (lambda s: "", "it is empty"),
    (lambda s: "[1, 2]", "JSON object"),
    (lambda s: s.replace('"fastlm.tokenizer"', '"other"'), "not a fastlm tokenizer"),
    (lambda s: s.replace('"version":1', '"version":99'), "version 99"),
    (lambda s: s.replace('"pattern":', '"pattern_":'), "'pattern'"),
    (lambda s: s.replace('"AA=="', '"A!A="', 1), "not valid base64"),
    (lambda s: s.replace('"AQ=="', '"AA=="', 1), "same bytes"),
    (lambda s: s.replace('"hash":"bpe-', '"hash":"bpe-0'), "does not match"),
])
def test_corrupt_files_give_clear_errors(tok, tmp_path, damage, match):
    path = tmp_path / "tok.json"
    tok.save(path)
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=match):
        Tokenizer.load(path)


def test_missing_file_and_hf_file_given_to_load(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.json")
    hf_path = tok.save_hf(tmp_path)
    with pytest.raises(TokenizerFileError, match="load_hf"):
        Tokenizer.load(hf_path)


def test_tiktoken_identical_ids(tok, tmp_path):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    enc = tok.to_tiktoken()
    text = real_text()
    assert enc.encode(text) == tok.encode(text)
    assert enc.encode(text + EOT, allowed_special="all") == tok.encode(text + EOT,
                                                                        allowed_special="all")
    assert enc.decode_bytes(tok.encode(text)) == text.encode()
    assert Tokenizer.from_tiktoken(enc) == tok
    tok.save_tiktoken(tmp_path / "r.tiktoken")
    if tok.pattern != "none":
        back = Tokenizer.load_tiktoken(tmp_path / "r.tiktoken", tok.pattern, tok.special_tokens)
        assert back == tok
    assert isinstance(enc, tiktoken.Encoding)


def test_hf_identical_ids(tok, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers is not installed")
    path = tok.save_hf(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = real_text()
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.encode(f"a{EOT}b").ids == tok.encode(f"a{EOT}b", allowed_special="all")
    assert hf.decode(tok.encode(text)) == text
    assert Tokenizer.load_hf(path) == tok


def test_hf_import_rejects_non_byte_level(tmp_path):
    doc = {"model": {"type": "WordPiece", "vocab": {}}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(TokenizerFileError, match="model.type must be 'BPE'"):
        Tokenizer.load_hf(tmp_path)


def test_cli_train_encode_decode_info_export(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(stdlib_text(20_000), encoding="utf-8")
    out = tmp_path / "tok.json"
    assert cli(["train", "--input", str(corpus), "--vocab-size", "500", "--out", str(out),
                "--no-progress", "--threads", "2"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 500 and tok.eot_id == 499
    capsys.readouterr()
    assert cli(["encode", "--tokenizer", str(out), "--text", "hello<|endoftext|>",
                "--allow-special"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("hello<|endoftext|>", allowed_special="all")
    assert cli(["decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "hello<|endoftext|>"
    assert cli(["info", "--tokenizer", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == tok.hash()
    assert cli(["export", "--tokenizer", str(out), "--format", "hf",
                "--out", str(tmp_path / "hf.json")]) == 0
    assert cli(["import", "--format", "hf", "--input", str(tmp_path / "hf.json"),
                "--out", str(tmp_path / "back.json")]) == 0
    assert Tokenizer.load(tmp_path / "back.json") == tok
    # Errors are one clear line and exit code 2, not a traceback.
    assert cli(["encode", "--tokenizer", str(out), "--text", "<|endoftext|>"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert cli(["info", "--tokenizer", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["new", "new/", "existing"])
def test_cli_export_into_directories(tok, tmp_path, where):
    """--out names a new or existing directory in both formats; each gets what rebuilds the
    tokenizer exactly: tokenizer.json + tokenizer_config.json (special tokens, chat template) or
    the ranks + their JSON (split pattern, special tokens)."""
    src = tmp_path / "tok.json"
    tok.save(src)
    for fmt, files in (("hf", ("tokenizer.json", "tokenizer_config.json")),
                       ("tiktoken", ("tokenizer.tiktoken", "tokenizer.tiktoken.json"))):
        out = tmp_path / fmt / "out"
        if where == "existing":
            out.mkdir(parents=True)
        arg = str(out) + ("/" if where.endswith("/") else "")
        assert cli(["export", "--tokenizer", str(src), "--format", fmt, "--out", arg]) == 0
        assert all((out / f).is_file() for f in files)
        back = tmp_path / f"{fmt}-back.json"
        # no --pattern: the tiktoken import reads it from the JSON beside the ranks
        assert cli(["import", "--format", fmt, "--input", str(out / files[0]),
                    "--out", str(back)]) == 0
        assert Tokenizer.load(back) == tok
    config = json.loads((tmp_path / "hf" / "out" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == EOT
    assert config["additional_special_tokens"] == ["<|fim|>"] and "chat_template" in config


def test_tiktoken_metadata_disagreeing_with_arguments_is_an_error(tok, tmp_path):
    path = tok.save_tiktoken(tmp_path)
    other = "gpt2" if tok.pattern != "gpt2" else "gpt4"
    with pytest.raises(TokenizerFileError, match="split pattern"):
        Tokenizer.load_tiktoken(path, pattern=other)
    with pytest.raises(TokenizerFileError, match="special tokens"):
        Tokenizer.load_tiktoken(path, special_tokens={})


def test_hf_directory_export_loads_in_transformers(tok, tmp_path):
    """AutoTokenizer reads the bare tokenizer export: same ids, eos, and the chat template
    rendering fastlm's plain-transcript prompt (this tokenizer has no chat tokens)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from fastlm.chat.template import chat_prompt
    from fastlm.tokenizer.exports import save_hf_dir
    save_hf_dir(tok, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = real_text()[:5000]
    assert hf(text).input_ids == tok.encode(text)
    assert hf.eos_token_id == tok.eot_id
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == chat_prompt(tok, messages)[0]
