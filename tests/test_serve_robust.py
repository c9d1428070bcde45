"""The server survives any single request (issue 19): every field is checked before the request
takes any state, a failure ends that request only, /health tells the worker's real state,
abandoned requests stop decoding, the API key is compared in constant time."""
import json
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
httpx = pytest.importorskip("httpx")

from fastlm import serve
from fastlm.generate.decode import ContinuousDecoder, SamplingParams
from fastlm.restore import load
from fastlm.serve import Limits, create_app
from tests.lm_fixtures import save_checkpoint, tiny_model
from tests.test_serve import Server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, tiny_model("llama", block_size=128))
    return run


@pytest.fixture
def srv(run_dir):
    server = Server(create_app(load(run_dir), limits=Limits(max_concurrency=2, max_tokens=64)))
    yield server
    server.stop()


def post(server, body, path="/v1/completions", timeout=30):
    return httpx.post(server.url + path, content=json.dumps(body) if not isinstance(body, str)
                      else body, timeout=timeout)


def ok(server):
    r = post(server, {"prompt": "abc", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_decoder_add_gives_the_slot_back(run_dir):
    """A seed torch cannot take used to be turned into a generator after the slot was claimed,
    outside the try that gives it back: the slot leaked and rows and cache went out of step."""
    lm = load(run_dir)
    dec = ContinuousDecoder(lm.model, lm.tokenizer, slots=2)
    with pytest.raises(ValueError, match="seed"):
        dec.add([1, 2, 3], SamplingParams(max_new_tokens=4, seed=2**64), key=0)
    assert dec.free == 2 and dec.cache.active == 0

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    dec.model.forward_cached = broken
    with pytest.raises(RuntimeError):
        dec.add([1, 2, 3], SamplingParams(max_new_tokens=4), key=1)
    assert dec.free == 2 and dec.cache.active == 0 and dec.rows == []


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "seed": -2**63 - 1}, "seed"),
    ({"prompt": "x", "max_completion_tokens": -5}, "max_completion_tokens"),
    ({"prompt": "x", "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"prompt": "x", "repetition_penalty": 1e400}, "repetition_penalty"),
])
def test_bad_fields_are_400_and_the_worker_lives(srv, body, param):
    r = post(srv, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok(srv)


def test_nan_and_lone_surrogate_are_400_json(srv):
    for raw in ('{"prompt": "x", "temperature": NaN}', '{"prompt": "a\\ud800b"}',
                '{"messages": [{"role": "user", "content": "\\udcff"}]}'):
        path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
        r = post(srv, raw, path)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]
    ok(srv)


def test_a_failed_step_ends_its_requests_only(srv):
    engine = srv.server.config.app.state.engine
    real = engine.decoder.step
    calls = {"n": 0}

    def step_fails_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise IndexError("a bug in a decode step")
        return real()

    engine.decoder.step = step_fails_once
    r = post(srv, {"prompt": "abc", "max_tokens": 8})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    ok(srv)  # a fresh decoder took over; the worker never stopped


def test_health_reports_a_stopped_worker(srv):
    engine = srv.server.config.app.state.engine
    engine.close()
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    r = post(srv, {"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_abandoned_request_stops_decoding(run_dir):
    lm = load(run_dir)
    slow = lm.model.forward_cached

    def forward_cached(*args, **kwargs):  # 64 tokens take ~3 s
        time.sleep(0.05)
        return slow(*args, **kwargs)

    lm.model.forward_cached = forward_cached
    server = Server(create_app(lm, limits=Limits(max_concurrency=1, max_tokens=64)))
    try:
        engine = server.server.config.app.state.engine
        with pytest.raises(httpx.TimeoutException):
            post(server, {"prompt": "x", "max_tokens": 64, "temperature": 0},
                 timeout=httpx.Timeout(0.5))
        deadline = time.monotonic() + 2
        while engine.decoder.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.decoder.active == 0 and engine.tokens_out < 50
    finally:
        server.stop()


def test_api_key_compared_in_constant_time(run_dir, monkeypatch):
    seen = []
    real = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: seen.append(1) or real(a, b))
    server = Server(create_app(load(run_dir), api_key="k€y"))
    try:
        assert httpx.get(server.url + "/v1/models",
                         headers={"Authorization": "Bearer nope"}).status_code == 401
        good = {"Authorization": "Bearer k€y".encode()}
        assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
        assert len(seen) == 2
    finally:
        server.stop()


def test_port_out_of_range_is_one_line(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        serve.main(["--checkpoint", str(run_dir), "--port", "99999"])
    assert exc.value.code == 2 and "--port" in capsys.readouterr().err
