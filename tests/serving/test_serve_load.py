"""`glmkit serve` (the continuous engine) under load, as a real process on a loopback port: a full queue answers 503
with Retry-After, a request past --request-timeout gets 504, a client that disconnects mid-stream frees its KV
blocks, bad requests among good ones get 4xx and cost the others nothing, GET /metrics speaks Prometheus, and a soak
of a fixed number of requests leaves KV blocks and the process's memory where they were."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers.chat_models import build_tiny_chat_model
from tests.helpers.processes import Server

pytestmark = pytest.mark.slow  # `glmkit serve` in its own process

openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency (pip install openai)")

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("load") / "tiny-chat", "chatglm3", endless=True)


def metrics(server: Server) -> dict[str, float]:
    """GET /metrics -> {sample name (with labels): value}."""
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def body(content: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--max-batch-size", "4", "--max-queue", "64", "--block-size", "8",
                 "--kv-cache-memory", "4MiB")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_metrics_in_prometheus_text(server):
    r = httpx.post(server.url + CHAT, json=body("hello", 6), timeout=30)
    assert r.status_code == 200
    m = metrics(server)
    for name in ("glmkit_queue_depth", "glmkit_running_rows", "glmkit_kv_blocks_used", "glmkit_kv_blocks_free",
                 "glmkit_tokens_per_second", "glmkit_generated_tokens_total",
                 "glmkit_time_to_first_token_seconds_count", 'glmkit_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert name in m, f"{name} missing from /metrics"
    assert m["glmkit_time_to_first_token_seconds_count"] >= 1 and m["glmkit_generated_tokens_total"] >= 6
    assert m['glmkit_requests_total{finish="length"}'] >= 1
    assert m["glmkit_kv_blocks_used"] == 0 and m["glmkit_kv_blocks_free"] > 0


def test_client_disconnect_frees_kv_blocks(server):
    with httpx.stream("POST", server.url + CHAT, json=body("cat dog", 490, stream=True), timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: ") and next(lines).startswith("data: ")  # the role, a first piece
        m = metrics(server)
        assert m["glmkit_kv_blocks_used"] > 0 and m["glmkit_running_rows"] == 1
    deadline = time.monotonic() + 10
    while metrics(server)["glmkit_kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    m = metrics(server)
    assert m["glmkit_kv_blocks_used"] == 0 and m["glmkit_running_rows"] == 0


def test_bad_requests_under_load_get_4xx_and_cost_the_others_nothing(server):
    prompts = [f"{a} {b}" for a in ("the", "cat", "river", "你好") for b in ("runs", "stone")]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def good(i: int) -> str:
        return client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[i]}],
                                              temperature=0, max_tokens=8 + i).choices[0].message.content

    alone = [good(i) for i in range(len(prompts))]
    bad = [(b"{not json", 400), (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
           (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400),
           (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400)] * 2
    barrier = threading.Barrier(len(prompts) + len(bad))

    def send_bad(k: int) -> int:
        barrier.wait()
        r = httpx.post(server.url + CHAT, content=bad[k][0], headers={"content-type": "application/json"},
                       timeout=30)
        assert "error" in r.json()
        return r.status_code

    def send_good(i: int) -> str:
        barrier.wait()
        return good(i)

    with ThreadPoolExecutor(len(prompts) + len(bad)) as pool:
        goods = pool.map(send_good, range(len(prompts)))
        bads = pool.map(send_bad, range(len(bad)))
        assert list(bads) == [status for _, status in bad]
        assert list(goods) == alone


def test_full_queue_gets_503_with_retry_after(model_dir):
    srv = Server(model_dir, "--max-batch-size", "1", "--max-queue", "1", "--kv-cache-memory", "4MiB")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post(CHAT, json=body("the cat", 200)) for _ in range(6)))

        answers = asyncio.run(main())
        statuses = sorted(r.status_code for r in answers)
        assert statuses[0] == 200 and statuses[-1] == 503, statuses
        busy = [r for r in answers if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy" for r in busy)
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    finally:
        srv.stop()


def test_request_timeout_gets_504_and_frees_the_row(model_dir):
    srv = Server(model_dir, "--request-timeout", "0.3", "--kv-cache-memory", "4MiB", "--max-batch-size", "1")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                # one long answer holds the only row; the others wait past their timeout
                return await asyncio.gather(*(client.post(CHAT, json=body("the cat", 500)) for _ in range(3)))

        answers = asyncio.run(main())
        assert 504 in [r.status_code for r in answers]
        assert all(r.json()["error"]["code"] == "timeout" for r in answers if r.status_code == 504)
        m = metrics(srv)
        assert m['glmkit_requests_total{finish="timeout"}'] >= 1
        deadline = time.monotonic() + 10
        while (metrics(srv)["glmkit_kv_blocks_used"] or metrics(srv)["glmkit_queue_depth"]) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert metrics(srv)["glmkit_kv_blocks_used"] == 0
        assert httpx.post(srv.url + CHAT, json=body("dog", 3), timeout=30).status_code == 200
    finally:
        srv.stop()


def test_soak_returns_to_baseline(server):
    """120 requests (mixed lengths, streamed and not, some abandoned) in waves, within 120 s: KV blocks, rows and
    queue return to zero and the server's resident memory to its post-warm-up level."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    words = "the a cat dog runs fast slow model answer question hello world river stone light".split()

    async def one(i: int) -> None:
        content = " ".join(words[(i * 7 + k) % len(words)] for k in range(2 + i % 9))
        if i % 3 == 0:
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                          temperature=0, max_tokens=5 + i % 40, stream=True)
            async for k, _ in _enumerate(stream):
                if i % 6 == 0 and k == 2:
                    await stream.close()  # a client that leaves mid-stream
                    break
        else:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                 temperature=0.8 if i % 2 else 0, max_tokens=5 + i % 40)

    async def wave(start: int) -> None:
        await asyncio.gather(*(one(i) for i in range(start, start + 24)))

    async def soak() -> None:
        await wave(0)  # warm-up: allocator pools, tokenizer caches
        await asyncio.sleep(0.5)
        baseline = rss_bytes(server.proc.pid)
        for start in range(24, 120, 24):
            await wave(start)
        await asyncio.sleep(0.5)
        return baseline

    t0 = time.monotonic()
    baseline = asyncio.run(asyncio.wait_for(soak(), 120))
    assert time.monotonic() - t0 < 120
    m = metrics(server)
    assert m["glmkit_kv_blocks_used"] == 0 and m["glmkit_running_rows"] == 0 and m["glmkit_queue_depth"] == 0
    grown = rss_bytes(server.proc.pid) - baseline
    assert grown < 16 * 2**20, f"resident memory grew {grown / 2**20:.1f} MiB over 96 requests"


async def _enumerate(stream):
    k = 0
    async for item in stream:
        yield k, item
        k += 1
