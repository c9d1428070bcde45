"""The OpenAI-compatible server, driven by the official openai client and by plain HTTP, on a
real uvicorn server bound to 127.0.0.1 on a free port, with a tiny random model."""
import concurrent.futures
import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastlm.generate.decode import generate
from fastlm.restore import load
from fastlm.serve import BackgroundServer as Server  # noqa: F401 (used by the other server tests)
from fastlm.serve import Limits, create_app
from tests.lm_fixtures import save_checkpoint, tiny_model

KEY = "test-key"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, tiny_model("llama", block_size=128))
    return load(run)


@pytest.fixture(scope="module")
def server(lm):
    srv = Server(create_app(lm, api_key=KEY, limits=Limits(max_concurrency=4, max_queue=16,
                                                           max_tokens=64, max_body_bytes=20_000)))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client, lm):
    assert [m.id for m in client.models.list().data] == [lm.meta.name]
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_completion_matches_generate(client, lm):
    want = generate(lm.model, lm.tokenizer, "def f(", max_new_tokens=10, temperature=0)
    r = client.completions.create(model=lm.meta.name, prompt="def f(", max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 10
    chunks = list(client.completions.create(model=lm.meta.name, prompt="def f(", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_and_not(client, lm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=lm.meta.name, messages=msgs, max_tokens=12,
                                       temperature=0.7, seed=5)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    stream = client.chat.completions.create(model=lm.meta.name, messages=msgs, max_tokens=12,
                                            temperature=0.7, seed=5, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert "\nUser:" not in text  # the transcript's stop string ends the reply


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("path,body,key,status,code", [
    ("/v1/completions", "{not json", KEY, 400, "invalid_json"),
    ("/v1/completions", [1, 2], KEY, 400, "invalid_json"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, KEY, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, KEY, 400, "too_many_tokens"),
    ("/v1/completions", {"prompt": "x" * 200}, KEY, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x" * 30_000}, KEY, 413, "body_too_large"),
    ("/v1/completions", {"prompt": "x"}, "wrong", 401, "invalid_api_key"),
    ("/v1/completions", {"prompt": "x"}, None, 401, "invalid_api_key"),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, KEY, 400, None),
    ("/v1/completions", {"prompt": 3}, KEY, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, KEY, 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, KEY, 400, None),
    ("/v1/nothing", {}, KEY, 404, "not_found"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, KEY, 400, "too_many_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, KEY, 400, "too_many_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True}, KEY, 400, None),
    ("/v1/completions", {"prompt": [1, 2, 999]}, KEY, 400, None),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, KEY, 400, "too_many_choices"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True},
     KEY, 400, None),
])
def test_errors(server, path, body, key, status, code):
    r = post(server, path, body, key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (code is None or err["code"] == code)


def test_key_required_on_models(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_concurrent_clients_all_complete(server, lm):
    """8 streaming clients at once (more than a batch): every answer complete, equal to what the
    same request gives alone (greedy), nothing lost or mixed between clients."""
    prompts = [f"client {i}: " + "ab" * i for i in range(8)]
    want = {p: generate(lm.model, lm.tokenizer, p, max_new_tokens=16, temperature=0)
            for p in prompts}

    def one(p):
        body = {"prompt": p, "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
            assert r.status_code == 200
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return p, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(one, prompts))
    assert got == want


def test_full_queue_is_429(lm):
    srv = Server(create_app(lm, limits=Limits(max_concurrency=1, max_queue=1, max_tokens=64)))
    try:
        body = {"prompt": "x", "max_tokens": 60, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: post(srv, "/v1/completions", body, None), range(6)))
        statuses = sorted(r.status_code for r in codes)
        assert 200 in statuses and 429 in statuses, statuses
        rejected = next(r for r in codes if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
    finally:
        srv.stop()


def test_defaults_within_limits(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 64  # the server's cap, not 256
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_request_joins_running_batch(tmp_path):
    """Continuous batching: a request sent while another is mid-answer starts streaming before
    the first one ends (it joined the running batch, not a later one), both rows were decoded
    together, and both answers equal their solo greedy outputs."""
    save_checkpoint(tmp_path, tiny_model("gpt2", block_size=128))
    lm = load(tmp_path)
    slow = lm.model.forward_cached

    def forward_cached(*args, **kwargs):  # ~10 ms a step: the first answer lasts ~0.6 s
        time.sleep(0.01)
        return slow(*args, **kwargs)

    lm.model.forward_cached = forward_cached
    srv = Server(create_app(lm, limits=Limits(max_concurrency=4, max_tokens=64)))
    prompts = {"a": "the first request ", "b": "a second one"}
    lengths = {"a": 60, "b": 8}
    want = {k: generate(lm.model, lm.tokenizer, p, max_new_tokens=lengths[k], temperature=0)
            for k, p in prompts.items()}
    times: dict[str, list[float]] = {"a": [], "b": []}
    texts = {"a": "", "b": ""}
    a_started = threading.Event()

    def one(k):
        body = {"prompt": prompts[k], "max_tokens": lengths[k], "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for ln in r.iter_lines():
                if ln.startswith("data: {"):
                    texts[k] += json.loads(ln[6:])["choices"][0]["text"]
                    times[k].append(time.monotonic())
                    a_started.set()

    try:
        first = threading.Thread(target=one, args=("a",))
        first.start()
        assert a_started.wait(30)
        one("b")
        first.join(60)
        assert texts == want
        assert times["b"][0] < times["a"][-1], "the second request waited for the first to end"
        assert srv.server.config.app.state.engine.max_rows_seen == 2
    finally:
        srv.stop()


def test_model_by_id(server, client, lm):
    assert client.models.retrieve(lm.meta.name).id == lm.meta.name
    r = httpx.get(server.url + "/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_logprobs_and_echo_score_as_fastlm_eval(client, lm):
    """echo + logprobs (what lm-eval's local-completions sends) gives every prompt token's
    log-probability as fastlm.eval.core.loglikelihood computes it, the top alternatives most
    likely first, and the answer's tokens too."""
    from fastlm.eval.core import loglikelihood
    tok = lm.tokenizer
    prompt = "def main():\n    return"
    ids = tok.encode(prompt)
    r = client.completions.create(model=lm.meta.name, prompt=prompt, max_tokens=3,
                                  temperature=0, logprobs=3, echo=True)
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens[:len(ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k in range(1, len(ids)):
        want, _ = loglikelihood(lm.model, [(ids[:k], [ids[k]])])[0]
        assert abs(lp.token_logprobs[k] - want) < 1e-5
    for pos in range(1, len(lp.tokens)):
        top = list(lp.top_logprobs[pos].values())
        assert len(top) == 3 and top == sorted(top, reverse=True)
    # greedy: every answer token is the most likely one
    assert all(lp.token_logprobs[p] == max(lp.top_logprobs[p].values())
               for p in range(len(ids), len(lp.tokens)))
    assert lp.text_offset[len(ids)] == len(prompt)
    plain = client.completions.create(model=lm.meta.name, prompt=prompt, max_tokens=3,
                                      temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(ids):]


def test_token_prompts_lists_and_n(server, lm):
    """Token-id prompts, lists of prompts and n > 1: choice i * n + j answers prompt i."""
    tok = lm.tokenizer
    texts = ["def f(", "import "]
    want = [generate(lm.model, tok, t, max_new_tokens=5, temperature=0) for t in texts]
    r = post(server, "/v1/completions", {"prompt": [tok.encode(texts[0]), texts[1]], "n": 2,
                                         "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [want[0], want[0], want[1], want[1]]
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in texts)
    assert body["usage"]["completion_tokens"] == 4 * 5
    one = post(server, "/v1/completions", {"prompt": tok.encode(texts[1]), "max_tokens": 5,
                                           "temperature": 0})
    assert one.json()["choices"][0]["text"] == want[1]
    # sampled with a seed: choice j draws with seed + j, so the choices differ and repeat
    body = {"prompt": "x", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    a, b = (post(server, "/v1/completions", body).json()["choices"] for _ in range(2))
    assert [c["text"] for c in a] == [c["text"] for c in b]
    assert len({c["text"] for c in a}) > 1


def test_chat_logprobs(client, lm):
    r = client.chat.completions.create(model=lm.meta.name, temperature=0, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob
        raw = bytes(c.bytes)  # the token's own bytes; its name is their text when it has one
        try:
            assert c.token == raw.decode()
        except UnicodeDecodeError:
            assert c.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
