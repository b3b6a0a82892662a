"""`glmkit memory-plan`: glmkit.distributed.plan.memory_plan printed as a table."""

from __future__ import annotations

import argparse

from glmkit.core.config import GLMConfig
from glmkit.distributed.plan import DEVICES, GIB, format_plan, glm130b_plan, memory_plan, moe_plans


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="glmkit memory-plan",
        description="Per-device memory (weights, KV cache, dequantization workspace) of a model split over "
                    "tensor-parallel devices, from its real shapes. Without options: GLM-130B at fp16/INT8/INT4 on "
                    f"{', '.join(DEVICES)}.")
    parser.add_argument("--model", default=None, help="a preset name (default: glm-130b on its README's setups)")
    parser.add_argument("--devices", type=int, default=None, help="tensor-parallel degree (with --model)")
    parser.add_argument("--device-memory-gib", type=float, default=None, help="memory of one device, GiB")
    parser.add_argument("--bits", type=int, choices=(16, 8, 4), action="append", default=None,
                        help="16, 8 or 4 (repeatable; default all three)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="spread whole routed experts over the devices (MoE presets: glm-4.5, glm-4.5-air, "
                             "glm-4.7-flash) instead of splitting each expert's columns")
    parser.add_argument("--moe", action="store_true",
                        help="GLM-4.5, GLM-4.5-Air and GLM-4.7-Flash on one machine and tensor/expert parallel")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
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
