"""How much memory each device needs to run a model split over `world` tensor-parallel ranks.

Computed from the real shapes: the model is built on the meta device (no memory) and every tensor is counted with
the split glmkit.distributed.tp applies to it (heads, MLP columns and vocabulary divided over the ranks; norms and
row-parallel biases whole on every rank), at the stored width: fp16/bf16 weights, or INT8 / packed INT4 weights
with one fp16 scale per output row and shard (GLM-130B's convert_tp.py scheme) for the four linears of every
layer, the embedding (tied to the output layer) and norms in fp16 as GLM-130B keeps them. Beside the weights: the
KV cache (fp16, `batch` rows of `seq_len` tokens, this rank's heads) and the largest single weight dequantized to
fp16, which GLM-130B's W8A16 kernels materialise per matmul (the workspace of a quantized run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from glmkit.distributed.tp import tensor_parallel_kind

GIB = 1024**3
QUANTIZED = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")
# The setups GLM-130B's README names, with each device's memory.
DEVICES = {"8x A100-40G": (8, 40 * GIB), "4x RTX 3090": (4, 24 * GIB), "8x RTX 3090": (8, 24 * GIB),
           "8x RTX 2080 Ti": (8, 11 * GIB)}


@dataclass
class DevicePlan:
    setup: str
    world: int
    bits: int
    weights: int  # bytes per device
    kv_cache: int
    workspace: int
    device_memory: int | None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


def memory_plan(config: GLMConfig, world: int, bits: int = 16, *, batch: int = 1, seq_len: int | None = None,
                setup: str = "", device_memory: int | None = None) -> DevicePlan:
    """Bytes per device of `config` over `world` ranks with the layers' linears at `bits` (16, 8 or 4)."""
    if bits not in (16, 8, 4):
        raise ValueError(f"bits must be 16, 8 or 4, got {bits}")
    for name, value in (("num_heads", config.num_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                        ("vocab_size", config.vocab_size)):
        if value % world:
            raise ValueError(f"{name} {value} does not split over {world} devices")
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    weights, largest = 0, 0
    for name, p in model.named_parameters():  # a tied output layer is the embedding's parameter: counted once
        kind = tensor_parallel_kind(name, config)
        rows, cols = (p.shape[0], p.shape[1]) if p.dim() == 2 else (p.shape[0], 1)
        if kind in ("rows", "glu"):
            rows //= world
        elif kind == "columns":
            cols //= world
        if bits < 16 and name.endswith(QUANTIZED):
            weights += rows * cols * bits // 8 + rows * 2  # int8 / packed int4 + one fp16 scale per row
            largest = max(largest, rows * cols * 2)
        else:
            weights += rows * cols * 2
    seq_len = seq_len or config.max_seq_len
    kv = 2 * config.num_layers * (config.num_kv_heads // world) * config.head_dim * seq_len * batch * 2
    return DevicePlan(setup, world, bits, weights, kv, largest, device_memory)


def glm130b_plan(batch: int = 1, seq_len: int = 2048) -> list[DevicePlan]:
    """GLM-130B at fp16, INT8 and INT4 on the setups of its README."""
    config = GLMConfig.from_name("glm-130b")
    return [memory_plan(config, world, bits, batch=batch, seq_len=seq_len, setup=setup, device_memory=memory)
            for setup, (world, memory) in DEVICES.items() for bits in (16, 8, 4)]


def format_plan(plans: list[DevicePlan]) -> str:
    """A Markdown table of plans (GiB per device)."""
    lines = ["| setup | precision | weights | KV cache | workspace | total | device | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        dev = f"{p.device_memory / GIB:.0f}" if p.device_memory else "-"
        fits = "-" if p.fits is None else ("yes" if p.fits else "no")
        lines.append(f"| {p.setup or f'{p.world} devices'} | {'fp16' if p.bits == 16 else f'INT{p.bits}'} | "
                     f"{p.weights / GIB:.1f} | {p.kv_cache / GIB:.2f} | {p.workspace / GIB:.2f} | "
                     f"{p.total / GIB:.1f} | {dev} | {fits} |")
    return "\n".join(lines)
