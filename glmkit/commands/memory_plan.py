"""`glmkit memory-plan`: glmkit.distributed.plan.memory_plan printed as a table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.config import GLMConfig
from glmkit.core.options import option
from glmkit.distributed.plan import DEVICES, GIB, format_plan, glm130b_plan, memory_plan, moe_plans


@dataclass(kw_only=True)
class MemoryPlanOptions:
    model: str | None = option(None, help="a preset name (default: glm-130b on its README's setups)")
    devices: int | None = option(None, help="tensor-parallel degree (with --model)")
    device_memory_gib: float | None = option(None, help="memory of one device, GiB")
    bits: list[Literal[16, 8, 4]] | None = option(None, action="append", type=int, choices=(16, 8, 4),
                                                  help="16, 8 or 4 (repeatable; default all three)")
    expert_parallel: bool = option(False, help="spread whole routed experts over the devices (MoE presets: glm-4.5, "
                                               "glm-4.5-air, glm-4.7-flash) instead of splitting each expert's "
                                               "columns")
    moe: bool = option(False, help="GLM-4.5, GLM-4.5-Air and GLM-4.7-Flash on one machine and tensor/expert "
                                   "parallel")
    batch: int = 1
    seq_len: int = 2048


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        MemoryPlanOptions, prog="glmkit memory-plan", dashes=True,
        description="Per-device memory (weights, KV cache, dequantization workspace) of a model split over "
                    "tensor-parallel devices, from its real shapes. Without options: GLM-130B at fp16/INT8/INT4 on "
                    f"{', '.join(DEVICES)}.")


def cli_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parse_options(MemoryPlanOptions, parser, argv)
    if args.moe:
        print(format_plan(moe_plans(args.batch, args.seq_len, tuple(args.bits or (16, 8, 4)))))
        return 0
    if args.model is None and args.devices is None:
        print(format_plan(glm130b_plan(args.batch, args.seq_len)))
        return 0
    try:
        config = GLMConfig.from_name(args.model or "glm-130b")
        memory = int(args.device_memory_gib * GIB) if args.device_memory_gib else None
        plans = [memory_plan(config, args.devices or 1, bits, batch=args.batch, seq_len=args.seq_len,
                             device_memory=memory, expert_parallel=args.expert_parallel)
                 for bits in (args.bits or [16, 8, 4])]
    except ValueError as e:
        parser.error(str(e))
    print(format_plan(plans))
    return 0
