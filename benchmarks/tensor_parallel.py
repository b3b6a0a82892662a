"""Tensor parallelism on CPU: the same GLM-130B-architecture model in 1 process vs 2 ranks (torchrun, gloo).

    python benchmarks/tensor_parallel.py                 # hidden 1024, 12 layers, GLM-130B's 150528 vocabulary
    python benchmarks/tensor_parallel.py --layers 4 --json

Writes a random 2-way SAT checkpoint (fp16, as GLM-130B ships), then runs greedy generation (EOS off) through
glmkit.load_model(..., dtype=bf16): once in one process with T threads, once as `torchrun --nproc-per-node 2` with
T/2 threads per rank (tensor_parallel=True; every rank computes its heads, MLP columns and vocabulary slice).
Reports prefill tokens/s (the prompt's forward), decode tokens/s (mean over the following steps) and each
process's peak RSS (VmHWM). On a CPU both setups share the same cores and memory bandwidth, so TP=2 cannot be
faster than one process with all threads; what it shows is the split of memory per rank and the cost of the
collectives (two all-reduces per layer and one all-gather of the logits per step, over loopback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(folder: str, prompt: int, decode: int, threads: int, tp: bool) -> None:
    import torch

    import glmkit
    from glmkit.core.generate import generate_stream
    from glmkit.evaluation.bench import peak_rss_bytes

    torch.set_num_threads(threads)
    model = glmkit.load_model(folder, dtype="bfloat16", tensor_parallel=tp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20100, 140000, (1, prompt), generator=g)
    ids[0, -2:] = torch.tensor([150001, 150004])  # [gMASK] sop

    def run(n: int) -> list[float]:
        stamps = [time.perf_counter()]
        for _ in generate_stream(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=[]):
            stamps.append(time.perf_counter())
        return stamps

    run(2)  # warm-up
    stamps = run(decode + 1)
    prefill = prompt / (stamps[1] - stamps[0])
    steps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    out = {"prefill_tok_s": prefill, "decode_tok_s": len(steps) / sum(steps), "peak_rss": peak_rss_bytes()}
    if tp:
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out["peak_rss"])
        out["peak_rss_per_rank"] = gathered
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(out), flush=True)
        from glmkit.distributed.launch import end_worker

        end_worker(0)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--inner", type=int, default=2816)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=150528)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-process run (each rank gets half)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "TP"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        tp = a.worker[1] == "1"
        worker(a.worker[0], a.prompt_tokens, a.decode_tokens, max(a.threads // (2 if tp else 1), 1), tp)
        return
    sys.path.insert(0, str(REPO))
    from tests.conftest import GLM130B_TINY, glm130b_sat_state_dict, sat_reshard, write_sat_checkpoint

    cfg = dict(GLM130B_TINY, hidden_size=a.hidden, num_attention_heads=a.heads, inner_hidden_size=a.inner,
               num_layers=a.layers, vocab_size=a.vocab, max_sequence_length=2048)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        sd = glm130b_sat_state_dict(cfg, std=0.02)
        params = sum(t.numel() for k, t in sd.items() if "inv_freq" not in k)
        folder = write_sat_checkpoint(Path(tmp) / "ckpt", sat_reshard([sd], 2), model_config=cfg)
        del sd
        base = [f"--{k}={v}" for k, v in (("prompt-tokens", a.prompt_tokens), ("decode-tokens", a.decode_tokens),
                                           ("threads", a.threads))]
        results = {}
        single = subprocess.run([sys.executable, __file__, "--worker", str(folder), "0", *base], capture_output=True,
                                text=True, env=env, check=True)
        results["1 process"] = json.loads(single.stdout.split("RESULT ", 1)[1])
        tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29731", __file__, "--worker", str(folder), "1", *base],
                            capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS=str(max(a.threads // 2, 1))),
                            check=True)
        results["TP=2"] = json.loads(tp.stdout.split("RESULT ", 1)[1].splitlines()[0])
    if a.json:
        print(json.dumps({"params": params, "config": cfg, **results}, indent=2))
        return
    print(f"GLM-130B architecture, {params / 1e6:.0f}M parameters (hidden {a.hidden}, {a.layers} layers, vocab "
          f"{a.vocab}), bf16, prompt {a.prompt_tokens}, {a.decode_tokens} decode steps, {a.threads} threads in all")
    print("| setup | prefill tok/s | decode tok/s | peak RSS per process |")
    print("|---|---|---|---|")
    for name, r in results.items():
        rss = r.get("peak_rss_per_rank", [r["peak_rss"]])
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
              f"{' / '.join(f'{x / 2**20:.0f} MiB' for x in rss)} |")


if __name__ == "__main__":
    main()
