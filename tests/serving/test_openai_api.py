"""`glmkit serve` as a real process on a loopback port: the official `openai` client (plain and streamed), the
legacy ChatGLM-6B route over raw HTTP, bad inputs (each a 4xx JSON error, the server still healthy after), 16
concurrent greedy clients that each get what they get alone, API keys, and graceful shutdown."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.processes import Server

openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency (pip install openai)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # ChatGLM-6B's family: the one the legacy POST / route was written for
    return build_tiny_chat_model(tmp_path_factory.mktemp("serve") / "tiny-chat", "chatglm")


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process, for what each request gets alone through the library."""
    from glmkit import load_model, load_tokenizer

    return load_model(model_dir), load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir)
    yield srv
    code = srv.stop()
    assert code == 0, f"glmkit serve did not shut down cleanly ({code}):\n{srv.output()}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def ask(client, content: str, **kwargs):
    return client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": content}], **kwargs)


def test_parse_messages():
    from glmkit.serving.protocol import APIError, parse_messages

    system, history, query = parse_messages([
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]}, {"role": "user", "content": "c"},
        {"role": "user", "content": "d"}])
    assert (system, history, query) == ("be brief", [("a", "b")], "c\nd")
    for bad in ([], [{"role": "user"}], [{"role": "tool", "content": "x"}], [{"role": "user", "content": "x"},
                                                                            {"role": "assistant", "content": "y"}]):
        with pytest.raises(APIError) as err:
            parse_messages(bad)
        assert err.value.status == 400


@pytest.mark.slow
def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-chat"


def test_openapi_document_describes_the_request_bodies(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/", "LegacyChatRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"]
    assert {"messages", "temperature", "max_tokens", "tools", "stream"} <= set(chat["properties"])
    assert chat["properties"]["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}
    assert schemas["LegacyChatRequest"]["required"] == ["prompt"]
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(doc))
    assert refs and all(name in schemas for name in refs)


@pytest.mark.slow
def test_plain_matches_library_and_stream_matches_plain(client, local):
    from glmkit.core.chat import build_chat_input

    model, tok = local
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat runs"},
                {"role": "user", "content": "and the dog?"}]
    plain = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=24)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length")
    # ChatGLM-6B has no system role: the system text leads the query
    query = "You are terse.\nand the dog?"
    prompt = build_chat_input(tok, query, [("hello", "the cat runs")])
    assert plain.usage.prompt_tokens == len(prompt)
    assert 0 < plain.usage.completion_tokens <= 24
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    # the library alone, greedy, with the same room: the same answer
    alone, _ = model.chat(tok, query, history=[("hello", "the cat runs")], do_sample=False,
                          max_length=len(prompt) + 24)
    assert text == alone

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.slow
def test_raw_sse_format(server):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


