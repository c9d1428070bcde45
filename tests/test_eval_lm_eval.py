"""fastlm.lm_eval_adapter: the three lm_eval request types agree with fastlm.eval's scoring
(checked with stand-in request objects, which is all the adapter reads: `.args`), and a tiny
local multiple-choice task runs through lm_eval itself. Agreement with lm_eval's own `hf` model:
tests/test_interop_lm_eval.py."""
from types import SimpleNamespace

import pytest

from fastlm import checkpoint
from fastlm.config import ModelConfig
from fastlm.eval.core import loglikelihood, token_nll
from fastlm.eval.lm_eval_adapter import FastLM
from fastlm.models.gpt import GPT
from fastlm.train.optim import AdamW
from tests.interop import require

require("lm_eval")  # FastLM is an lm_eval TemplateLM


@pytest.fixture
def run(tmp_path):
    model = GPT(ModelConfig(preset="", vocab_size=256, block_size=32, n_layer=2, n_head=2,
                            n_embd=32))
    checkpoint.save(tmp_path / "run", 1, model, AdamW(model.parameters()), {"step": 1},
                    {"model": dict(vars(model.config))})
    return tmp_path / "run", model.eval()


def req(*args):
    return SimpleNamespace(args=args)


def test_requests_match_fastlm_eval(run):
    path, model = run
    lm = FastLM(checkpoint=str(path), batch_size=4)
    (ll, _greedy), = lm.loglikelihood([req("import ", "os")])
    # lm_eval's request tokenization: the context's trailing space joins the continuation
    assert ll == pytest.approx(loglikelihood(model, [(list(b"import"), list(b" os"))])[0][0])
    text = "print('hello')\n" * 4
    rolling, = lm.loglikelihood_rolling([req(text)])
    ids = [0] + list(text.encode())  # byte tokenizer: no <|endoftext|>, id 0 starts the text
    # lm_eval's disjoint windows of block_size (32) targets, the last one with a full context:
    # targets 0..31 from inputs 0..31, then 32..59 from inputs 28..59
    assert len(text) == 60
    assert rolling == pytest.approx(-token_nll(model, ids, context=32, stride=28).sum().item(),
                                    rel=1e-6)
    out, = lm.generate_until([req("def ", {"until": ["\n"], "max_gen_toks": 6})])
    assert isinstance(out, str) and "\n" not in out and len(out.encode()) <= 6 * 1


def test_lm_eval_end_to_end(run, tmp_path):
    lm_eval = require("lm_eval")
    path, _ = run
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "data.jsonl").write_text(
        '{"q": "import ", "choices": ["os", "xx"], "label": 0}\n' * 4)
    (task_dir / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task_dir / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model="fastlm", model_args=f"checkpoint={path}",
                                  tasks=["tiny_mc"], task_manager=TaskManager(
                                      include_path=str(task_dir)))
    assert "tiny_mc" in res["results"]
