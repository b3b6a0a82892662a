"""`glmkit pretrain`: glmkit.training.pretrain.pretrain on a YAML config plus overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from glmkit.training.pretrain import end_torchrun_worker, export_run, load_config, pretrain


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmkit pretrain",
        description="GLM blank-infilling pretraining. Options come from a YAML config (sections model, tokenizer, "
                    "data, train, eval) plus section.key=value overrides. Under torchrun, set "
                    "train.distributed=ddp or fsdp.",
        epilog="example: glmkit pretrain --config configs/glm-tiny.yaml train.max_steps=100 train.out_dir=out/x")
    p.add_argument("--config", help="YAML config file (see configs/glm-tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4 data.seq_len=128")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--export", metavar="DIR", help="do not train: load out_dir/checkpoint.pt and export it as a "
                                                   "model folder to DIR (to evaluate a run in progress)")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit pretrain: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(dataclasses.asdict(config), indent=2, ensure_ascii=False))
        return 0
    if args.export:
        try:
            step = export_run(config, args.export)
        except FileNotFoundError as e:
            print(f"glmkit pretrain: {e}", file=sys.stderr)
            return 2
        print(f"exported step {step} to {args.export}")
        return 0
    history = pretrain(config)
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return end_torchrun_worker(0)