@pytest.mark.slow
def test_client_that_leaves_frees_its_row(server):
    body = {"messages": [{"role": "user", "content": "cat"}], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5  # 400 tokens would take far longer than this
    while httpx.get(server.url + "/health").json()["decoding"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["decoding"] == 0


@pytest.mark.slow
def test_max_tokens_stop_and_seed(client):
    full = ask(client, "the river", temperature=0, max_tokens=12)
    assert full.choices[0].finish_reason == "length" or full.usage.completion_tokens < 12
    one = ask(client, "the river", temperature=0, max_tokens=1)
    assert one.usage.completion_tokens <= 1 and full.choices[0].message.content.startswith(
        one.choices[0].message.content)

    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = ask(client, "the river", temperature=0, max_tokens=12, stop=[stop, "never-there"])
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in ask(
            client, "the river", temperature=0, max_tokens=12, stop=stop, stream=True))
        assert streamed == text[: text.find(stop)]

    a = ask(client, "the river", temperature=1.0, top_p=1.0, seed=1234, max_tokens=16).choices[0].message.content
    b = ask(client, "the river", temperature=1.0, top_p=1.0, seed=1234, max_tokens=16).choices[0].message.content
    assert a == b


@pytest.mark.slow
def test_legacy_route(server, local):
    model, tok = local
    r = httpx.post(server.url + "/", json={"prompt": "你好", "history": [], "max_length": 40, "top_p": 0.7,
                                           "temperature": 0}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert body["history"] == [["你好", body["response"]]]
    assert body["response"] == model.chat(tok, "你好", history=[], max_length=40, do_sample=False)[0]

    # a second round with that history, and api.py's defaults when fields are missing
    r2 = httpx.post(server.url + "/", json={"prompt": "hello", "history": body["history"], "max_length": 60,
                                            "top_p": None}, timeout=60)
    assert r2.status_code == 200
    assert r2.json()["history"][:1] == body["history"] and r2.json()["history"][1][0] == "hello"


BAD_REQUESTS = [
    # (name, path, raw body, expected status, expected error code)
    ("invalid json", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_type"),
    ("no messages", "/v1/chat/completions", b'{"model": "x"}', 400, "invalid_type"),
    ("empty messages", "/v1/chat/completions", b'{"messages": []}', 400, "invalid_value"),
    ("unknown role", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400,
     "invalid_role"),
    ("content type", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "invalid_type"),
    ("last not user", "/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400,
     "invalid_value"),
    ("temperature type", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "invalid_type"),
    ("temperature range", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 7}', 400, "invalid_value"),
    ("top_p range", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -1}', 400,
     "invalid_value"),
    ("stream type", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
     400, "invalid_type"),
    ("negative max_tokens", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400, "invalid_value"),
    ("zero max_tokens", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "invalid_value"),
    ("huge max_tokens", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000}', 400, "context_length_exceeded"),
    ("float max_tokens", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}', 400, "invalid_type"),
    ("stop type", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": 3}', 400,
     "invalid_type"),
    ("n too large", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 300}', 400,
     "invalid_value"),
    ("over-long prompt", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "hello world " * 2000}]}).encode(), 400,
     "context_length_exceeded"),
    ("body too large", "/v1/chat/completions", b'{"pad": "' + b"x" * (2 << 20) + b'"}', 413, "request_too_large"),
    ("legacy invalid json", "/", b"prompt=hi", 400, "invalid_json"),
    ("legacy prompt type", "/", b'{"prompt": 42}', 400, "invalid_type"),
    ("legacy history type", "/", b'{"prompt": "hi", "history": "none"}', 400, "invalid_type"),
    ("legacy history pair", "/", b'{"prompt": "hi", "history": [["only one"]]}', 400, "invalid_type"),
    ("legacy negative max_length", "/", b'{"prompt": "hi", "max_length": -3}', 400, "invalid_value"),
    ("legacy over-long prompt", "/", json.dumps({"prompt": "hello world " * 2000}).encode(), 400,
     "context_length_exceeded"),
    ("seed range", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "seed": -1}', 400,
     "invalid_value"),
    ("deeply nested json", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("not utf-8", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, "invalid_json"),
    ("unknown route", "/v2/nothing", b"{}", 404, "not_found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,path,raw,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_json_4xx(server, name, path, raw, status, code):
    r = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.slow
def test_wrong_method_gets_json_405(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.slow
def test_still_serving_after_bad_inputs(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x"}])
    assert "role" in str(err.value)
    assert ask(client, "hello", temperature=0, max_tokens=4).choices[0].message.role == "assistant"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_16_concurrent_greedy_clients_each_get_their_own_answer(server, client):
    firsts = "the a cat dog model answer hello world river stone light 你好 世界 模型 回答 问题".split()
    seconds = "runs fast slow question 今天 天气 很好 我们".split() * 2
    prompts = [f"{a} {b}" for a, b in zip(firsts, seconds)]
    assert len(prompts) == 16
    sizes = [4 + (i % 5) * 3 for i in range(16)]  # different lengths: rows finish at different steps

    def one(i: int) -> str:
        return ask(client, prompts[i], temperature=0, max_tokens=sizes[i]).choices[0].message.content

    alone = [one(i) for i in range(16)]
    before = httpx.get(server.url + "/health").json()
    barrier = threading.Barrier(16)

    def together(i: int) -> str:
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(together, range(16)))
    assert concurrent == alone
    after = httpx.get(server.url + "/health").json()
    assert after["largest_batch"] > 1, "concurrent requests were never decoded together"
    assert after["batches"] - before["batches"] < 16


@pytest.mark.slow
def test_api_key_and_graceful_shutdown(model_dir):
    srv = Server(model_dir, "--api-key", "s3cret")
    try:
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(srv.url + "/", json={"prompt": "hi"}, timeout=30).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**body).choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()

        # SIGTERM while a request is being decoded: it still gets its full answer, then the server exits 0
        result: dict = {}

        def long_request() -> None:
            result["r"] = httpx.post(srv.url + "/v1/chat/completions", timeout=120, headers={
                "Authorization": "Bearer s3cret"}, json={"messages": [{"role": "user", "content": "a long one"}],
                                                         "temperature": 0, "max_tokens": 100})

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").json()["decoding"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        code = srv.stop(signal.SIGTERM)
        worker.join(60)
        assert code == 0, srv.output()
        answer = result["r"].json()
        assert result["r"].status_code == 200 and answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        srv.stop()
