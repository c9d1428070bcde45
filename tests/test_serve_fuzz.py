"""Schemathesis fuzz of the server's API: requests generated from the app's own OpenAPI
document (its POST bodies published by fastlm.serve_schema), sent to a real uvicorn on
127.0.0.1 with a tiny random model.
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(path, tiny_model("llama", block_size=64))
    srv = Server(create_app(load(path), limits=Limits(max_concurrency=2, max_tokens=4)))
    yield srv
    srv.stop()


def test_api_fuzz_no_5xx_worker_alive(server):
    doc = server.server.config.app.openapi()  # the server's own document, bodies included
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert field in body["schema"]["properties"]
    schema = schemathesis.openapi.from_dict(doc)
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


def test_published_bodies_list_every_field_the_server_reads():
    """A field the handlers read but the schema omits would never be fuzzed (nor documented)."""
    import re

    import fastlm.serve
    from fastlm.serve_schema import CHAT, COMPLETION

    source = open(fastlm.serve.__file__).read()
    read = set(re.findall(r'body\.get\("(\w+)"', source))
    read |= set(re.findall(r'_get\(body, "(\w+)"', source))
    refused = {"suffix", "tools", "functions", "best_of"}  # read only to refuse them
    assert read - refused - set(COMPLETION) - set(CHAT) == set()
    assert {"prompt", "messages", "logprobs", "seed"} <= read  # the scan found the handlers
