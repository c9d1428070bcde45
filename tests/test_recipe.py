"""fastlm.recipe: bad recipes stop before any work with one line, a failing stage keeps what is
done, and the whole road from raw text to a served chat model at micro scale, checking at every
seam that what one stage made is what the next one used."""
import json
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

from fastlm.recipe import RecipeError, parse, run
from fastlm.recipe.__main__ import main as cli
from fastlm.recipe.spec import SHIPPED

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ("textwrap.py", "string.py", "colorsys.py", "bisect.py", "keyword.py", "glob.py",
          "fnmatch.py", "shlex.py", "heapq.py", "this.py")

MICRO = """
[recipe]
name = "micro"
device = "cpu"
seed = 3
{stages}

[data]
inputs = ["corpus"]
val_fraction = 0.25
workers = 1

[tokenizer]
vocab_size = {vocab}

[pretrain.model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 64

[pretrain.train]
max_steps = 12
batch_size = 4
log_interval = 3
tensorboard = false

[pretrain.optim]
warmup_steps = 2

[pretrain.eval]
interval = 6
batches = 2

[pretrain.checkpoint]
interval = 6

[pretrain.sample]
tokens = 0

[eval]
max_bytes = 3000
mc = "mc.jsonl"
mc_limit = 6

[sft]
data = "chat.jsonl"

[sft.train]
max_steps = 6
batch_size = 4

[sft.eval]
interval = 3

[sft.finetune]
max_len = 64

[serve-check]
message = "Summarise: def wrap(text, width):"
max_tokens = 6
"""


