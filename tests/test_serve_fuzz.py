"""Schemathesis fuzz of the server's API (issue 19): requests generated from the app's own
OpenAPI document (FastAPI's, with the JSON bodies the two POST endpoints read added, since they
parse their bodies themselves), sent to a real uvicorn on 127.0.0.1 with a tiny random model.
No answer may be a 5xx, and the generation worker must be alive at the end. Bounded: a few
dozen examples per operation, answers of at most 4 tokens."""
import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fastlm.restore import load  # noqa: E402
from fastlm.serve import Limits, create_app  # noqa: E402
from tests.lm_fixtures import save_checkpoint, tiny_model  # noqa: E402
from tests.test_serve import Server  # noqa: E402


def _body(**required) -> dict:
    sampling = {"model": {"type": "string"}, "max_tokens": {"type": "integer"},
                "max_completion_tokens": {"type": "integer"}, "temperature": {"type": "number"},
                "top_p": {"type": "number"}, "top_k": {"type": "integer"},
                "min_p": {"type": "number"}, "repetition_penalty": {"type": "number"},
                "seed": {"type": "integer"}, "n": {"type": "integer"},
                "stream": {"type": "boolean"},
                "stop": {"anyOf": [{"type": "string"}, {"type": "array",
                                                        "items": {"type": "string"}}]}}
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {**sampling, **required},
        "required": list(required)}}}}


MESSAGE = {"type": "object", "properties": {"role": {"type": "string"},
                                            "content": {"type": "string"}}}


def api_schema(app) -> dict:
    doc = app.openapi()
    doc["paths"]["/v1/completions"]["post"]["requestBody"] = _body(prompt={"type": "string"})
    doc["paths"]["/v1/chat/completions"]["post"]["requestBody"] = _body(
        messages={"type": "array", "items": MESSAGE})
    return doc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, tiny_model("llama", block_size=64))
    srv = Server(create_app(load(path), limits=Limits(max_concurrency=2, max_tokens=4)))
    yield srv
    srv.stop()


def test_api_fuzz_no_5xx_worker_alive(server):
    schema = schemathesis.openapi.from_dict(api_schema(server.server.config.app))
    failures, statuses = [], set()
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def fuzz(case):
            response = case.call(base_url=server.url, timeout=30)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code,
                                 response.text[:300]))

        fuzz()
    assert failures == []
    assert 200 in statuses and 400 in statuses  # both answers and refusals were exercised
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
