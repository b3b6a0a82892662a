"""Peak RSS of one DPO step against one SFT step with a LoRA policy, at ChatGLM-6B's shape cut to 8 layers
(hidden 4096, FFN 16384, 32 heads, vocabulary 130528; random bfloat16 base, float32 LoRA on every linear).

Each step runs in its own process (peak RSS is per process) through the training backbone's train_step: SFT =
fine-tuning's answer-loss stage on B rows; DPO = the dpo stage on B pairs (2B rows, the reference log-probs from the
same weights with the adapter switched off: no second model). Prints one JSON line per step and the ratio.

    python benchmarks/dpo_memory.py [--layers 8] [--pairs 1] [--prompt 16] [--answer 48]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(mode: str, layers: int, pairs: int, prompt: int, answer: int) -> dict:
    import torch

    from glmkit.adapters.lora import apply_lora
    from glmkit.core.causal_lm import GLMForCausalLM
    from glmkit.core.config import GLMConfig
    from glmkit.training.alignment import Reference
    from glmkit.training.data.finetune import IGNORE_INDEX, collate_train
    from glmkit.training.data.preference import PairExample
    from glmkit.training.finetune_loop import AnswerLossStage, MicroBatches
    from glmkit.training.stages import PreferenceStage, collate_pairs
    from glmkit.training.trainer import LoopConfig, TrainState, train_step

    torch.manual_seed(0)
    cfg = GLMConfig.from_name("chatglm-6b", num_layers=layers)
    torch.set_default_dtype(torch.bfloat16)
    model = GLMForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    apply_lora(model, 8, 16, 0.0, "all")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    loaded = rss_mib()

    def example(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, 100000, (prompt + answer,), generator=g).tolist()
        ids[prompt - 2:prompt] = [cfg.gmask_token_id, cfg.bos_token_id]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState(model=model, raw_model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"))
    order = MicroBatches(pairs, pairs, 0)
    if mode == "sft":
        rows = [example(i) for i in range(pairs)]
        stage = AnswerLossStage(rows, order, cfg.pad_token_id, 1)
        batch = collate_train(rows, cfg.pad_token_id)
    else:
        data = [PairExample(example(i), example(1000 + i)) for i in range(pairs)]
        stage = PreferenceStage(data, order, cfg.pad_token_id, 1, Reference(model, "lora", adapter_loaded=False))
        batch = collate_pairs(data, cfg.pad_token_id)
    train_step(state, stage, [batch], LoopConfig(max_steps=1, normalize="micro"))
    return {"step": mode, "rows": int(batch["input_ids"].shape[0]), "tokens_per_row": prompt + answer,
            "rss_after_load_mib": round(loaded), "peak_rss_mib": round(rss_mib())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--pairs", type=int, default=1, help="SFT rows = DPO pairs per step")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--answer", type=int, default=48)
    p.add_argument("--one", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.layers, a.pairs, a.prompt, a.answer)))
        return
    found = {}
    for mode in ("sft", "dpo"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--layers", str(a.layers), "--pairs",
                              str(a.pairs), "--prompt", str(a.prompt), "--answer", str(a.answer)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        found[mode] = json.loads(out)
    print(json.dumps({"dpo_over_sft_peak_rss": round(found["dpo"]["peak_rss_mib"] / found["sft"]["peak_rss_mib"],
                                                      3)}))


if __name__ == "__main__":
    main()
