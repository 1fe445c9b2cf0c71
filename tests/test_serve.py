"""`zhlm serve` over loopback: the official openai client, streaming, stop strings, usage,
the API key, bad requests, and 32 concurrent requests that each get their lone answer."""
import asyncio
import collections
import concurrent.futures
import contextlib
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from zhlm import serve
from zhlm.generate import MIN_TEMPERATURE, Sampling, generate
from zhlm.inference import TextStream, load
from zhlm.serve import MAX_BODY, Job, create_app
from zhlm.tokenizer.chat import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "test-key"
QUESTIONS = ["这个手机怎么样？", "质量很好吗", "物流太慢了", "书的内容不错", "酒店服务很差，不推荐", "价格便宜",
             "屏幕有点暗", "电池不耐用", "包装很精美", "客服态度好", "房间很干净", "味道一般"]


@pytest.fixture(scope="module")
def lm(model_dir):
    return load(model_dir)


@contextlib.contextmanager
def serving(app):
    """`app` served on a free loopback port in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def base_url(model_dir):
    """The server, with an API key."""
    with serving(create_app(model_dir, api_key=KEY, max_batch=16)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, timeout=30, max_retries=0)


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def ask(question):
    return [{"role": "user", "content": question}]


def lone_answer(lm, messages, max_tokens):
    """What generate() gives for this conversation alone, greedy: (text, token count, finish reason)."""
    ids = generate(lm.model, [encode_prompt(lm.tokenizer, messages)], Sampling(max_new_tokens=max_tokens),
                   stop_ids=lm.stop_ids)[0]
    return lm.tokenizer.decode(ids), len(ids), "length" if len(ids) == max_tokens else "stop"


def streamed(client, **kwargs):
    """(text, finish_reason, usage, chunks) of a streamed completion."""
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[0] if finish else None, chunks[-1].usage, chunks


def test_plain_and_streamed_completions_agree_with_generate(client, lm):
    messages = [{"role": "system", "content": "你是一个购物助手。"}, *ask("这个手机怎么样？")]
    text, n, reason = lone_answer(lm, messages, 20)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == text
    assert plain.choices[0].finish_reason == reason
    prompt_tokens = len(encode_prompt(lm.tokenizer, messages))
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (
        prompt_tokens, n, prompt_tokens + n)

    s_text, s_reason, s_usage, chunks = streamed(client, messages=messages, max_tokens=20, temperature=0,
                                                 stream_options={"include_usage": True})
    assert (s_text, s_reason) == (text, reason)
    assert s_usage.model_dump() == plain.usage.model_dump()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "streamed piece by piece"
    # max_completion_tokens is the newer name of max_tokens.
    newer = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=20)
    assert newer.choices[0].message.content == text


def test_the_sse_stream_is_openai_shaped(http):
    body = {"model": "tiny", "messages": ask("价格便宜"), "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert "usage" not in chunks[-1], "usage only when stream_options.include_usage"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_answer_before_them(client, lm, stream):
    text, _, _ = lone_answer(lm, ask("包装很精美"), 24)
    # A stop string from inside the answer, a few characters long, so it spans tokens.
    start = next(i for i in range(3, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    expected = text[:text.index(stop)]
    for stops in (stop, ["这不会出现", stop]):
        kwargs = dict(messages=ask("包装很精美"), max_tokens=24, stop=stops)
        if stream:
            got, reason, _, _ = streamed(client, **kwargs)
        else:
            r = client.chat.completions.create(model="tiny", **kwargs)
            got, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert (got, reason) == (expected, "stop")


def test_a_seed_makes_sampling_reproducible(client):
    kwargs = dict(model="tiny", messages=ask("味道一般"), max_tokens=12, temperature=1.0, top_p=0.9)
    a, b, c = (client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != c


def test_models_and_health(client, base_url, lm):
    models = client.models.list()
    assert [m.id for m in models.data] == [lm.name]
    assert client.models.retrieve(lm.name).id == lm.name
    health = httpx.get(f"{base_url}/health", timeout=10)  # open without the key, for probes
    assert health.status_code == 200 and health.json()["status"] == "ok"


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_requests_without_the_right_key_get_401(base_url):
    body = {"model": "tiny", "messages": ask("你好")}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_openai_error(httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=10),
                            401)
        assert_openai_error(httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10), 401)
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", timeout=10, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=ask("你好"))


BAD = [  # (body, status, param)
    ({"messages": [{"role": "robot", "content": "你好"}]}, 400, "messages.[0].role"),
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": "你好"}, 400, "messages"),
    ({"messages": [{"role": "user"}]}, 400, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "你好"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "你好"}], "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "你好"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "你好"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "你好"}], "stop": ["", "x"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "很长的评论" * 100}]}, 400, "messages"),
    ([1, 2], 400, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, client):
    for body, status, param in BAD:
        error = assert_openai_error(http.post("/v1/chat/completions", json=body), status)
        assert error["param"] == param, (body, error)
    too_long = http.post("/v1/chat/completions", json=BAD[-2][0]).json()["error"]
    assert too_long["code"] == "context_length_exceeded"
    for raw in (b'{"messages": [', b"\xff\xfe not json", b""):
        assert_openai_error(http.post("/v1/chat/completions", content=raw,
                                      headers={"Content-Type": "application/json"}), 400)
    huge = json.dumps({"messages": ask("好" * MAX_BODY)}).encode()
    assert_openai_error(http.post("/v1/chat/completions", content=huge), 413)

    def chunked():  # no Content-Length: the server must count as it reads
        for i in range(0, len(huge), 65536):
            yield huge[i:i + 65536]
    assert_openai_error(http.post("/v1/chat/completions", content=chunked()), 413)
    assert_openai_error(http.get("/v1/nowhere"), 404)
    assert_openai_error(http.get("/v1/models/other"), 404)

    ok = client.chat.completions.create(model="tiny", messages=ask("你好"), max_tokens=4)
    assert ok.choices[0].finish_reason in ("length", "stop")


# --- fuzz: hundreds of malformed requests, none of which may get a 5xx ---------------------

NAN, INF = float("nan"), float("inf")
WRONG = [None, True, False, 0, -1, 1.5, 1e-300, 10 ** 30, -10 ** 30, "x", "", [], ["x"], {}, {"a": 1},
         NAN, INF, -INF, "\ud800"]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "repetition_penalty",
          "seed", "n", "stop", "stream", "stream_options", "user"]
NUMBERS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "repetition_penalty", "seed", "n"]
LONE_SURROGATES = ["\ud800", "\udfff", "a\udc00b", "好\ud83d"]
TEXT_PLACES = [  # where a text goes in a request, and the param that names it
    ("messages.[0].content", lambda s: {"messages": ask(s)}),
    ("messages.[0].content", lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]}),
    ("messages.[0].role", lambda s: {"messages": [{"role": s, "content": "你好"}]}),
    ("stop", lambda s: {"stop": s}),
    ("stop", lambda s: {"stop": ["x", s]}),
]
MARK = "@@"  # stands in the JSON for raw text that json.dumps cannot write


def request(body: dict) -> dict:
    """A valid request with `body`'s fields over it: one short answer."""
    return {"model": "tiny", "messages": ask("你好"), "max_tokens": 1, **body}


