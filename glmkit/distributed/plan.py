"""How much memory each device needs to run a model split over `world` tensor-parallel ranks.

Computed from the real shapes: the model is built on the meta device (no memory) and every tensor is counted with
the split glmkit.distributed.tp applies to it (heads, MLP columns and vocabulary divided over the ranks; norms and
row-parallel biases whole on every rank), at the stored width: fp16/bf16 weights, or INT8 / packed INT4 weights
with one fp16 scale per output row and shard (GLM-130B's convert_tp.py scheme) for the four linears of every
layer, the embedding (tied to the output layer) and norms in fp16 as GLM-130B keeps them. Beside the weights: the
KV cache (fp16, `batch` rows of `seq_len` tokens, this rank's heads) and the largest single weight dequantized to
fp16, which GLM-130B's W8A16 kernels materialise per matmul (the workspace of a quantized run).

Mixture-of-experts and latent-attention models (GLM-4.5/4.6/4.7, GLM-4.7-Flash) are counted per layer kind (one
dense and one MoE layer built on the meta device, times how often each occurs), with vLLM's layout of a
tensor-parallel MoE: attention heads, dense and shared-expert MLP columns and the vocabulary split over the ranks,
K/V heads split or (fewer than ranks) replicated, latent-attention down-projections (q_a, kv_a) and the latent
cache replicated, the fp32 router replicated; routed experts either split column-wise like a dense MLP (tensor
parallel) or spread whole over the ranks (expert parallel, `expert_parallel=True`). At INT8/INT4 every linear of
the layers is counted quantized (attention, dense, shared and routed experts), the router stays fp32. MTP layers
are not counted (glmkit does not load them).
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
    parameters: int = 0  # parameters held by one device
    expert_parallel: bool = False
    float_name: str = "fp16"  # what the 16-bit weights are

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


def memory_plan(config: GLMConfig, world: int, bits: int = 16, *, batch: int = 1, seq_len: int | None = None,
                setup: str = "", device_memory: int | None = None, expert_parallel: bool = False) -> DevicePlan:
    """Bytes per device of `config` over `world` ranks with the layers' linears at `bits` (16, 8 or 4)."""
    if bits not in (16, 8, 4):
        raise ValueError(f"bits must be 16, 8 or 4, got {bits}")
    if config.num_experts or config.kv_lora_rank:
        return _moe_plan(config, world, bits, batch, seq_len, setup, device_memory, expert_parallel)
    if expert_parallel:
        raise ValueError("expert parallelism needs a mixture-of-experts model")
    for name, value in (("num_heads", config.num_heads), ("ffn_hidden_size", config.ffn_hidden_size),
                        ("vocab_size", config.vocab_size)):
        if value % world:
            raise ValueError(f"{name} {value} does not split over {world} devices")
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    weights, largest, count = 0, 0, 0
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
        count += rows * cols
    seq_len = seq_len or config.max_seq_len
    kv = 2 * config.num_layers * (config.num_kv_heads // world) * config.head_dim * seq_len * batch * 2
    return DevicePlan(setup, world, bits, weights, kv, largest, device_memory, count)


def _moe_split(name: str, shape: tuple[int, ...], config: GLMConfig, world: int, expert_parallel: bool) -> int:
    """Elements of parameter `name` one rank holds (a routed expert's weight under expert parallelism: all of it
    on 1/world of the ranks, counted as world-th of it per rank)."""
    numel = 1
    for d in shape:
        numel *= d
    parts = name.split(".")
    if name in ("wte.weight", "lm_head.weight"):
        return numel // world
    if len(shape) < 2 or "router" in parts:
        return numel  # norms, biases of row-parallel layers, the router: on every rank
    if "experts" in parts and expert_parallel:
        return numel // world
    leaf = parts[-2]
    if leaf == "qkv":  # q heads split; K/V heads split, or replicated when fewer than the ranks
        hd, kv = config.head_dim, config.num_kv_heads
        return (config.num_heads // world + 2 * -(-kv // world)) * hd * shape[1]
    if leaf in ("q_a", "kv_a"):  # latent down-projections: replicated (as vLLM does)
        return numel
    return numel // world  # q_b / kv_b (heads), proj (columns), fc (glu rows), expert and shared MLPs


def _moe_plan(config: GLMConfig, world: int, bits: int, batch: int, seq_len: int | None, setup: str,
              device_memory: int | None, expert_parallel: bool) -> DevicePlan:
    import dataclasses

    kinds = config.mlp_layer_types or ["dense"] * config.num_layers
    checks = [("num_heads", config.num_heads), ("vocab_size", config.vocab_size)]
    if "dense" in kinds:
        checks.append(("ffn_hidden_size", config.ffn_hidden_size))
    if "sparse" in kinds:
        checks.append(("num_experts" if expert_parallel else "moe_ffn_hidden_size",
                       config.num_experts if expert_parallel else config.moe_ffn_hidden_size))
        if config.n_shared_experts:
            checks.append(("shared expert width", config.moe_ffn_hidden_size * config.n_shared_experts))
    for name, value in checks:
        if value % world:
            raise ValueError(f"{name} {value} does not split over {world} devices")
    if not config.kv_lora_rank and config.num_kv_heads % world and world % config.num_kv_heads:
        raise ValueError(f"{config.num_kv_heads} K/V heads neither split over nor replicate onto {world} devices")
    present = sorted(set(kinds), key=kinds.index)
    # one layer of each kind, built on meta (every layer of a kind has the same shapes)
    small = dataclasses.replace(config, num_layers=len(present), mlp_layer_types=present if config.mlp_layer_types
                                else None)
    with torch.device("meta"):
        model = GLMForCausalLM(small)
    times = {i: kinds.count(kind) for i, kind in enumerate(present)}
    weights = largest = count = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        n = times[int(parts[1])] if parts[0] == "h" else 1
        local = _moe_split(name, tuple(p.shape), config, world, expert_parallel)
        count += local * n
        if "router" in parts:
            weights += local * 4 * n  # kept in fp32
        elif bits < 16 and parts[0] == "h" and p.dim() == 2:
            rows = local // p.shape[1] if p.shape[1] else 0
            weights += (local * bits // 8 + rows * 2) * n  # int8 / packed int4 + one fp16 scale per row
            largest = max(largest, local * 2)
        else:
            weights += local * 2 * n
    seq_len = seq_len or config.max_seq_len
    if config.kv_lora_rank:  # glmkit's latent cache: the row [latent | rotary key] in both k and v slots, per rank
        per_token = 2 * (config.kv_lora_rank + config.qk_rope_head_dim)
    else:
        per_token = 2 * -(-config.num_kv_heads // world) * config.head_dim
    kv = config.num_layers * per_token * seq_len * batch * 2
    return DevicePlan(setup, world, bits, weights, kv, largest, device_memory, count, expert_parallel, "bf16")


# The newer MoE models' published shapes (glmkit.core.presets) on one machine and over tensor / expert parallel
# ranks: (preset, world, expert_parallel, device memory).
MOE_SETUPS = [
    ("glm-4.7-flash", 1, False, 24 * GIB), ("glm-4.7-flash", 2, False, 24 * GIB),
    ("glm-4.5-air", 1, False, 80 * GIB), ("glm-4.5-air", 2, False, 80 * GIB), ("glm-4.5-air", 4, False, 80 * GIB),
    ("glm-4.5-air", 4, True, 80 * GIB), ("glm-4.5", 4, False, 80 * GIB), ("glm-4.5", 8, False, 80 * GIB),
    ("glm-4.5", 8, True, 80 * GIB), ("glm-4.5", 16, True, 80 * GIB),
]


def moe_plans(batch: int = 1, seq_len: int = 8192, bits: tuple[int, ...] = (16, 8, 4)) -> list[DevicePlan]:
    plans = []
    for name, world, ep, memory in MOE_SETUPS:
        config = GLMConfig.from_name(name)
        label = f"{name}, {'1 device' if world == 1 else f'TP {world}' + (' + EP' if ep else '')}"
        plans += [memory_plan(config, world, b, batch=batch, seq_len=seq_len, setup=label, device_memory=memory,
                              expert_parallel=ep) for b in bits]
    return plans


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
        lines.append(f"| {p.setup or f'{p.world} devices'} | {p.float_name if p.bits == 16 else f'INT{p.bits}'} | "
                     f"{p.weights / GIB:.1f} | {p.kv_cache / GIB:.2f} | {p.workspace / GIB:.2f} | "
                     f"{p.total / GIB:.1f} | {dev} | {fits} |")
    return "\n".join(lines)
