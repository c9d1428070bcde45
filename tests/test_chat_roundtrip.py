"""Fine-tune for chat, then chat with the result: the terminal chat and the server's
/v1/chat/completions must prompt a model with exactly the ids `fastlm.finetune --task sft` trained
it on, through the one loader (fastlm.restore.load) and the one template (fastlm.chat.template);
a model without the chat tokens gets the plain "User: ... Assistant:" transcript instead."""
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx")

from fastlm.chat import cli
from fastlm.chat.template import (
    IGNORE,
    PLAIN_STOP,
    SPECIAL_TOKENS,
    TEMPLATE_STOP,
    format_plain,
    has_chat_tokens,
)
from fastlm.eval.tasks import Example, write_jsonl
from fastlm.finetune.loop import main as finetune_main
from fastlm.finetune.loop import sft_tensors
from fastlm.generate.decode import Event, SamplingParams
from fastlm.restore import load
from fastlm.serve import Limits, create_app
from tests.lm_fixtures import save_checkpoint, tiny_model
from tests.test_serve import Server

HISTORY = [{"role": "system", "content": "be brief"},
           {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "bye"}]
REPLY = {"role": "assistant", "content": "ok"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base run, sft run): a tiny byte-level gpt2 and its chat fine-tune (a few CPU steps)."""
    root = tmp_path_factory.mktemp("chat")
    base = root / "base"
    save_checkpoint(base, tiny_model("gpt2", block_size=128))
    data = root / "sft.jsonl"
    write_jsonl(data, [{"messages": HISTORY + [REPLY]}]
                + [{"prompt": f"say {w}", "response": w} for w in ["yes", "no"] * 3])
    out = root / "sft"
    finetune_main(["--checkpoint", str(base), "--task", "sft", "--data", str(data),
                   "--out", str(out), "--train.max_steps=2", "--eval.interval=1",
                   "--train.progress=false"])
    return base, out


def cli_prompt(run, monkeypatch) -> tuple[list[int], SamplingParams]:
    """The ids and sampling the terminal chat decodes for HISTORY, typed in as a user would."""
    users = iter([m["content"] for m in HISTORY if m["role"] == "user"] + [""])
    replies = iter([m["content"] for m in HISTORY if m["role"] == "assistant"])
    seen = []

    def fake_stream(model, tokenizer, prompts, params):  # answers with the conversation's reply
        seen.append((list(prompts[0]), params))
        return iter([Event(0, next(replies, ""), 1, "stop")])

    monkeypatch.setattr("builtins.input", lambda prompt="": next(users))
    monkeypatch.setattr(cli, "stream", fake_stream)
    assert cli.main(["--checkpoint", str(run), "--system", HISTORY[0]["content"],
                     "--temperature", "0", "--max-new-tokens", "4"]) == 0
    return seen[-1]


def server_prompt(run) -> tuple[list[int], SamplingParams]:
    """The ids and sampling the server queues for HISTORY on /v1/chat/completions."""
    app = create_app(load(run), limits=Limits(max_tokens=8))
    engine = app.state.engine
    jobs, submit = [], engine.submit
    engine.submit = lambda job: (jobs.append(job), submit(job))[1]
    srv = Server(app)
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"messages": HISTORY, "max_tokens": 4, "temperature": 0})
    finally:
        srv.stop()
    assert r.status_code == 200, r.text
    return jobs[0].prompt_ids, jobs[0].params


def test_chat_and_server_prompt_with_the_ids_sft_trained_on(runs, monkeypatch):
    _, sft = runs
    model, tok, meta = load(sft)
    assert meta.task == "sft" and has_chat_tokens(tok)
    # what fine-tuning trained on for the whole conversation, and the prefix before the reply
    (x, y), = sft_tensors(tok, [Example({"messages": HISTORY + [REPLY]}, "sft.jsonl:1")],
                          model.config.block_size)
    assistant = tok.special_tokens["<|assistant|>"]
    k = len(x) - x[::-1].index(assistant)  # up to and including the last <|assistant|>
    assert y[k - 2] == IGNORE and y[k - 1] == tok.encode_ordinary(REPLY["content"])[0]
    for ids, params in (cli_prompt(sft, monkeypatch), server_prompt(sft)):
        assert ids == x[:k]
        assert params.stop[-len(TEMPLATE_STOP):] == TEMPLATE_STOP == ("<|end|>",)


def test_a_model_without_chat_tokens_gets_the_plain_transcript(runs, monkeypatch):
    base, _ = runs
    _, tok, _ = load(base)
    assert not any(t in tok.special_tokens for t in SPECIAL_TOKENS)
    want = tok.encode(format_plain(HISTORY))
    assert tok.decode(want).endswith("User: bye\nAssistant:")
    for ids, params in (cli_prompt(base, monkeypatch), server_prompt(base)):
        assert ids == want
        assert params.stop[-len(PLAIN_STOP):] == PLAIN_STOP == ("\nUser:",)
