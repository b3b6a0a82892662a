"""`glmkit bench`: prefill and decode speed plus peak memory of bf16, INT8 and INT4 at a model shape, next to the
memory-bandwidth roofline measured in the same run, as one table.

Each precision runs in its own child process (so its peak RSS is its own and its memory is returned before the
next one is built), with random weights: quantized layers get random integer weights and scales directly (no
float copy, no quantization time). The output layer is tied to the embedding, as in ChatGLM-6B, and quantized as
load_model(quantize=...) does it by default (INT8; `head=` to choose). Prefill = one forward over the prompt
filling the KV cache; decode = one token per step, both through glmkit.core.generate. Roofline decode tokens/s =
bandwidth / bytes of weights read per token (the quantized linears at their packed size including scales, norms
and anything unquantized in bf16; an embedding not shared with the output layer contributes one row).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from glmkit.core.generate import generate_stream
from glmkit.quant import kernels
from glmkit.quant.formats import default_spec, head_spec
from glmkit.quant.linear import QuantizedLinear
from glmkit.quant.transform import prepare_model

PRECISIONS = ("bf16", "int8", "int4")


# ------------------------------------------------------------------------------------------------ measurements


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over a buffer much larger than the last-level cache."""
    n = int(gib * 2**30) // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    del buf
    return n * 4 / best


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the address space (reset by exec); ru_maxrss is not on Linux:
    a child started from a big parent would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def _build_model(precision: str, layers: int, group_size: int | None, seed: int = 0, preset: str = "chatglm-6b",
                 head: str | None = None):
    config = GLMConfig.from_name(preset, num_layers=layers, torch_dtype="bfloat16")
    config.tie_word_embeddings = config.family == "chatglm"  # ChatGLM-6B's output layer is its embedding
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    if precision != "bf16":
        bits = 8 if precision == "int8" else 4
        spec = default_spec(bits, group_size if bits == 4 else None)
        spec["head"] = head_spec(head, bits)
        prepare_model(model, spec)

    def rand_float(shape, std):
        t = torch.empty(shape, dtype=torch.bfloat16)
        return t.normal_(0.0, std, generator=gen)

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            n, k = module.out_features, module.in_features
            q = kernels.weight_buffer((n, k if module.bits == 8 else k // 2), torch.int8)  # as quantizing makes it
            q.random_(-128, 128, generator=gen)
            if module.scheme == "group":
                groups = k // module.group_size
                module.load_weight_tensor("weight_scale", torch.full((n, groups), 0.02 / 8, dtype=torch.bfloat16))
                if not module.symmetric:
                    module.load_weight_tensor("weight_zero", torch.zeros(n, groups, dtype=torch.bfloat16))
            else:
                qmax = 127 if module.bits == 8 else 7
                module.load_weight_tensor("weight_scale", torch.full((n,), 0.02 / qmax, dtype=torch.float16))
            module.load_weight_tensor("weight", q)
            if module.bias is not None:
                module.load_weight_tensor("bias", torch.zeros(n, dtype=torch.bfloat16))
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if p.dim() >= 2:
                value = rand_float(tuple(p.shape), 0.02)
            elif pname == "weight":
                value = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                value = torch.zeros(p.shape, dtype=torch.bfloat16)
            setattr(module, pname, torch.nn.Parameter(value, requires_grad=False))
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.wte.weight  # the loop above gave each module its own copy
    model.eval()
    return model


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and quantized buffer once, except that an embedding
    table not shared with the output layer contributes one row (the lookup reads one row per token)."""
    def own(module):
        return [(n, t) for n, t in list(module.named_parameters(recurse=False))
                + list(module.named_buffers(recurse=False)) if t is not None and not t.is_meta]

    head = {id(t) for _, t in own(model.lm_head)}
    rows = model.config.vocab_size
    total = 0
    seen = set()
    for name, module in model.named_modules():
        for tname, t in own(module):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(module, QuantizedLinear) and tname in ("weight_scale",) and module.layout == "int4pack":
                continue  # kept for the exact fp32 path; the bf16 kernels read scale_zero
            if name == "wte" and id(t) not in head:
                total += t.numel() * t.element_size() // rows
                continue
            total += t.numel() * t.element_size()
    return total


def run_one(precision: str, layers: int, prompt_tokens: int, decode_tokens: int, group_size: int | None,
            threads: int | None, preset: str = "chatglm-6b", head: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = _build_model(precision, layers, group_size, preset=preset, head=head)
    build_s = time.perf_counter() - t0
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, min(cfg.vocab_size, cfg.mask_token_id or cfg.vocab_size), (1, prompt_tokens - 2),
                        generator=gen)
    ids = torch.cat([ids, torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]])], dim=1)
    with torch.inference_mode():
        for _ in generate_stream(model, ids[:, -16:], max_new_tokens=2, eos_token_id=[]):  # warm-up
            pass
        times = []
        start = time.perf_counter()
        for _ in generate_stream(model, ids, max_new_tokens=decode_tokens + 1, eos_token_id=[]):
            times.append(time.perf_counter())
    prefill_s = times[0] - start
    decode_s = (times[-1] - times[0]) / max(1, len(times) - 1)
    return {"precision": precision, "prefill_tok_s": prompt_tokens / prefill_s, "decode_tok_s": 1.0 / decode_s,
            "weight_bytes": weight_bytes_per_token(model), "peak_rss": peak_rss_bytes(), "build_s": build_s,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ report


def format_table(results: list[dict], bandwidth: float) -> str:
    base = next((r for r in results if r["precision"] == "bf16"), None)
    head = ["precision", "weights/token GB", "prefill tok/s", "decode tok/s", "roofline tok/s", "% roofline",
            "decode vs bf16", "prefill vs bf16", "peak RSS GB"]
    rows = [head]
    for r in results:
        roof = bandwidth / r["weight_bytes"]
        rows.append([
            r["precision"], f"{r['weight_bytes'] / 1e9:.2f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
            f"{roof:.2f}", f"{100 * r['decode_tok_s'] / roof:.0f}%",
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-",
            f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x" if base else "-",
            f"{r['peak_rss'] / 1e9:.2f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _best_round(rounds: list[dict]) -> dict:
    """The fastest prefill and the fastest decode over rounds of one precision (noise on a shared machine only
    ever slows a run down), with the largest peak RSS."""
    best = dict(rounds[0])
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss"):
        best[key] = max(r[key] for r in rounds)
    return best


def run_benchmark(precisions: Sequence[str] = PRECISIONS, *, layers: int = 28, prompt_tokens: int = 128,
                  decode_tokens: int = 16, group_size: int | None = None, threads: int | None = None,
                  model: str = "chatglm-6b", repeats: int = 1, head: str | None = None) -> tuple[float, list[dict]]:
    """`glmkit bench`: (read bandwidth in bytes/s, one result per precision). Each precision runs in a fresh
    process (so peak RSS is its own), rounds interleaved over the precisions, each figure its best round.
    head: how the quantized precisions store the output layer and embedding ("int8", "int4", "none"; default:
    floating point for int8, "int8" for int4)."""
    head_spec(head)  # a bad value fails here, not in every child
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precisions {bad}; choose from {PRECISIONS}")
    if layers < 1 or prompt_tokens < 3 or decode_tokens < 1 or repeats < 1:
        raise ValueError("need layers >= 1, prompt_tokens >= 3, decode_tokens >= 1 and repeats >= 1")
    if threads:
        torch.set_num_threads(threads)
    bandwidth = measure_bandwidth()
    rounds: dict[str, list[dict]] = {p: [] for p in precisions}
    for p in [p for _ in range(repeats) for p in precisions]:
        job = dict(precision=p, layers=layers, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                   group_size=group_size, threads=threads, preset=model, head=head)
        proc = subprocess.run([sys.executable, "-m", "glmkit.evaluation.bench", json.dumps(job)],
                              capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"the {p} run failed:\n{proc.stderr[-3000:]}")
        rounds[p].append(json.loads(line[len("RESULT "):]))
    results = [_best_round(rounds[p]) for p in precisions]
    bandwidth = max(bandwidth, measure_bandwidth())  # once more after the runs: the machine may be shared
    return bandwidth, results


if __name__ == "__main__":  # one measurement in a fresh process, for run_benchmark
    result = run_one(**json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(result))
