"""Load benchmark of `glmkit serve`: continuous batching (the default engine) against the batch-at-a-time engine.

    python benchmarks/serve_load.py                          # glm-tiny, rates 2,4,8,16 req/s, 48 requests each
    python benchmarks/serve_load.py --random 8,768           # a random 8-layer, 768-wide ChatGLM-6B-shaped model
    python benchmarks/serve_load.py --rates 4,8 --requests 64 --engines continuous,batch --json out.json
    python benchmarks/serve_load.py --random 6,768 --lengths long-tail --rates 0.6,1 --requests 32
    python benchmarks/serve_load.py --device cuda --random 24,2048

For each engine a real `python -m glmkit serve` process starts on loopback; after a short warm-up, each arrival
rate gets an open-loop Poisson stream of requests (arrival times drawn up front with a fixed seed and sent on time
whatever the server is doing) with mixed prompt lengths (4-160 words) and answer lengths (max_tokens 16-192, or
16-512 log-uniform with --lengths long-tail; greedy), through the official `openai` async client, streamed with
usage. Both engines get exactly the same requests.

Per rate and engine it prints: requests/s completed, output tokens/s (completion tokens of all requests / time from
the first arrival to the last answer), p50/p99 time to first token (request sent -> first content chunk, queueing
included) and p50/p99 inter-token latency (the gaps between streamed content chunks, over all requests), plus
the ratios continuous / batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the a cat dog runs fast slow model answer question hello world river stone light tree house water "
         "mountain city night morning book letter road music color").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(out: Path, layers: int, hidden: int) -> Path:
    """A random ChatGLM-6B-shaped checkpoint with glm-tiny's tokenizer (layers x hidden, 4x MLP, 64-dim heads)."""
    import torch

    from glmkit.core.config import GLMConfig
    from glmkit.core.model import GLM
    from glmkit.core.tokenizer import load_tokenizer
    from glmkit.loading.loader import load_model, save_model

    tiny = load_model("glm-tiny")
    config = GLMConfig(**{**tiny.config.__dict__, "num_layers": layers, "hidden_size": hidden,
                          "num_heads": hidden // 64, "num_kv_heads": hidden // 64, "head_dim": 64,
                          "ffn_hidden_size": 4 * hidden})
    model = GLM(config)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    save_model(model, out, tokenizer=load_tokenizer("glm-tiny"))
    return out


class Server:
    """A server process on loopback (the `--port` of `cmd`), started and waited for until GET /health answers;
    stop() sends SIGINT, on which glmkit serve and vLLM's server both shut down cleanly."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 timeout: float = 300) -> None:
        self.name, self.port = name, int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} never became healthy; see {log}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def glmkit_server(model: str, extra: list[str], log: Path, threads: int | None) -> Server:
    cmd = [sys.executable, "-m", "glmkit", "serve", "--model", model, "--port", str(free_port()), "--log-level",
           "warning", *extra]
    return Server("glmkit serve", cmd, log, env={"OMP_NUM_THREADS": str(threads)} if threads else None)


LENGTHS = {
    # max_tokens per request
    "uniform": lambda rng: rng.randint(16, 192),  # mean 104
    "long-tail": lambda rng: int(16 * 32 ** rng.random()),  # 16..512 log-uniform, mean 143: chat logs' long tail
}


def workload(n: int, rate: float, seed: int, lengths: str = "uniform") -> list[tuple[float, str, int]]:
    """(arrival offset in s, prompt, max_tokens) per request: Poisson arrivals at `rate`, mixed lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        words = int(4 * (40 ** rng.random()))  # 4..160 words, log-uniform: mostly short, some long
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append((t, prompt, LENGTHS[lengths](rng)))
    return out


def batch_bound(lengths: str, batch: int, n: int = 100_000, seed: int = 0) -> float:
    """The most continuous batching can gain over the batch engine on decode when every answer runs to max_tokens
    and the batch engine is saturated: its batches of `batch` requests (first come, first served) each run
    batch x max(max_tokens) row-steps (finished rows stay in the batch), against sum(max_tokens) for rows that
    leave when they end. Per-step costs taken as equal and proportional to the rows; prefill left out."""
    rng = random.Random(seed)
    xs = [LENGTHS[lengths](rng) for _ in range(n)]
    return sum(batch * max(xs[i:i + batch]) for i in range(0, n, batch)) / sum(xs)


