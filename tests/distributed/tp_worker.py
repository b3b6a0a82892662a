"""Run by tests/distributed/test_tensor_parallel.py under `torchrun --nproc-per-node 2` (not collected by pytest):
loads each GLM-130B checkpoint given on the command line with tensor_parallel=True and checks it against the original
code's outputs (tests/data/glm130b). Rank 0 prints one JSON line of results."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import glmkit
from glmkit.distributed.launch import end_worker
from tests.conftest import GLM130B_DATA


def local_bytes(model) -> int:
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    golden = json.loads((GLM130B_DATA / "golden.json").read_text(encoding="utf-8"))
    logits = torch.load(GLM130B_DATA / "golden_logits.pt", weights_only=True)
    cols = torch.tensor(golden["columns"])
    results = {}
    for arg in sys.argv[1:]:
        variant, folder = arg.split("=", 1)
        model = glmkit.load_model(folder, dtype="float32", tensor_parallel=True)
        worst, greedy = 0.0, True
        for case, c in golden["cases"].items():
            ids = torch.tensor([c["seq"]])
            with torch.no_grad():
                out = model(ids)
            key = f"{variant}/float32/{case}/logits"
            worst = max(worst, (out[..., cols] - logits[key + "/columns"]).abs().max().item(),
                        (out.logsumexp(-1) - logits[key + "/logsumexp"]).abs().max().item())
            new = model.generate(ids, max_new_tokens=golden["gen_tokens"], do_sample=False)[0].tolist()
            greedy &= new == golden["greedy"][f"{variant}/float32/{case}"]
        results[variant] = {"max_abs_err": worst, "greedy_equal": greedy, "local_bytes": local_bytes(model),
                            "heads": model.h[0].attn.n_heads, "world": model.tensor_parallel["world_size"]}
        del model
    if dist.get_rank() == 0:
        print("RESULTS " + json.dumps(results), flush=True)
    end_worker(0)


if __name__ == "__main__":
    main()