def write_recipe(folder: Path, stages: str = "", vocab: int = 320) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name in CORPUS:
        shutil.copyfile(STDLIB / name, corpus / name)
    chat = [{"prompt": f"Summarise: def f{i}(x):", "response": f"Return x times {i}."}
            for i in range(24)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    mc = [{"context": f"def f{i}(", "choices": ["x):", "))) ]", "+-+", "9 9"], "label": 0}
          for i in range(8)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(m) + "\n" for m in mc))
    path = folder / "micro.toml"
    path.write_text(MICRO.format(stages=stages, vocab=vocab))
    return path


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, before any work
@pytest.mark.parametrize("edit, named", [
    (("[data]", "[dta]"), "unknown section [dta]"),
    (("workers = 1", "wrokers = 1"), "unknown key 'wrokers'"),
    (('name = "micro"', 'name = "micro"\nstages = ["data", "tokenise"]'),
     "unknown stage 'tokenise'"),
    (('inputs = ["corpus"]', 'inputs = ["nowhere/*.txt"]'), "nowhere/*.txt"),
    (('data = "chat.jsonl"', 'data = "missing.jsonl"'), "missing.jsonl"),
    (("n_layer = 1", "n_layers = 1"), "n_layers"),
    (("max_steps = 6", "max_step = 6"), "max_step"),
    (("vocab_size = 320", 'vocab_size = "big"'), "vocab_size"),
])
def test_bad_recipe_stops_before_any_work_with_one_line(tmp_path, capsys, edit, named):
    path = write_recipe(tmp_path)
    path.write_text(path.read_text().replace(*edit, 1))
    with pytest.raises(RecipeError, match=re.escape(named)):
        parse(path)
    out = tmp_path / "out"
    assert cli(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unknown_stage_flag_is_named(tmp_path, capsys):
    path = write_recipe(tmp_path)
    assert cli(["run", str(path), "--out", str(tmp_path / "out"), "--from", "pretrian"]) == 2
    assert "--from pretrian: not a stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_recipes_parse(tmp_path, monkeypatch):
    import torch

    names = sorted(p.stem for p in SHIPPED.glob("*.toml"))
    assert names == ["cpu-tiny", "gpu-gpt2", "gpu-llama"]
    assert parse("cpu-tiny").recipe.name == "cpu-tiny"
    monkeypatch.chdir(tmp_path)  # a shipped recipe's paths are the user's: data/web here
    (tmp_path / "data" / "web").mkdir(parents=True)
    for name in ("gpu-gpt2", "gpu-llama"):
        if torch.cuda.is_available():
            assert parse(name).recipe.name == name
        else:  # refused before any work, by one line
            with pytest.raises(RecipeError, match="sees no CUDA GPU"):
                parse(name)


def test_failing_stage_keeps_earlier_stages_and_the_next_run_starts_there(tmp_path, capsys):
    stages = 'stages = ["data", "tokenizer"]'
    path = write_recipe(tmp_path, stages, vocab=100)  # fewer ids than the 256 bytes: fails
    out = tmp_path / "out"
    assert run(parse(path), out, progress=False) == 1
    err = capsys.readouterr().err
    assert "stage tokenizer failed" in err
    data_record = (out / "data" / "stage.json").read_text()
    assert not (out / "tokenizer" / "stage.json").exists()
    path.write_text(MICRO.format(stages=stages, vocab=320))
    assert run(parse(path), out, progress=False) == 0
    err = capsys.readouterr().err
    assert "data: done (fingerprint" in err and "tokenizer: finished" in err
    assert (out / "data" / "stage.json").read_text() == data_record


# ---------------------------------------------------------------------------------------------
# The whole road at micro scale
SECTIONS = ("## Stages", "## Data", "## Tokenizer", "## Pretraining",
            "## Evaluation before and after SFT", "## Sample conversation", "## Exported files",
            "## Versions")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    path = write_recipe(folder)
    out = folder / "out"
    assert run(parse(path), out, progress=False) == 0
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/stage.json")}
    return path, out, records


def test_every_stage_finished(micro_run):
    _, _, records = micro_run
    assert set(records) == {"data", "tokenizer", "pretrain", "eval", "sft", "eval-sft",
                            "export", "serve-check", "report"}


def test_seam_tokenizer_is_the_one_in_the_shards_and_the_checkpoint(micro_run):
    from fastlm import checkpoint
    from fastlm.data.manifest import load_manifest
    from fastlm.recipe.fingerprint import sha256_file
    from fastlm.tokenizer import Tokenizer

    _, out, records = micro_run
    tok_file = out / "tokenizer" / "tokenizer.json"
    manifest = load_manifest(out / "tokenizer" / "shards")
    assert manifest["tokenizer"]["hash"] == sha256_file(tok_file)
    assert records["tokenizer"]["outputs"]["tokenizer"]["sha256"] == sha256_file(tok_file)
    ckpt = checkpoint.load(records["pretrain"]["outputs"]["checkpoint"])
    assert ckpt.train_state()["tokenizer"] == Tokenizer.load(tok_file).hash()
    assert sha256_file(ckpt.path / "tokenizer.json") == sha256_file(tok_file)


def test_seam_the_checkpoint_scored_is_the_one_exported_and_served(micro_run):
    from fastlm.recipe.fingerprint import sha256_file

    _, _, records = micro_run
    sft = records["sft"]["outputs"]
    assert records["eval"]["outputs"]["checkpoint"] == records["pretrain"]["outputs"]["checkpoint"]
    for stage in ("eval-sft", "export", "serve-check"):
        assert records[stage]["outputs"]["checkpoint"] == sft["checkpoint"], stage
        assert records[stage]["outputs"]["model_sha256"] == sft["model_sha256"], stage
    assert sha256_file(Path(sft["checkpoint"]) / "model.safetensors") == sft["model_sha256"]


def test_seam_exported_hf_logits_equal_fastlm(micro_run):
    transformers = pytest.importorskip("transformers")
    import torch

    from fastlm.restore import load

    _, out, records = micro_run
    model, tok, _ = load(records["sft"]["outputs"]["checkpoint"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "export" / "hf")).eval()
    ids = torch.tensor([tok.encode_ordinary("def wrap(text, width=70):\n    return text")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=1e-4)
    assert records["export"]["metrics"]["hf_logits_max_abs_diff"] < 1e-3
    assert (out / "export" / "gguf" / "model.gguf").stat().st_size > 0


def test_seam_served_chat_sends_the_sft_template_tokens(micro_run):
    from fastlm.chat.template import encode_chat
    from fastlm.restore import load

    _, _, records = micro_run
    served = records["serve-check"]["outputs"]
    _, tok, _ = load(records["sft"]["outputs"]["checkpoint"])
    ids, _ = encode_chat(tok, served["messages"], add_generation_prompt=True)
    assert served["template_ids"] == ids
    assert served["prompt_tokens"] == len(ids)
    assert ids[0] == tok.special_tokens["<|user|>"]
    assert ids[-1] == tok.special_tokens["<|assistant|>"]
    assert served["matches_local"], (served["reply"], served["local_reply"])


def test_report_card_has_every_section_with_numbers(micro_run):
    _, out, _ = micro_run
    md = (out / "report.md").read_text()
    for title in SECTIONS:
        assert title in md, title
        body = md.split(title, 1)[1].split("\n## ", 1)[0]
        assert re.search(r"\d", body), f"{title} has no numbers"
    card = json.loads((out / "report.json").read_text())
    assert card["stages"]["pretrain"]["metrics"]["tokens"] > 0
    assert card["versions"]["torch"]
    for stage in ("pretrain", "sft"):
        png = out / "report" / f"{stage}_loss.png"
        if "matplotlib" in card["plots"][stage]:  # a plain install without matplotlib
            pytest.skip(card["plots"][stage])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_what_is_done_and_redoes_what_changed(micro_run, capsys):
    path, out, records = micro_run
    assert run(parse(path), out, progress=False) == 0
    err = capsys.readouterr().err
    assert err.count(": done (fingerprint") == 9, err
    chat = path.parent / "chat.jsonl"
    chat.write_text(chat.read_text() + json.dumps({"prompt": "Summarise: def g(y):",
                                                   "response": "Return y."}) + "\n")
    assert run(parse(path), out, progress=False, from_stage=None) == 0
    err = capsys.readouterr().err
    for stage in ("data", "tokenizer", "pretrain", "eval"):
        assert f"] {stage}: done (fingerprint" in err, stage
    for stage in ("sft", "eval-sft", "export", "serve-check", "report"):
        assert f"] {stage}: finished" in err, stage
    after = json.loads((out / "pretrain" / "stage.json").read_text())
    assert after == records["pretrain"]
