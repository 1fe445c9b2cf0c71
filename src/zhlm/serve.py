"""`zhlm serve`: the OpenAI chat completions API over a model folder (FastAPI + uvicorn).

One worker thread owns the model. Requests wait in a queue; each round the
worker takes the waiting requests that can share a batch (same sampling
settings, and the longest prompt leaves every row its full answer length),
decodes them as one left-padded batch until all of them are done, and sends
each row's text to its request through that request's asyncio queue
(`loop.call_soon_threadsafe`). A left-padded row gets the same tokens as it
would alone, so batching never changes a greedy answer, and rows never mix.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import importlib.resources
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhlm.generate import MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MIN_REPETITION_PENALTY, Sampling, stream
from zhlm.inference import LoadedModel, TextStream, load
from zhlm.retrieval import Retriever, open_retriever, passage_ids
from zhlm.tokenizer.chat import ROLES, encode_prompt

log = logging.getLogger("zhlm.serve")

class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, type=self.type)


def error_response(status: int, message: str, *, param=None, code=None, type="invalid_request_error"):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --- the worker ---------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One request's generation. The worker fills it; the request reads `events`.

    Events: ("text", str), then ("done", finish_reason, completion_tokens) or ("error", message).
    """
    prompt: list[int]
    max_tokens: int  # already within the context
    sampling: Sampling
    seed: int | None
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request when its client went away
    done: bool = False
    completion_tokens: int = 0
    text: TextStream | None = None
    held: str = ""  # text not sent yet: it may be the start of a stop string

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def batch_key(self) -> tuple:
        """Jobs with the same key can be decoded in one batch."""
        s = self.sampling
        # A seeded sampled job runs alone: its own generator makes the seed reproducible.
        alone = id(self) if self.seed is not None and s.temperature > 0 else None
        if s.repetition_penalty != 1.0:
            # generate.stream counts a row's left padding as seen tokens, so a penalised
            # row is only batched with prompts of its own length (no padding).
            return ("penalty", s.temperature, s.top_p, s.repetition_penalty, len(self.prompt), alone)
        if s.temperature <= 0:
            return ("greedy",)
        return ("sample", s.temperature, s.top_p, alone)

    def finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            self.held += self.text.flush()
            if self.held:
                self.post("text", self.held)
        self.done = True
        self.post("done", reason, self.completion_tokens)

    def push(self, token: int, stop_ids: list[int]) -> None:
        """Take the row's next token: send new text, hold back a possible stop string, finish."""
        if self.cancelled:
            self.done = True
            return
        if token in stop_ids:
            self.finish("stop")
            return
        self.completion_tokens += 1
        self.held += self.text.push(token)
        cut = min((at for stop in self.stops if (at := self.held.find(stop)) >= 0), default=-1)
        if cut >= 0:  # the answer ends before the stop string
            if cut:
                self.post("text", self.held[:cut])
            self.finish("stop", flush=False)
            return
        # Keep back the longest tail that could still grow into a stop string.
        keep = max((k for stop in self.stops for k in range(1, len(stop))
                    if self.held.endswith(stop[:k])), default=0)
        send, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        if send:
            self.post("text", send)
        if self.completion_tokens >= self.max_tokens:
            self.finish("length")


