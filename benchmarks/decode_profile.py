"""Where one decode step's time goes, at the ChatGLM-6B shape: each linear's time against the bytes it reads,
attention, norms, rotary, the KV cache, the embedding, the rest of the model's forward (Python, masks, positions)
and the generation loop around it (sampling, stopping, the next step's inputs).

    python benchmarks/decode_profile.py --layers 8 --precision int4     # ~1 min on 2 cores
    python benchmarks/decode_profile.py --layers 28 --precision bf16

The model has random weights (glmkit.evaluation.bench builds it: quantized layers get random integers, no
quantization time). Timing hooks wrap modules and functions by what they are (nn.Linear / QuantizedLinear,
LayerNorm / RMSNorm, Attention, KVCache.update, the rotary functions, scaled_dot_product_attention); each region's
time is exclusive of the regions inside it, and what no region covers is the "model: rest" and "generation loop"
rows. The hooks cost about 2 us per call, which lands in those two rows. Works on any glmkit version that has
glmkit.evaluation.bench._build_model, so the same script profiles the code before and after a change.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit.core.model as model_module  # noqa: E402
from glmkit.core.generate import generate_stream  # noqa: E402
from glmkit.evaluation import bench  # noqa: E402


class Regions:
    """Exclusive wall time per label: a region's time minus the regions opened inside it."""

    def __init__(self) -> None:
        self.time = defaultdict(float)
        self.calls = defaultdict(int)
        self.stack: list[list] = []  # [label, start, time of children]
        self.on = False

    def enter(self, label: str) -> None:
        if self.on:
            self.stack.append([label, time.perf_counter(), 0.0])

    def exit(self) -> None:
        if not self.on or not self.stack:
            return
        label, start, children = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.time[label] += elapsed - children
        self.calls[label] += 1
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.enter(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()
        return timed


def module_label(name: str, module: nn.Module) -> str | None:
    kind = type(module).__name__
    if name.endswith(("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")):
        return "linear " + name.split(".", 2)[2]
    if name == "lm_head":
        return "output layer"
    if name == "wte":
        return "embedding lookup"
    if kind in ("LayerNorm", "RMSNorm"):
        return "norms"
    if kind == "MLP":
        return "mlp activation"
    if kind == "Attention":
        return "attention: rest"
    if kind == "Block":
        return "block residuals"
    return None


def instrument(model: nn.Module, regions: Regions) -> None:
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label is None or name == "":
            continue
        if name in ("wte", "lm_head"):  # one module when the table is tied and quantized: tell by the input
            def enter(m, a):
                regions.enter("embedding lookup" if not a[0].is_floating_point() else "output layer")
            module.register_forward_pre_hook(enter)
        else:
            module.register_forward_pre_hook(lambda m, a, label=label: regions.enter(label))
        module.register_forward_hook(lambda m, a, o: regions.exit())
    model.register_forward_pre_hook(lambda m, a, k: regions.enter("model: rest"), with_kwargs=True)
    model.register_forward_hook(lambda m, a, o: regions.exit())
    # functions the model calls, whichever this glmkit version has
    for fname in ("apply_rotary_half_split", "apply_rotary_interleaved", "apply_rotary_2d", "rotate_half"):
        if hasattr(model_module, fname):
            setattr(model_module, fname, regions.wrap("rotary", getattr(model_module, fname)))
    model_module.Rotary.cos_sin = regions.wrap("rotary", model_module.Rotary.cos_sin)
    model_module.KVCache.update = regions.wrap("kv cache write", model_module.KVCache.update)
    F.scaled_dot_product_attention = regions.wrap("attention: sdpa", F.scaled_dot_product_attention)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights a linear reads per call (quantized storage at its packed size, scales included)."""
    total = 0
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is None or t.is_meta or name == "bias":
            continue
        if name == "weight_scale" and getattr(module, "layout", "") == "int4pack":
            continue  # exact scales kept for the fp32 path; the bf16 kernel reads scale_zero
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--precision", choices=("bf16", "int8", "int4"), default="int4")
    parser.add_argument("--head", default=None, help="output layer: int8 | int4 | none (versions that have it)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {}
    if "head" in inspect.signature(bench._build_model).parameters and args.head is not None:
        kwargs["head"] = args.head
    model = bench._build_model(args.precision, args.layers, None, **kwargs)
    cfg = model.config
    ids = torch.randint(100, 130000, (1, args.prompt_tokens - 2), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([ids, torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]])], dim=1)
    regions = Regions()
    instrument(model, regions)
    with torch.inference_mode():
        for _ in generate_stream(model, ids[:, -16:], max_new_tokens=3, eos_token_id=[]):  # warm-up
            pass
        stamps = []
        for _ in generate_stream(model, ids, max_new_tokens=args.steps + 1, eos_token_id=[]):
            stamps.append(time.perf_counter())
            regions.on = len(stamps) >= 1  # from the first token on: decode steps only
    steps = len(stamps) - 1
    step_ms = (stamps[-1] - stamps[0]) / steps * 1e3
    sizes = {"output layer": weight_bytes(model.lm_head)}
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label and label.startswith("linear"):
            sizes[label] = sizes.get(label, 0) + weight_bytes(module)
    rows = [(label, t / steps * 1e3) for label, t in regions.time.items()]
    covered = sum(ms for _, ms in rows)
    rows.append(("generation loop (sampling, next inputs)", step_ms - covered))
    rows.sort(key=lambda r: -r[1])
    print(f"{args.precision} (output layer {args.head or 'default'}), ChatGLM-6B shape, {args.layers} layers, "
          f"{args.prompt_tokens}-token prompt, {steps} decode steps, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"one decode step: {step_ms:.1f} ms ({1e3 / step_ms:.2f} tokens/s)")
    print(f"{'part':<42}{'ms/step':>9}{'share':>8}{'MB read':>9}{'GB/s':>7}")
    for label, ms in rows:
        mb = sizes.get(label)
        extra = f"{mb / 1e6:>9.0f}{mb / 1e9 / (ms / 1e3):>7.1f}" if mb else ""
        print(f"{label:<42}{ms:>9.2f}{100 * ms / step_ms:>7.1f}%{extra}")


if __name__ == "__main__":
    main()