async def drive(url: str, requests: list[tuple[float, str, int]], timeout: float) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)
    start = time.perf_counter()
    ttft, gaps, tokens, ends, errors = [], [], 0, [], 0

    async def one(at: float, prompt: str, max_tokens: int) -> None:
        nonlocal tokens, errors
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        last = None
        try:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    if last is None:
                        ttft.append(now - sent)
                    else:
                        gaps.append(now - last)
                    last = now
        except openai.APIError:
            errors += 1
            return
        ends.append(time.perf_counter())

    await asyncio.gather(*(one(*r) for r in requests))
    await client.close()
    elapsed = max(ends, default=start) - (start + requests[0][0])

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    return {"completed": len(ends), "errors": errors, "seconds": elapsed, "req_per_s": len(ends) / elapsed,
            "tokens_per_s": tokens / elapsed, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="glm-tiny", help="checkpoint folder or bundled name (default glm-tiny)")
    parser.add_argument("--random", help="LAYERS,HIDDEN: benchmark a random ChatGLM-6B-shaped model of that size")
    parser.add_argument("--rates", default="2,4,8,16", help="arrival rates in requests/s (default 2,4,8,16)")
    parser.add_argument("--requests", type=int, default=48, help="requests per rate (default 48)")
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="uniform",
                        help="max_tokens per request: uniform 16-192 (default) or long-tail, log-uniform 16-512")
    parser.add_argument("--engines", default="continuous",
                        help="engines to compare: only 'continuous' is left (the batch engine was removed; its "
                             "measurements stay in benchmarks/README.md)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each server (OMP_NUM_THREADS); on a shared, oversubscribed host "
                             "1 avoids OpenMP barrier stalls that swamp a small model (default: torch's own)")
    parser.add_argument("--server-args", default="",
                        help="more `glmkit serve` options, e.g. --server-args='--max-batched-tokens 512'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="client timeout per request (s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    engines = args.engines.split(",")
    if set(engines) != {"continuous"}:
        parser.error("glmkit serve has one engine now: --engines continuous")
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    model = args.model
    if args.random:
        layers, hidden = (int(x) for x in args.random.split(","))
        model = str(random_model(tmp / f"random-{layers}x{hidden}", layers, hidden))
        print(f"random model: {layers} layers x {hidden} ({model})", file=sys.stderr)
    extra = ["--max-batch-size", str(args.max_batch_size), "--max-queue", "100000", "--device", args.device,
             *args.server_args.split()]
    results: dict[str, dict[float, dict]] = {engine: {} for engine in engines}
    servers: dict[str, Server] = {}
    try:
        for engine in engines:  # both up at once (an idle one costs nothing); rates alternate which goes first
            servers[engine] = glmkit_server(model, extra, tmp / f"serve-{engine}.log", args.threads)
            asyncio.run(drive(servers[engine].url, workload(4, 4.0, args.seed + 99), args.timeout))  # warm-up
        for k, rate in enumerate(rates):
            reqs = workload(args.requests, rate, args.seed + int(rate * 1000), args.lengths)
            for engine in engines if k % 2 == 0 else engines[::-1]:
                results[engine][rate] = r = asyncio.run(drive(servers[engine].url, reqs, args.timeout))
                print(f"{engine:>10} @ {rate:g} req/s: {r['req_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} tok/s, "
                      f"TTFT p50 {r['ttft_p50']:.3f} s p99 {r['ttft_p99']:.3f} s, ITL p50 {r['itl_p50'] * 1e3:.1f} "
                      f"ms p99 {r['itl_p99'] * 1e3:.1f} ms, errors {r['errors']}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print(f"\nmodel {args.random and f'random {args.random}' or args.model}, {args.requests} requests per rate, "
          f"max batch {args.max_batch_size}, max_tokens {args.lengths}, device {args.device}, {os.cpu_count()} CPUs, "
          f"server threads {args.threads or 'default'}; decode bound of continuous/batch for these lengths "
          f"{batch_bound(args.lengths, args.max_batch_size):.2f}x (batch_bound)\n")
    print("| rate (req/s) | engine | req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in rates:
        for engine in engines:
            r = results[engine][rate]
            print(f"| {rate:g} | {engine} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['ttft_p50']:.3f} | "
                  f"{r['ttft_p99']:.3f} | {r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} |")
    if {"continuous", "batch"} <= set(engines):
        print("\n| rate (req/s) | throughput continuous/batch | p99 TTFT batch/continuous |")
        print("|---|---|---|")
        for rate in rates:
            c, b = results["continuous"][rate], results["batch"][rate]
            print(f"| {rate:g} | {c['tokens_per_s'] / b['tokens_per_s']:.2f}x | {b['ttft_p99'] / c['ttft_p99']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({e: {str(k): v for k, v in r.items()} for e, r in results.items()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