class Engine:
    """The worker thread that owns the model, and the queue of jobs waiting for it."""

    def __init__(self, lm: LoadedModel, max_batch: int = 16):
        self.lm, self.max_batch = lm, max_batch
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="zhlm-model", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.closed

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", type="server_error")
            self.waiting.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=10)
        for job in self.waiting:
            job.post("error", "the server is shutting down")
        self.waiting.clear()

    def _take_batch(self) -> list[Job] | None:
        """The oldest waiting job and, in queue order, the waiting jobs that can join it."""
        with self.cond:
            while True:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                if self.closed:
                    return None
                if self.waiting:
                    break
                self.cond.wait()
            batch = [self.waiting.popleft()]
            key, longest = batch[0].batch_key(), len(batch[0].prompt)
            for job in list(self.waiting):
                if len(batch) == self.max_batch:
                    break
                p = max(longest, len(job.prompt))
                # Every row needs its full answer length after the longest prompt, else
                # a short prompt would be cut sooner in the batch than alone.
                if not job.cancelled and job.batch_key() == key and \
                        all(p + j.max_tokens <= self.lm.context for j in (*batch, job)):
                    batch.append(job)
                    longest = p
                    self.waiting.remove(job)
            return batch

    def _work(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._decode(batch)
            except Exception as e:  # a failed batch must not take the worker down
                log.exception("generation failed")
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.post("error", f"generation failed: {e}")

    def _decode(self, batch: list[Job]) -> None:
        for job in batch:
            job.text = TextStream(self.lm.tokenizer)
        first = batch[0]
        sampling = replace(first.sampling, max_new_tokens=max(job.max_tokens for job in batch))
        generator = None
        if first.seed is not None and first.sampling.temperature > 0:
            generator = torch.Generator(device=self.lm.device).manual_seed(first.seed)
        steps = stream(self.lm.model, [job.prompt for job in batch], sampling, stop_ids=self.lm.stop_ids,
                       generator=generator)
        try:
            for tokens in steps:
                for job, token in zip(batch, tokens.tolist()):
                    if not job.done:
                        job.push(token, self.lm.stop_ids)
                if all(job.done for job in batch) or self.closed:
                    break
        finally:
            steps.close()
        for job in batch:
            if not job.done:
                if self.closed:
                    job.done = True
                    job.post("error", "the server is shutting down")
                else:
                    job.finish("length")  # the context window ran out


# --- requests -----------------------------------------------------------------------------
#
# Every value a client controls is checked here, once, into a ChatRequest; anything wrong is a
# 400 naming the parameter. Each limit is far above what a sensible chat request needs and
# bounds the work done before a request is refused. Keys this server does not read (OpenAI's
# `user`, `logprobs`, ...) are ignored, as OpenAI-compatible clients send some by default.

MAX_BODY = 1 << 20  # bytes; the body is held in memory
MAX_DEPTH = 64  # nested arrays and objects; json.loads recurses once per level
MAX_MESSAGES = 256
MAX_PARTS = 64  # content parts of one message
MAX_CONTENT = 32_768  # characters of one message, far beyond any zhlm model's context
MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 128  # each stop string is matched against the answer's tail at every token


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int | None
    sampling: Sampling
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool


def _show(value) -> str:
    """A client's value for an error message, cut short: the message must stay small."""
    text = repr(value)  # repr escapes lone surrogates, which the JSON response could not encode
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
    # Written so that NaN, which compares false with everything, and ±Infinity fall outside.
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}; got {_show(value)}",
                       param=name)
    return value if integer else float(value)


def _flag(body: dict, name: str, param: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{param}' must be true or false; got {_show(value)}", param=param)
    return bool(value)


def _text(value, param: str, max_chars: int) -> str:
    """A non-empty string of at most max_chars Unicode scalar values.

    JSON's escape "\\ud800" gives a lone surrogate, which is no character: the tokenizer
    (and UTF-8) cannot take it.
    """
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{param}' must be a non-empty string", param=param)
    if len(value) > max_chars:
        raise ApiError(400, f"'{param}' is {len(value)} characters; at most {max_chars} are allowed", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{param}' has a lone surrogate at character {e.start}: not a Unicode character",
                       param=param) from None
    return value


def _content(message: dict, param: str) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text parts can be read
        if len(content) > MAX_PARTS:
            raise ApiError(400, f"'{param}' has {len(content)} parts; at most {MAX_PARTS} are allowed", param=param)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"'{param}': only text parts are supported", param=param)
        content = "".join(p["text"] for p in content)
    return _text(content, param, MAX_CONTENT)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has {len(messages)} messages; at most {MAX_MESSAGES} are allowed",
                       param="messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages.[{i}]' must be an object", param=f"messages.[{i}]")
        role = m.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for system
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"'messages.[{i}].role' {_show(m.get('role'))} is not one of {', '.join(ROLES)}",
                           param=f"messages.[{i}].role")
        parsed.append({"role": role, "content": _content(m, f"messages.[{i}].content")})
    return parsed


