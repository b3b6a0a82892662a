"""Decode speed of a mixture-of-experts model against the dense model of the same active size, at GLM-4.7-Flash's
layer shapes with few layers (batch 1, greedy, bf16, glmkit's KV cache).

    python benchmarks/moe_decode.py                # 4 layers, ~2-4 min on 2 busy cores, < 10 GB RAM
    python benchmarks/moe_decode.py --layers 2 --new-tokens 16

Models (random weights, built in memory; GLMConfig.from_name("glm-4.7-flash") with fewer layers):

* moe: GLM-4.7-Flash's layers as published: latent attention (q_lora 768, kv_lora 512, 20 heads), the first layer
  dense (SwiGLU 10240), the others 64 routed experts of width 1536, top-4, plus one shared expert; vocabulary 154880.
* dense-active: the same attention, embedding and output layer, every layer a dense SwiGLU of width
  4 * 1536 + 1536 = 7680 (what one token's routed and shared experts add up to), so its parameters equal the MoE
  model's active parameters per token.

Each model decodes `--new-tokens` tokens after a 16-token prompt, `--repeats` times; the table gives the median
tokens/s of the decode steps (prefill excluded). "experts run / token / layer" is counted with forward hooks on
the expert MLPs while decoding: it shows that a decode step runs (and so reads) only the routed experts.
`--quantize int4` (or int8) quantizes both models as `glmkit.load_model(..., quantize=)` does (every linear of every
layer, the routed and shared experts included; the router and latent attention's kv_b stay float; INT8 output layer
and embedding under INT4) before decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glmkit.core.causal_lm import GLMForCausalLM  # noqa: E402
from glmkit.core.config import GLMConfig  # noqa: E402
from glmkit.core.generate import generate_stream  # noqa: E402
from glmkit.quant.transform import quantize_model  # noqa: E402


def configs(layers: int) -> tuple[GLMConfig, GLMConfig]:
    flash = GLMConfig.from_name("glm-4.7-flash")
    moe = dataclasses.replace(flash, num_layers=layers, mlp_layer_types=flash.mlp_layer_types[:layers],
                              torch_dtype="bfloat16", max_seq_len=4096, extra={})
    active_width = moe.num_experts_per_tok * moe.moe_ffn_hidden_size + moe.n_shared_experts * moe.moe_ffn_hidden_size
    dense = dataclasses.replace(moe, num_experts=0, num_experts_per_tok=0, moe_ffn_hidden_size=0, n_shared_experts=0,
                                mlp_layer_types=None, ffn_hidden_size=active_width)
    return moe, dense


def build(config: GLMConfig) -> GLMForCausalLM:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            elif "ln" in name or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for block in model.h:
            if hasattr(block.mlp, "router"):
                block.mlp.router.float()  # the router stays fp32, as glmkit.load_model keeps it
                block.mlp.router.bias.zero_()
    return model.eval()


def count(model: torch.nn.Module, active: bool) -> int:
    """Parameters (active: those one decoded token uses: k routed experts of each MoE layer instead of all)."""
    total = 0
    for name, p in model.named_parameters():
        if active and ".experts." in name:
            layer = model.h[int(name.split(".")[1])].mlp
            total += p.numel() * model.config.num_experts_per_tok // len(layer.experts)
        else:
            total += p.numel()
    return total


def decode_rate(model: GLMForCausalLM, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(median decode tokens/s, expert MLP calls per decoded token per MoE layer)."""
    calls = [0]
    hooks = [e.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for block in model.h if hasattr(block.mlp, "experts") for e in block.mlp.experts]
    moe_layers = sum(hasattr(block.mlp, "experts") for block in model.h)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    rates = []
    with torch.no_grad():
        for _ in range(repeats):
            stream = generate_stream(model, prompt, max_new_tokens=new_tokens + 1, eos_token_id=[])
            next(stream)  # the prefill and the first token
            calls[0] = 0
            start = time.perf_counter()
            for _ in stream:
                pass
            rates.append(new_tokens / (time.perf_counter() - start))
    for h in hooks:
        h.remove()
    return statistics.median(rates), (calls[0] / new_tokens / moe_layers if moe_layers else 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None)
    args = parser.parse_args(argv)
    rows = []
    for label, config in zip(("moe (GLM-4.7-Flash layers)", "dense-active"), configs(args.layers)):
        model = build(config)
        total, active = count(model, False), count(model, True)  # counted on the float model
        if args.quantize:
            quantize_model(model, int(args.quantize[-1]))
        rate, experts = decode_rate(model, args.new_tokens, args.repeats)
        rows.append((label, total, active, experts, rate))
        del model
    print(f"{args.layers} layers, batch 1, {args.quantize or 'bf16'}, {args.new_tokens} decoded tokens after a 16-token prompt, "
          f"median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | parameters | active / token | experts run / token / MoE layer | decode tokens/s |")
    print("|---|---|---|---|---|")
    for label, total, active, experts, rate in rows:
        print(f"| {label} | {total / 1e9:.2f} B | {active / 1e9:.2f} B | {experts:.1f} | {rate:.1f} |")
    print(f"MoE / dense-active speed: {rows[0][4] / rows[1][4]:.2f}; total / active parameters of the MoE: "
          f"{rows[0][1] / rows[0][2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
