"""The chat page end to end in a real headless Chromium (Debian's chromium, driven by playwright
with its executable path set): it streams a greedy answer equal to the model's own, keeps the
conversation, shows tokens/s and stops a generation. Skipped with a reason when playwright or
chromium is absent (FASTLM_CHROMIUM overrides where chromium is looked for)."""
import os
import shutil
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
httpx = pytest.importorskip("httpx")
CHROMIUM = os.environ.get("FASTLM_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium executable (apt-get install chromium, or set FASTLM_CHROMIUM)",
                allow_module_level=True)

from fastlm.chat.template import PLAIN_STOP, format_plain
from fastlm.generate.decode import generate
from fastlm.restore import load
from fastlm.serve import Limits, create_app
from tests.lm_fixtures import save_checkpoint, tiny_model
from tests.test_serve import Server

KEY = "web-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, tiny_model("gpt2", block_size=256))
    lm = load(run)
    srv = Server(create_app(lm, api_key=KEY, limits=Limits(max_tokens=200)))
    yield lm, srv
    srv.stop()


def slow_down(model, seconds):
    """Make each decode step take `seconds` more (the tiny model answers faster than a click)."""
    fast = model.forward_cached

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fast(*args, **kwargs)
    model.forward_cached = slow


def answer_text(page, i):
    page.wait_for_selector(f".msg.assistant >> nth={i}")
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant')[{i}].dataset.done === '1'", timeout=60_000)
    return page.eval_on_selector_all(".msg.assistant", f"els => els[{i}].textContent")


def test_chat_page(setup):
    lm, srv = setup
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            first = answer_text(page, 0)
            msgs = [{"role": "user", "content": "hello there"}]
            want = generate(lm.model, lm.tokenizer, format_plain(msgs), max_new_tokens=24,
                            temperature=0, stop=PLAIN_STOP)
            assert first == want
            assert "tokens/s" in page.inner_text("#stats")
            # the second turn is sent with the whole conversation
            page.fill("#input", "and again")
            page.click("#send")
            second = answer_text(page, 1)
            msgs += [{"role": "assistant", "content": first},
                     {"role": "user", "content": "and again"}]
            assert second == generate(lm.model, lm.tokenizer, format_plain(msgs),
                                      max_new_tokens=24, temperature=0, stop=PLAIN_STOP)
            # stop: a long answer ends early, the server drops the row, the page is ready again
            slow_down(lm.model, 0.05)  # 200 tokens would take 10 s
            page.fill("#max_tokens", "200")
            page.fill("#input", "tell me everything")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[2]"
                                   ".textContent.length > 0", timeout=20_000)
            t0 = time.monotonic()
            page.click("#stop")
            answer_text(page, 2)
            assert not page.is_disabled("#send") and page.is_disabled("#stop")
            while httpx.get(srv.url + "/health").json()["decoding"]:
                assert time.monotonic() - t0 < 3, "the server kept decoding a stopped answer"
                time.sleep(0.05)
        finally:
            browser.close()
