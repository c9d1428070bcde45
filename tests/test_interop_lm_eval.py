"""lm-evaluation-harness scores a fastlm checkpoint through the adapter exactly as its own `hf`
model scores the Hugging Face export of it: per request, log-likelihoods (to 1e-4) and greedy
flags, rolling log-likelihoods over several context windows, generated text; and a small offline
multiple-choice task (a jsonl file written here) gives the same scores through simple_evaluate."""
import json
from types import SimpleNamespace

import pytest

from fastlm.export.hf import export_hf
from fastlm.tokenizer import Tokenizer
from tests.bpe_corpus import stdlib_text
from tests.interop import require
from tests.lm_fixtures import save_checkpoint, tiny_model

lm_eval = require("lm_eval")
pytest.importorskip("transformers", reason="lm_eval's hf model needs transformers")
pytest.importorskip("fastlm._bpe", reason="fastlm._bpe is not built")

from fastlm.eval.lm_eval_adapter import FastLM  # after require("lm_eval"): it registers

EOT = "<|endoftext|>"
CONTEXTS = ["def main(", "import os\n", "The answer is ", "x = [1, 2, 3]\nprint(", "class A:\n  "]
ENDINGS = ["argv)", " sys", "42", "x)", "pass", "  return None\n"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def routes(request, tmp_path_factory):
    """(fastlm adapter, lm_eval hf on the export, run dir, hf dir) of one tiny model."""
    from lm_eval.models.huggingface import HFLM
    tmp = tmp_path_factory.mktemp(request.param)
    tok = Tokenizer.train(iter([stdlib_text(20_000)]), vocab_size=400, pattern="gpt4",
                          special_tokens=[EOT])
    model = tiny_model(request.param, vocab_size=tok.vocab_size, block_size=64)
    run = tmp / "run"
    save_checkpoint(run, model)
    tok.save(run / "tokenizer.json")
    export_hf(model, tmp / "hf", tok)
    ours = FastLM(checkpoint=str(run), batch_size=3)
    theirs = HFLM(pretrained=str(tmp / "hf"), device="cpu", batch_size=3)
    return ours, theirs, run, tmp / "hf"


def reqs(*args_list):
    return [SimpleNamespace(args=a) for a in args_list]


def test_loglikelihood_per_request(routes):
    ours, theirs, *_ = routes
    requests = reqs(*[(c, e) for c in CONTEXTS for e in ENDINGS], ("", "def f():"))
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    assert diff < 1e-4, f"max |loglikelihood diff| {diff}"
    assert [x[1] for x in a] == [y[1] for y in b]


def test_rolling_loglikelihood_over_several_windows(routes):
    ours, theirs, *_ = routes
    texts = [stdlib_text(900, "json/decoder.py"), "short text", stdlib_text(300, "abc.py")]
    assert len(ours.tok_encode(texts[0])) > 3 * ours.max_length  # several windows
    a, b = ours.loglikelihood_rolling(reqs(*[(t,) for t in texts])), \
        theirs.loglikelihood_rolling(reqs(*[(t,) for t in texts]))
    # The long document's log-likelihood is ~-3,900 nats (592 tokens in 64-token windows), and
    # transformers sums in float32, whose ulp there is 2.4e-4: the engines can agree to float32
    # rounding of the total, not to a fixed 1e-4 (on a Zen 3 EPYC they differed by 1.13e-4,
    # 3e-8 of the total).
    assert all(abs(x - y) <= 1e-4 + 1e-6 * abs(y) for x, y in zip(a, b)), list(zip(a, b))


def test_generate_until_same_text(routes):
    ours, theirs, *_ = routes
    requests = reqs(*[(c, {"until": ["\n\n", ")"], "max_gen_toks": 10, "do_sample": False})
                      for c in CONTEXTS],
                    ("def f", {"until": [], "max_gen_toks": 5}))
    assert ours.generate_until(requests) == theirs.generate_until(requests)


def test_unsupported_generation_option_is_named(routes):
    ours, *_ = routes
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate_until(reqs(("def f", {"until": [], "num_beams": 4})))


def write_task(task_dir):
    """A 4-document multiple-choice task in a local jsonl file (no download)."""
    task_dir.mkdir(exist_ok=True)
    docs = [{"q": c, "choices": ENDINGS[:3], "label": i % 3} for i, c in enumerate(CONTEXTS[:4])]
    (task_dir / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task_dir / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return task_dir


def per_choice(result):
    return [float(r[0]) for s in result["samples"]["tiny_mc"] for r in s["filtered_resps"]]


def test_simple_evaluate_same_scores(routes, tmp_path):
    """The task through lm_eval itself, model="fastlm" (device left to lm_eval's default, cuda,
    which a CPU-only machine must survive) and model="hf": the same per-choice scores."""
    from lm_eval.tasks import TaskManager
    _, _, run, hf_dir = routes
    tm = TaskManager(include_path=str(write_task(tmp_path / "tasks")))
    ours = lm_eval.simple_evaluate(model="fastlm", model_args=f"checkpoint={run}",
                                   device="cuda:0", tasks=["tiny_mc"], task_manager=tm,
                                   log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir}",
                                     device="cpu", tasks=["tiny_mc"], task_manager=tm,
                                     log_samples=True)
    served = served_scores(run, hf_dir, tm)
    a, b, c = per_choice(ours), per_choice(theirs), per_choice(served)
    assert len(a) == 12 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert max(abs(x - y) for x, y in zip(a, c)) < 1e-4
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric] \
            == served["results"]["tiny_mc"][metric]


def served_scores(run, hf_dir, tm):
    """The task through lm_eval's local-completions against `python -m fastlm.serve`'s app
    (token-id prompts, echo, logprobs), tokenized with the exported tokenizer."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from fastlm.restore import load
    from fastlm.serve import create_app
    from tests.test_serve import Server
    lm = load(run)
    srv = Server(create_app(lm))
    try:
        return lm_eval.simple_evaluate(
            model="local-completions", tasks=["tiny_mc"], task_manager=tm, log_samples=True,
            model_args=f"model={lm.meta.name},base_url={srv.url}/v1/completions,"
                       f"tokenizer={hf_dir},tokenizer_backend=huggingface,"
                       "tokenized_requests=True,num_concurrent=1,max_retries=1")
    finally:
        srv.stop()
