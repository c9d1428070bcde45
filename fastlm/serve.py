"""An OpenAI-compatible HTTP server with a web chat page (FastAPI + uvicorn).

    python -m fastlm.serve --checkpoint RUN_DIR [--host 127.0.0.1 --port 8000 --api-key KEY
        --tokenizer FILE --device cpu --precision auto|fp32|bf16 --max-concurrency 8 --max-queue 32 --max-tokens 512 --max-body-bytes 1000000]

Endpoints: GET / (the chat page, fastlm/web/index.html), GET /health, GET /v1/models,
GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions (JSON, or server-sent events with
"stream": true). The API key (--api-key or FASTLM_API_KEY) is checked on every /v1 endpoint as
"Authorization: Bearer KEY"; / and /health stay open. It binds to 127.0.0.1 unless told otherwise.

Chat: /v1/chat/completions (and so the chat page, which sends its conversation there) builds its
prompt with fastlm.chat.template.chat_prompt: the <|user|>...<|assistant|> template a model
fine-tuned with fastlm.finetune --task sft was trained on, stopping at <|end|>, or the plain
"User: ... Assistant:" transcript for a model without the chat tokens, stopping at "\nUser:".

Batching: continuous. Requests wait in a bounded queue; one worker thread owns a
fastlm.generate.decode.ContinuousDecoder with --max-concurrency slots. Between two decode steps it
admits waiting requests into free slots (each is prefilled alone and yields its first token),
then runs one step for every active row together; a row that finishes (or whose client went
away) leaves at once and frees its slot for the next request. So a request arriving while
others decode joins the running batch at the next step instead of waiting for the batch to
end. Each row keeps its own sampling settings, seed and position, and its tokens equal what it
would get alone. When the queue is full the server answers 429 with Retry-After.

Limits: a prompt may fill the context but one position (block_size - 1 tokens, else 400
context_length_exceeded); max_tokens at most --max-tokens (else 400 too_many_tokens); an answer
that reaches the end of the context stops with finish_reason "length". Sampling fields:
temperature, top_p, seed, stop (up to 4 strings), max_tokens / max_completion_tokens, and the
extensions top_k, min_p, repetition_penalty; tools are refused.

Completions take a prompt as a string, a list of token ids, or a list of either (one choice per
prompt, in order); n > 1 gives n choices per prompt (index = prompt * n + j; with a seed, choice
j samples with seed + j). `echo` puts the prompt before the answer; `logprobs` (up to
--max-logprobs alternatives; chat: `logprobs` + `top_logprobs`) reports each token's
log-probability under the model, scored as fastlm.eval scores it (fastlm.generate.logprobs), the
prompt's tokens too with echo (the first is null). A completion that ends at <|endoftext|>
lists that token last in its logprobs (not in its text), as vLLM does: lm-eval's
local-completions reads one token past the prompt. Every choice of a request is queued at once,
so a request may hold at most --max-queue choices; streaming takes one choice without logprobs
or echo.

Errors are JSON in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastlm import checkpoint as ckpt
from fastlm.chat.template import chat_prompt
from fastlm.command import run_command
from fastlm.generate.decode import (
    ContinuousDecoder,
    SamplingParams,
    add_model_args,
    load_from_args,
    stop_ids_of,
)
from fastlm.generate.logprobs import token_logprobs
from fastlm.serve_schema import CHAT_BODY, COMPLETION_BODY
from fastlm.restore import Restored

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
except ImportError as _exc:  # the serve extra is optional
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
SHUTDOWN_S = 10  # the longest SIGTERM waits for open responses before closing them


@dataclass
class Limits:
    max_concurrency: int = 8  # rows decoded together (cache slots, each block_size long)
    max_queue: int = 32  # requests waiting for a free slot; more get 429
    max_tokens: int = 512  # cap on a request's max_tokens
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 0  # 0 = the model's block_size - 1
    max_logprobs: int = 20  # alternatives per token in logprobs / top_logprobs


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------
# The engine: a bounded queue and one worker thread running continuous batching
@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Event, then None at the end
    cancelled: bool = False


class Engine:
    """The queue and the worker thread. The worker outlives any request: a request's failure
    ends that request only (and a failed decode step the rows it held, on a fresh decoder);
    `failure` says why the worker stopped, if it ever did, and every open response ends then."""

    def __init__(self, lm: Restored, limits: Limits):
        self.lm, self.limits = lm, limits
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=limits.max_queue)
        self.busy_rows = 0
        self.tokens_out = 0
        self.max_rows_seen = 0  # the most rows decoded together so far (tests, the bench)
        self.failure: str | None = None  # why the worker stopped (None while it runs)
        # built here, not in the thread, so a model it cannot serve fails create_app loudly
        self.decoder = self._new_decoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastlm-engine", daemon=True)
        self._thread.start()

    def _new_decoder(self) -> ContinuousDecoder:
        return ContinuousDecoder(self.lm.model, self.lm.tokenizer, self.limits.max_concurrency)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def submit(self, job: Job) -> None:
        if not self.alive:
            why = self.failure or "shutting down"
            raise ApiError(503, f"the generation worker is not running ({why})", "server_error",
                           headers={"Retry-After": "5"})
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"server busy: {self.limits.max_queue} requests already "
                           "waiting; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None

    def close(self, timeout: float = 10) -> None:
        """Stop the worker; it ends every open response first (bounded by timeout)."""
        self._stop.set()
        self._thread.join(timeout=timeout)

    @classmethod
    def _end(cls, job: Job, error: Exception | None = None) -> None:
        if error is not None:
            cls._send(job, error)
        cls._send(job, None)

    @staticmethod
    def _send(job: Job, item) -> None:
        with contextlib.suppress(RuntimeError):  # the client's event loop already closed
            job.loop.call_soon_threadsafe(job.out.put_nowait, item)

    def _run(self) -> None:
        running: dict[int, Job] = {}
        try:
            self._serve(running)
            self.failure = "shut down"
        except BaseException as exc:  # noqa: BLE001 -- recorded for /health, then every job ends
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            gone = RuntimeError(f"the server stopped ({self.failure})")
            for job in running.values():
                self._end(job, gone)
            while True:
                try:
                    self._end(self.jobs.get_nowait(), gone)
                except queue.Empty:
                    break
            self.busy_rows = 0

    def _serve(self, running: dict[int, Job]) -> None:
        ids = itertools.count()

        def deliver(events) -> None:
            for ev in events:
                job = running[ev.row]
                self.tokens_out += ev.token is not None
                self._send(job, ev)
                if ev.finish_reason is not None:
                    self._end(job)
                    del running[ev.row]

        while not self._stop.is_set():
            dec = self.decoder
            try:
                # admit: block only while idle, otherwise take what is waiting, up to free slots
                while dec.free:
                    try:
                        job = (self.jobs.get(timeout=0.1) if not running
                               else self.jobs.get_nowait())
                    except queue.Empty:
                        break
                    if job.cancelled:
                        self._end(job)
                        continue
                    key = next(ids)
                    running[key] = job
                    try:
                        deliver(dec.add(job.prompt_ids, job.params, key))
                    except Exception as exc:  # noqa: BLE001 -- this request's error only
                        running.pop(key, None)
                        self._end(job, exc)
                for key, job in list(running.items()):  # clients that went away
                    if job.cancelled:
                        deliver(dec.cancel(key))
                self.busy_rows = dec.active
                self.max_rows_seen = max(self.max_rows_seen, dec.active)
                if dec.active:
                    deliver(dec.step())
            except Exception as exc:  # noqa: BLE001 -- a bug ends the rows it hit, not the worker
                for job in running.values():
                    self._end(job, exc)
                running.clear()
                self.decoder = self._new_decoder()  # its state is unknown after a failed step


# ---------------------------------------------------------------------------------------------
# Request parsing: every bad field named
def _get(body: dict, name: str, types, default, check=None, rule: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' must be {rule or types}, got {value!r}", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {rule}, got {value!r}", param=name)
    return value


def sampling_from_body(body: dict, limits: Limits, extra_stop: tuple[str, ...] = ()
                       ) -> SamplingParams:
    num = (int, float)
    default = min(limits.max_tokens, 16 if extra_stop == () else 256)  # OpenAI's: 16 / open
    which = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, which, int, default, lambda v: v >= 1, "an integer >= 1")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{which}' is {max_tokens}, more than this server's limit of "
                       f"{limits.max_tokens}", param=which, code="too_many_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them",
                       param="stop")
    for unsupported in ("suffix", "tools", "functions", "best_of"):
        if body.get(unsupported) not in (None, False, 1 if unsupported == "best_of" else None):
            raise ApiError(400, f"'{unsupported}' is not supported by this server",
                           param=unsupported)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(_get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")),
        top_k=_get(body, "top_k", int, 0, lambda v: v >= 0, "an integer >= 0"),
        top_p=float(_get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
        min_p=float(_get(body, "min_p", num, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")),
        repetition_penalty=float(_get(body, "repetition_penalty", num, 1.0,
                                      lambda v: 0 < v < math.inf, "> 0 and finite")),
        stop=tuple(stop) + extra_stop,
        seed=_get(body, "seed", int, None, lambda v: -2**63 <= v < 2**64,
                  "an integer in [-2**63, 2**64)"))
    try:  # the decoder's own rules too, so nothing it would refuse reaches the worker
        return params.validate()
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def logprobs_from_body(body: dict, limits: Limits, chat: bool) -> int | None:
    """Alternatives per token asked for (0: the chosen token's log-probability only), or None
    when no logprobs are asked for. Completions: logprobs=K; chat: logprobs=true (+ top_logprobs=K)."""
    if chat:
        if not _get(body, "logprobs", bool, False, rule="a boolean"):
            if body.get("top_logprobs") is not None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            return None
        name = "top_logprobs"
    else:
        name = "logprobs"
    k = _get(body, name, int, 0 if chat else None, lambda v: v >= 0, "an integer >= 0")
    if k is not None and k > limits.max_logprobs:
        raise ApiError(400, f"'{name}' is {k}, more than this server's limit of "
                       f"{limits.max_logprobs} alternatives per token", param=name,
                       code="too_many_logprobs")
    return k


def prompts_from_body(body: dict, tokenizer) -> list[list[int]]:
    """A completion's prompts as token ids: 'prompt' is a string, a list of token ids, or a
    list of strings and token-id lists (one choice each)."""
    def ids_of(p, where: str) -> list[int]:
        if isinstance(p, str):
            return tokenizer.encode(p, allowed_special="all")
        if isinstance(p, list) and p and all(type(t) is int for t in p):
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"'{where}' holds token ids outside the vocabulary "
                               f"0..{tokenizer.vocab_size - 1}: {bad[:5]}", param="prompt")
            return list(p)
        raise ApiError(400, f"'{where}' must be a string or a non-empty list of token ids "
                       "('prompt' may also be a list of those)", param="prompt")

    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [ids_of(prompt, "prompt")]


def token_text(tokenizer, t: int) -> str:
    """A token as OpenAI names it: its text, or "bytes:\\xNN..." when its bytes are not UTF-8
    on their own (a piece of a character), so different tokens never share a name."""
    raw = tokenizer.token_bytes(t)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer, shown: list[int], scored: list) -> dict:
    """OpenAI's completions logprobs of the tokens `shown`; `scored` (fastlm.generate.logprobs)
    covers their tail (a leading echoed prompt token has nothing to be scored from: null).
    text_offset: where each token starts in the choice's text."""
    pad = [None] * (len(shown) - len(scored))
    return {"tokens": [token_text(tokenizer, t) for t in shown],
            "token_logprobs": pad + [e.logprob for e in scored],
            "top_logprobs": pad + [{token_text(tokenizer, t): lp for t, lp in e.top}
                                   for e in scored],
            "text_offset": [len(tokenizer.decode(shown[:i])) for i in range(len(shown))]}


def chat_logprobs(tokenizer, scored: list) -> dict:
    """OpenAI's chat logprobs: token, logprob, UTF-8 bytes and top_logprobs per answer token."""
    def entry(t: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, t), "logprob": lp,
                "bytes": list(tokenizer.token_bytes(t))}
    return {"content": [{**entry(e.token, e.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in scored]}


def _usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------------------------------------
# The app
def create_app(lm: Restored, api_key: str | None = None, limits: Limits | None = None):
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"fastlm.serve needs fastapi and uvicorn ({_IMPORT_ERROR}); "
                           "pip install 'fastlm[serve]'")
    limits = limits or Limits()
    max_prompt = limits.max_prompt_tokens or lm.model.config.block_size - 1
    engine = Engine(lm, limits)
    name = lm.meta.name

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="fastlm", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # still JSON, still OpenAI's shape
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                        "server_error").response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}",
                        code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "").encode("latin-1")  # as it came
        if not hmac.compare_digest(got, f"Bearer {api_key}".encode()):  # no timing leak
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of "
                           f"{limits.max_body_bytes}", code="body_too_large")
        data = bytearray()
        async for chunk in request.stream():  # chunked bodies carry no length: count them
            data += chunk
            if len(data) > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {limits.max_body_bytes} "
                               "bytes", code="body_too_large")
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:  # JSON may escape a lone UTF-16 surrogate ("\\ud800"), which is not text
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (not valid "
                           "Unicode text)", code="invalid_json") from None
        model = body.get("model")
        if model is not None and model != name:
            raise ApiError(404, f"model {model!r} does not exist; this server has {name!r}",
                           param="model", code="model_not_found")
        return body

    def check_length(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"'{param}' is empty", param=param)
        if len(ids) > max_prompt:
            raise ApiError(400, f"'{param}' has {len(ids)} tokens; the limit is {max_prompt} "
                           f"(model context {lm.model.config.block_size})", param=param,
                           code="context_length_exceeded")
        return ids

    def submit(ids: list[int], params: SamplingParams) -> Job:
        """Queue the request now, so a full queue is a 429 before any response starts."""
        job = Job(ids, params, asyncio.get_running_loop())
        engine.submit(job)
        return job

    async def results(job: Job):
        """Async iterator over the job's Events."""
        try:
            while True:
                try:  # a worker that stopped ends its jobs; this only guards a lost wakeup
                    item = await asyncio.wait_for(job.out.get(), timeout=5)
                except asyncio.TimeoutError:
                    if engine.alive:
                        continue
                    raise ApiError(503, f"the generation worker stopped ({engine.failure})",
                                   "server_error") from None
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise ApiError(500, f"generation failed: {item}", "server_error")
                yield item
        finally:  # also when the client went away and the response was cancelled
            job.cancelled = True

    def respond(body: dict, job: Job, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "created": created, "model": name}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        def finish_of(reason: str | None) -> str:
            return "length" if reason == "length" else "stop"

        if body.get("stream"):
            opts = body.get("stream_options") or {}
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

            async def events():
                n_out, first = 0, chat
                chunk_obj = obj + ".chunk" if chat else obj
                if first:
                    yield _sse({**base, "object": chunk_obj, "choices": [choice("", None, True)]})
                try:
                    async for ev in results(job):
                        n_out += ev.token is not None
                        fin = finish_of(ev.finish_reason) if ev.finish_reason else None
                        if ev.text or fin:
                            yield _sse({**base, "object": chunk_obj,
                                        "choices": [choice(ev.text, fin)]})
                except ApiError as exc:
                    yield _sse({"error": {"message": exc.message, "type": exc.type}})
                if include_usage:
                    yield _sse({**base, "object": chunk_obj, "choices": [],
                                "usage": _usage(len(job.prompt_ids), n_out)})
                yield "data: [DONE]\n\n"
            return events()

        async def whole():
            text, n_out, reason = "", 0, None
            async for ev in results(job):
                text += ev.text
                n_out += ev.token is not None
                reason = ev.finish_reason or reason
            if chat:
                ch = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_of(reason)}
            else:
                ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_of(reason)}
            return {**base, "object": obj, "choices": [ch], "usage": _usage(len(job.prompt_ids), n_out)}
        return whole()

    async def until_disconnect(request: Request, jobs: list[Job], whole):
        """Await the whole answer, cancelling the jobs if the client leaves first (uvicorn
        does not cancel a handler whose client went away; a stream notices on its next send)."""
        task = asyncio.ensure_future(whole)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    for job in jobs:
                        job.cancelled = True
                    task.cancel()
                    raise ApiError(499, "the client closed the request", code="client_closed")
            return task.result()
        finally:
            if not task.done():
                for job in jobs:
                    job.cancelled = True
                task.cancel()

    async def reply(request: Request, body: dict, ids, params, chat: bool):
        job = submit(ids, params)
        result = respond(body, job, chat)
        if body.get("stream"):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await until_disconnect(request, [job], result))

    score_lock = threading.Lock()  # one scoring forward at a time beside the decode worker

    def score(seq: list[int], start: int, k: int) -> list:
        with score_lock:
            return token_logprobs(lm.model, seq, start, k)

    async def collect(job: Job) -> tuple[str, list[int], str | None, list[int]]:
        """(text, answer ids, finish reason, [the stop id that ended it] or [])."""
        text, tokens, reason, last = "", [], None, None
        async for ev in results(job):
            text += ev.text
            if ev.token is not None:
                tokens.append(ev.token)
            reason, last = ev.finish_reason or reason, ev
        # the decoder ends a row on a stop id with a token-less "stop" Event (it keeps no id)
        ended_on = (stop_ids_of(lm.tokenizer)[:1]
                    if reason == "stop" and last is not None and last.token is None else [])
        return text, tokens, reason, ended_on

    async def answer_all(request: Request, prompts: list[list[int]], n: int,
                         params: SamplingParams, k: int | None, echo: bool, chat: bool) -> dict:
        """The non-streamed answer of every prompt x n choice, with logprobs when k is set."""
        if len(prompts) * n > limits.max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} "
                           f"choices; this server queues at most {limits.max_queue} per request",
                           param="n", code="too_many_choices")
        jobs: list[Job] = []
        try:  # all queued now: a full queue is one 429 and nothing left behind
            for ids in prompts:
                for j in range(n):
                    seed = None if params.seed is None else (params.seed + j) % 2**64
                    jobs.append(submit(ids, replace(params, seed=seed)))
        except ApiError:
            for job in jobs:
                job.cancelled = True
            raise
        outs = await until_disconnect(request, jobs, asyncio.gather(*map(collect, jobs)))
        choices = []
        for i, (job, (text, tokens, reason, ended_on)) in enumerate(zip(jobs, outs)):
            ids = job.prompt_ids
            finish = "length" if reason == "length" else "stop"
            lp = None
            if k is not None:
                shown = tokens if chat else (ids if echo else []) + tokens + ended_on
                seq = ids + tokens + ([] if chat else ended_on)
                scored = await asyncio.to_thread(score, seq, len(seq) - len(shown) + (
                    1 if echo else 0), k)
                lp = (chat_logprobs(lm.tokenizer, scored) if chat
                      else completion_logprobs(lm.tokenizer, shown, scored))
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": finish})
            else:
                shown_text = (lm.tokenizer.decode(ids) if echo else "") + text
                choices.append({"index": i, "text": shown_text, "logprobs": lp,
                                "finish_reason": finish})
        n_out = sum(len(tokens) for _, tokens, _, _ in outs)
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": name, "choices": choices,
                "usage": _usage(sum(len(ids) for ids in prompts), n_out)}

    async def answer(request: Request, body: dict, prompts: list[list[int]],
                     params: SamplingParams, chat: bool):
        """One streamed or whole choice the plain way; several choices, logprobs or echo
        through answer_all (not streamed)."""
        n = _get(body, "n", int, 1, lambda v: v >= 1, "an integer >= 1")
        k = logprobs_from_body(body, limits, chat)
        echo = _get(body, "echo", bool, False, rule="a boolean")
        if chat and echo:
            raise ApiError(400, "'echo' is not supported by chat completions", param="echo")
        if len(prompts) * n == 1 and k is None and not echo:
            return await reply(request, body, prompts[0], params, chat)
        if body.get("stream"):
            raise ApiError(400, "'stream' takes one choice without logprobs or echo; send "
                           "\"stream\": false", param="stream")
        return JSONResponse(await answer_all(request, prompts, n, params, k, echo, chat))

    @app.get("/health")
    async def health():
        state = {"model": name, "queued": engine.jobs.qsize(), "decoding": engine.busy_rows}
        if not engine.alive:  # the worker's real state: a load balancer must see it
            return JSONResponse({"status": "error", "error": f"generation worker stopped "
                                 f"({engine.failure or 'shutting down'})", **state},
                                status_code=503)
        return {"status": "ok", **state}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    card = {"id": name, "object": "model", "created": started, "owned_by": "fastlm",
            "context_length": lm.model.config.block_size}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(request)
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server has {name!r}",
                           param="model", code="model_not_found")
        return card

    @app.post("/v1/completions", openapi_extra=COMPLETION_BODY)
    async def completions(request: Request):
        check_key(request)
        body = await read_json(request)
        prompts = [check_length(ids, "prompt") for ids in prompts_from_body(body, lm.tokenizer)]
        params = sampling_from_body(body, limits)
        return await answer(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=CHAT_BODY)
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ApiError(400, "'messages' must be a list of {role, content} objects",
                           param="messages")
        try:  # the chat template fastlm.finetune trains on, or the plain transcript
            ids, stop = chat_prompt(lm.tokenizer, messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        params = sampling_from_body(body, limits, stop)
        return await answer(request, body, [check_length(ids, "messages")], params, chat=True)

    return app


class BackgroundServer:
    """create_app's app served by uvicorn in a thread, on a loopback socket bound here (so the
    port is known before it starts): the recipe's serve-check and the tests run it.

        with BackgroundServer(create_app(lm)) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, start_timeout: float = 60.0):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start within {start_timeout:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastlm.serve", description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("FASTLM_API_KEY"),
                    help="required as 'Authorization: Bearer KEY' (default $FASTLM_API_KEY)")
    d = Limits()
    ap.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                    help="requests decoded together (slots of the continuous batch)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="requests waiting for a free slot before 429")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help="cap on max_tokens")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    ap.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                    help="cap on logprobs / top_logprobs alternatives per token")
    args = ap.parse_args(argv)
    for name in ("max_concurrency", "max_queue", "max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    if _IMPORT_ERROR is not None:
        print(f"fastlm.serve: needs fastapi and uvicorn ({_IMPORT_ERROR}); "
              "pip install 'fastlm[serve]'", file=sys.stderr)
        return 2
    try:
        lm = load_from_args(args)
    except (ValueError, OSError, ckpt.CheckpointError) as exc:
        print(f"fastlm.serve: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"fastlm.serve: warning: listening on {args.host} without --api-key: anyone who "
              "can reach this port can use the model", file=sys.stderr)
    if args.max_logprobs < 0:
        ap.error("--max-logprobs must be >= 0")
    limits = Limits(args.max_concurrency, args.max_queue, args.max_tokens, args.max_body_bytes,
                    max_logprobs=args.max_logprobs)
    app = create_app(lm, args.api_key, limits)
    print(f"fastlm.serve: {lm.meta.name} ({', '.join(lm.meta.notes)}) on http://{args.host}:{args.port}/",
          file=sys.stderr)
    # bounded shutdown: open responses get SHUTDOWN_S to finish, then the worker stops
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=SHUTDOWN_S)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