def _stops(body: dict) -> list[str]:
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                       param="stop")
    return [_text(stop, "stop", MAX_STOP_CHARS) for stop in stops]


def parse_request(body, lm: LoadedModel) -> ChatRequest:
    """Check a chat completions body; anything wrong is an ApiError naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", param="model")  # any name: the server has one model
    messages = _messages(body)
    n = _number(body, "n", 1, 1, 1 << 30, integer=True)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, lm.context, integer=True)
    d = lm.defaults
    sampling = Sampling(
        temperature=_number(body, "temperature", d.temperature, 0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", d.top_p, 0, 1, lo_open=True),
        repetition_penalty=_number(body, "repetition_penalty", d.repetition_penalty, MIN_REPETITION_PENALTY,
                                   MAX_REPETITION_PENALTY),
    )
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    streaming = _flag(body, "stream", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = _flag(options or {}, "include_usage", "stream_options.include_usage")
    return ChatRequest(messages, max_tokens, sampling, seed, _stops(body), streaming, include_usage)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # no nested quantifiers: linear time
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text, in one pass without recursion.

    Strings are cut out first, since a bracket inside one is text. Exact for valid JSON,
    and for invalid JSON up to its first error, which is as far as json.loads reads.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(raw: bytes):
    """The JSON value of a request body: UTF-8 (RFC 8259), nesting at most MAX_DEPTH deep."""
    try:
        # Strict, unlike json.loads on bytes, which lets encoded surrogates (ED A0 80) through.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    if (depth := nesting_depth(text)) > MAX_DEPTH:
        raise ApiError(400, f"the request body nests {depth} arrays and objects deep; at most {MAX_DEPTH} "
                            "are allowed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: cannot happen after the depth check
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def read_json_body(request: Request):
    """The JSON body, refusing more than MAX_BODY bytes before reading them all.

    The Content-Type is not checked: the body is read as JSON whatever it says, so that
    `curl -d` without a Content-Type header works.
    """
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length up front
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", code="request_too_large")
    return parse_json(bytes(body))


class RequireKey:
    """ASGI middleware: 401 for a request without 'Authorization: Bearer KEY'.

    As HTTP says: the scheme is case-insensitive (RFC 7235, so `bearer KEY` is accepted),
    and whitespace around the header's value is no part of it (RFC 9110, so a trailing space
    is accepted); the key itself must match exactly, compared in constant time.
    /health stays open, so that a load balancer can probe without the key, and so does the
    chat page at /, which holds no secret: it asks its user for the key.
    """

    OPEN = ("/", "/health")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            value = dict(scope["headers"]).get(b"authorization", b"").strip(b" \t")
            scheme, _, given = value.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.lstrip(b" "), self.key):
                response = error_response(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def check_api_key(key: str) -> None:
    """A key a client can send: visible ASCII, since HTTP strips the whitespace around a header."""
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ValueError("the API key must be visible ASCII characters, without spaces")


# The chat page: one file shipped in the package (package data). Its policy lets it run its own
# inline script and style and talk to this server only, so it works offline and loads nothing else.
CHAT_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                    "connect-src 'self'; img-src data:; frame-ancestors 'none'")


def chat_page() -> str:
    return (importlib.resources.files("zhlm") / "static" / "chat.html").read_text(encoding="utf-8")


# --- the app ------------------------------------------------------------------------------

def create_app(model_dir, *, api_key: str | None = None, device: str = "cpu", max_batch: int = 16,
               retriever: Retriever | None = None) -> FastAPI:
    """The API over the model in `model_dir`, and the chat page at /. The model worker starts now
    and stops with the app.

    With a retriever (--docs), the best passages for a request's last user message join its
    system message, as many as leave the answer its room, and the response names them:
    "zhlm_passages": [{"id", "score"}] on the completion, or on a stream's first chunk.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if api_key:
        check_api_key(api_key)
    lm = load(model_dir, device)
    page = chat_page()
    engine = Engine(lm, max_batch=max_batch)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="zhlm", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code=str(e.status_code))

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return error_response(500, "internal server error", type="server_error")

    @app.get("/", include_in_schema=False)
    async def chat():
        return HTMLResponse(page, headers={"Content-Security-Policy": CHAT_PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if not engine.alive():
            return error_response(503, "the model worker is not running", type="server_error")
        return {"status": "ok", "model": lm.name, "waiting": len(engine.waiting)}

    def model_card():
        return {"id": lm.name, "object": "model", "created": created, "owned_by": "zhlm",
                "max_model_len": lm.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != lm.name:
            raise ApiError(404, f"model {model_id!r} not found; this server has {lm.name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_json_body(request), lm)
        messages, extra = req.messages, {}
        if retriever is not None:
            # The answer's room: what the client asked for, else as much as chat leaves it.
            room = req.max_tokens or min(lm.defaults.max_new_tokens, lm.context // 2)
            messages, hits = await asyncio.to_thread(retriever.augment, messages, lm.tokenizer, lm.context, room)
            extra = {"zhlm_passages": passage_ids(hits)}
        prompt = encode_prompt(lm.tokenizer, messages)
        if len(prompt) >= lm.context:
            raise ApiError(400, f"the messages are {len(prompt)} tokens; this model's context holds "
                                f"{lm.context}, answer included", param="messages", code="context_length_exceeded")
        room = lm.context - len(prompt)
        job = Job(prompt, min(req.max_tokens or room, room), req.sampling, req.seed, req.stops,
                  asyncio.get_running_loop())
        engine.submit(job)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": lm.name,
                 "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(sse(job, reply, req.include_usage, extra), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = []
        try:
            while (event := await job.events.get())[0] == "text":
                text.append(event[1])
        finally:
            job.cancelled = True  # nothing more is read: stop generating (a no-op once done)
        if event[0] == "error":
            raise ApiError(500, event[1], type="server_error")
        return {**reply, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": event[1]}],
                "usage": usage(len(prompt), event[2]), **extra}

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    # completion_tokens counts the answer's tokens, not the end-of-turn token.
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def sse(job: Job, reply: dict, include_usage: bool, first: dict | None = None):
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with [DONE]; `first`
    holds extra keys of the first chunk (zhlm_passages)."""
    def chunk(delta: dict, finish_reason=None, extra: dict | None = None) -> str:
        body = {**reply, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        body |= extra or {}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""}, extra=first)
        while (event := await job.events.get())[0] == "text":
            yield chunk({"content": event[1]})
        if event[0] == "error":
            error = {"message": event[1], "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
            return
        yield chunk({}, event[1])
        if include_usage:
            body = {**reply, "object": "chat.completion.chunk", "choices": [],
                    "usage": usage(len(job.prompt), event[2])}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # the client left (or all is sent): stop generating for it


def run(args) -> int:
    """`zhlm serve`: load the model and serve until Ctrl-C."""
    import uvicorn

    try:
        retriever = open_retriever(args.docs, args.docs_top_k, args.docs_chars) if args.docs else None
        app = create_app(args.model_dir, api_key=args.api_key or None, device=args.device, max_batch=args.max_batch,
                         retriever=retriever)
    except (FileNotFoundError, ValueError) as e:
        print(f"zhlm serve: {e}")
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"zhlm serve: {app.state.engine.lm.name} on {app.state.engine.lm.device}, "
          f"OpenAI API at {url}/v1, chat page at {url}/", flush=True)
    if retriever:
        print(f"zhlm serve: {len(retriever.index.passages)} passages of {args.docs} "
              f"({'indexed now' if retriever.index.built else 'index read from its cache'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("ZHLM_LOG_LEVEL", "info"))
    return 0
