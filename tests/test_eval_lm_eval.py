"""fastlm.lm_eval_adapter: the three lm_eval request types agree with fastlm.eval's scoring
(checked with stand-in request objects, which is all the adapter reads: `.args`), and, when
lm_eval is installed, a tiny local multiple-choice task runs through lm_eval itself."""
import math
from types import SimpleNamespace

import pytest

from fastlm import checkpoint
from fastlm.config import ModelConfig
from fastlm.eval.core import loglikelihood, perplexity
from fastlm.eval.lm_eval_adapter import FastLM
from fastlm.models.gpt import GPT
from fastlm.train.optim import AdamW


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
    assert ll == pytest.approx(loglikelihood(model, [(list(b"import "), list(b"os"))])[0][0])
    text = "print('hello')\n" * 4
    rolling, = lm.loglikelihood_rolling([req(text)])
    ids = [0] + list(text.encode())  # byte tokenizer: no <|endoftext|>, id 0 starts the text
    assert rolling == pytest.approx(-math.log(perplexity(model, ids)) * len(text), rel=1e-6)
    out, = lm.generate_until([req("def ", {"until": ["\n"], "max_gen_toks": 6})])
    assert isinstance(out, str) and "\n" not in out and len(out.encode()) <= 6 * 1


def test_lm_eval_end_to_end(run, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
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