def encoded(body, *, raw_surrogates=False, mark: bytes = b"") -> bytes:
    """JSON bytes of `body`: NaN and Infinity as JavaScript's literals, lone surrogates as
    "\\ud800" escapes or (raw_surrogates) as the bytes UTF-8 forbids, and MARK replaced by `mark`."""
    if raw_surrogates:
        text = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    else:
        text = json.dumps(body).encode()
    return text.replace(json.dumps(MARK).encode(), mark)


def nested(depth: int, kind: str = "[") -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth if kind == "{" else b"[" * depth + b"]" * depth


def malformed_requests(seed: int = 11):
    """(what, body bytes, headers, expected (status, param)): None expects any status below 500,
    a param of ... any param."""
    rng = random.Random(seed)
    cases = []

    def add(what, body, expect=None, headers=None):
        cases.append((what, body, headers or {"Content-Type": "application/json"}, expect))

    # A wrong value in every field, in every message field, in every content part.
    for field in FIELDS:
        for value in WRONG:
            add(f"{field}={value!r}", encoded(request({field: value})))
    for key in ("role", "content"):
        for value in WRONG:
            message = {"role": "user", "content": "你好", key: value}
            add(f"message {key}={value!r}", encoded(request({"messages": [message]})))
    for value in WRONG:
        add(f"message={value!r}", encoded(request({"messages": [value]})))
        add(f"part={value!r}", encoded(request({"messages": [{"role": "user", "content": [value]}]})))
        add(f"part text={value!r}", encoded(request({"messages": [{"role": "user", "content": [
            {"type": "text", "text": value}]}]})))
        add(f"stream_options.include_usage={value!r}", encoded(request({"stream_options": {"include_usage": value}})))
    # Numbers JSON cannot hold, as the literals Python's json writes and reads.
    for field in NUMBERS:
        for value in (NAN, INF, -INF):
            add(f"{field}={value}", encoded(request({field: value})), (400, field))
        add(f"{field}=1e999", encoded(request({field: MARK}), mark=b"1e999"), (400, field))
    # Lone surrogates, as JSON escapes (named by their param) and as raw bytes (not UTF-8).
    for param, place in TEXT_PLACES:
        for s in LONE_SURROGATES:
            add(f"{param} has {s!r}", encoded(request(place(s))), (400, param))
            add(f"{param} has {s!r} raw", encoded(request(place(s)), raw_surrogates=True), (400, None))
    for bad in (b"\xff", b"\x80", b"\xc0\xaf", b"\xe4\xb8", b"\xf4\x90\x80\x80", b"\xed\xbf\xbf"):
        add(f"content bytes {bad!r}", encoded(request({"messages": ask(MARK)}), mark=b'"' + bad + b'"'), (400, None))
    # Deep nesting anywhere, and brackets in strings, which are no nesting.
    for where in ("body", "messages", "message", "content", "stop", "user", "stream_options", "temperature"):
        for depth, kind in ((100_000, "["), (100_000, "{"), (serve.MAX_DEPTH + 1, "[")):
            deep = nested(depth, kind)
            body = deep if where == "body" else encoded(request(
                {"messages": [MARK]} if where == "message" else {"messages": ask(MARK)} if where == "content"
                else {where: MARK}), mark=deep)
            add(f"{kind} {depth} deep in {where}", body, (400, None))
    add("unclosed 100000 deep", b'{"messages": ' + b"[" * 100_000, (400, None))
    deepest = nested(serve.MAX_DEPTH - 1)  # in the body's object
    add(f"{serve.MAX_DEPTH} deep in an ignored key", encoded(request({"user": MARK}), mark=deepest), (200, None))
    brackets = {"user": '"[{' * 50_000, "stop": "]" * serve.MAX_STOP_CHARS}
    add("brackets in strings", encoded(request(brackets)), (200, None))
    # Sizes.
    for what, body, param in [
        ("long content", {"messages": ask("a" * (serve.MAX_CONTENT + 1))}, "messages.[0].content"),
        ("many parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] *
                                      (serve.MAX_PARTS + 1)}]}, "messages.[0].content"),
        ("many messages", {"messages": ask("a") * (serve.MAX_MESSAGES + 1)}, "messages"),
        ("many stops", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("long stop", {"stop": "a" * (serve.MAX_STOP_CHARS + 1)}, "stop"),
        ("huge max_tokens", {"max_tokens": 1 << 62}, "max_tokens"),
        ("huge seed", {"seed": 1 << 64}, "seed"),
        ("huge n", {"n": 10 ** 100}, "n"),
        ("empty messages", {"messages": []}, "messages"),
    ]:
        add(what, encoded(request(body)), (400, param))
    add("4400-digit number", encoded(request({"seed": MARK}), mark=b"9" * 4400), (400, None))
    add("long ignored array", encoded(request({"user": [1] * 200_000})), (200, None))
    add("over MAX_BODY", encoded(request({"user": "a" * MAX_BODY})), (413, None))
    # Not JSON, or not an object.
    for body in (b"", b" ", b"null", b"true", b"1", b'"x"', b"[]", b"{}", b"NaN", b"messages=hi", b"<x/>",
                 b'{"messages": [}', b"\xef\xbb\xbf", b"\x00" * 8, "好".encode("utf-16")):
        add(f"body {body[:20]!r}", body, (400, ...))  # any param: b"{}" lacks messages
    for i in range(20):
        add(f"random bytes {i}", rng.randbytes(rng.randrange(1, 200)))
    # A valid body cut short, and mutated byte by byte.
    valid = encoded(request({"messages": [{"role": "system", "content": "你是助手。"}, *ask("价格便宜")],
                             "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["。"], "stream": False}))
    for cut in sorted(rng.sample(range(len(valid)), 40)):
        add(f"cut at {cut}", valid[:cut], (400, None))
    for i in range(200):
        body = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(body))
            new = bytes([rng.choice(b'{}[]",:\\0-eE.9aNIu \xff\xed')])
            op = rng.randrange(3)
            body[at:at + (op != 1)] = b"" if op == 0 else new
        add(f"mutation {i}", bytes(body))
    # Content types that do not say JSON: the body is read as JSON all the same.
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "application/octet-stream"):
        add(f"JSON as {kind}", encoded(request({})), (200, None), {"Content-Type": kind})
        add(f"form as {kind}", b"model=tiny&messages=hi", (400, None), {"Content-Type": kind})
    add("no content type", encoded(request({})), (200, None), {})
    return cases


def test_malformed_requests_get_4xx_never_5xx_and_the_server_keeps_serving(http, client, lm):
    cases = malformed_requests()
    assert len(cases) > 500
    statuses = collections.Counter()
    for what, body, headers, expect in cases:
        r = http.post("/v1/chat/completions", content=body, headers=headers)
        statuses[r.status_code] += 1
        assert r.status_code < 500, (what, r.text)
        if r.status_code >= 400:
            error = assert_openai_error(r, r.status_code)
            assert len(error["message"]) < 300, (what, "an error echoes at most a little of the request")
        if expect is not None:
            status, param = expect
            assert r.status_code == status, (what, r.text)
            if status == 400 and param is not ...:
                assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
    assert statuses[400] > 400 and statuses[200] > 20, statuses  # both sides of the line were tried
    for method, path, status in [("PUT", "/v1/chat/completions", 405), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("GET", "/v1/models/%ED%A0%80", 404),
                                 ("GET", "/v1/models/%FF", 404), ("GET", "/v1/%00", 404)]:
        assert_openai_error(http.request(method, path), status)

    assert http.get("/health").json()["status"] == "ok"
    text, _, _ = lone_answer(lm, ask("你好"), 6)
    assert client.chat.completions.create(model="tiny", messages=ask("你好"), max_tokens=6).choices[0].message.content \
        == text


def test_a_temperature_too_small_to_divide_by_decodes_greedily(client, lm):
    text, _, _ = lone_answer(lm, ask("屏幕有点暗"), 8)
    for temperature in (1e-300, 1e-9, MIN_TEMPERATURE / 2):
        r = client.chat.completions.create(model="tiny", messages=ask("屏幕有点暗"), max_tokens=8,
                                           temperature=temperature, seed=1)
        assert r.choices[0].message.content == text


def status_with_authorization(base_url, value: bytes) -> int:
    """GET /v1/models with this Authorization header, sent as written (httpx refuses some)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + value + b"\r\n\r\n")
        return int(s.makefile("rb").readline().split()[1])


# The scheme is case-insensitive and whitespace around the header's value is no part of it;
# the key compares exactly.
@pytest.mark.parametrize("value", [b"Bearer test-key", b"bearer test-key", b"BEARER test-key", b"Bearer test-key  ",
                                   b"Bearer test-key\t", b"  Bearer test-key", b"Bearer  test-key"])
def test_the_auth_scheme_is_case_insensitive_and_whitespace_around_the_header_is_stripped(base_url, value):
    assert status_with_authorization(base_url, value) == 200


@pytest.mark.parametrize("value", [b"Bearer TEST-KEY", b"Bearer test-key x", b"Bearer test-keyx", b"Bearer test",
                                   b"Bearer test key", b"Basic test-key", b"Bearer", b"test-key", b"Bearer\ttest-key",
                                   b"Bearer test-key\x01", b"Bearer test-key\xff"])
def test_the_key_itself_must_match_exactly(base_url, value):
    assert status_with_authorization(base_url, value) == 401


@pytest.mark.parametrize("key", ["key ", " key", "my key", "ключ", "key\n"])
def test_a_key_no_client_could_send_is_refused_at_start(tmp_path, key):
    with pytest.raises(ValueError, match="visible ASCII"):
        create_app(tmp_path, api_key=key)


def test_a_client_leaving_mid_stream_does_not_disturb_the_next(http, client, lm):
    body = {"messages": ask("房间很干净"), "max_tokens": 100, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        next(r.iter_lines())  # read one event, then hang up
    text, _, _ = lone_answer(lm, ask("客服态度好"), 10)
    r = client.chat.completions.create(model="tiny", messages=ask("客服态度好"), max_tokens=10)
    assert r.choices[0].message.content == text


def test_32_concurrent_requests_each_get_their_lone_answer(client, lm):
    jobs = [(ask(QUESTIONS[i % len(QUESTIONS)] + "！" * (i // len(QUESTIONS))), 8 + i % 9, i % 3 == 0)
            for i in range(32)]
    expected = [lone_answer(lm, messages, max_tokens)[0] for messages, max_tokens, _ in jobs]
    assert len(set(expected)) > 16, "the prompts must give different answers for this test to mean anything"

    def one(job):
        messages, max_tokens, stream = job
        if stream:
            return streamed(client, messages=messages, max_tokens=max_tokens)[0]
        return client.chat.completions.create(model="tiny", messages=messages,
                                              max_tokens=max_tokens).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, jobs, timeout=60))
    assert answers == expected


def test_requests_without_max_tokens_are_not_cut_short_by_a_longer_prompt_in_their_batch(client, lm):
    # Without max_tokens an answer may run to the end of the context; in a batch behind a
    # longer prompt it would end sooner, so such requests must not share that batch.
    questions = ["好", "这个手机怎么样？", "酒店服务很差，不推荐，房间也不干净", "价格便宜"]
    expected = []
    for q in questions:
        text, _, reason = lone_answer(lm, ask(q), lm.context - len(encode_prompt(lm.tokenizer, ask(q))))
        expected.append((text, reason))
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: client.chat.completions.create(model="tiny", messages=ask(q)),
                                questions, timeout=60))
    assert [(r.choices[0].message.content, r.choices[0].finish_reason) for r in replies] == expected


def test_a_possible_stop_string_is_held_back_until_it_cannot_be_one(lm):
    loop = asyncio.new_event_loop()
    ids = lm.tokenizer.encode("质量不错，不").ids
    job = Job([1], len(ids), Sampling(), None, ["不错呀", "不好"], loop)
    job.text = TextStream(lm.tokenizer)
    sent = []
    for token in ids:
        job.push(token, lm.stop_ids)
        loop.run_until_complete(asyncio.sleep(0))  # deliver what the worker posted
        while not job.events.empty():
            sent.append(job.events.get_nowait())
    loop.close()
    texts = [e[1] for e in sent if e[0] == "text"]
    assert "".join(texts) == "质量不错，不" and sent[-1] == ("done", "length", len(ids))
    assert "".join(texts[:-1]) == "质量不错，", "the final 不 waits: it may start 不好"
