"""`glmkit pretrain`: glmkit.training.pretrain.pretrain on a YAML config plus overrides. The options are
PretrainConfig's fields (glmkit.core.options builds the parser from them)."""

from __future__ import annotations

import argparse
import json
import sys

from glmkit.core import options
from glmkit.distributed.launch import end_worker
from glmkit.training.pretrain import PretrainConfig, export_run, pretrain

PROG = "glmkit pretrain"


def build_parser() -> argparse.ArgumentParser:
    p = options.build_parser(
        PretrainConfig, prog=PROG,
        description="GLM blank-infilling pretraining. Options come from a YAML config (sections model, tokenizer, "
                    "data, train, eval), then section.key=value overrides, then --section.key flags. Under "
                    "torchrun, set train.distributed=ddp or fsdp.",
        epilog="example: glmkit pretrain --config configs/glm-tiny.yaml train.max_steps=100 train.out_dir=out/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--export", metavar="DIR", help="do not train: load out_dir/checkpoint.pt and export it as a "
                                                   "model folder to DIR (to evaluate a run in progress)")
    return p


def cli_main(argv: list[str]) -> int:
    parser = build_parser()
    ns = argparse.Namespace()
    try:
        config = options.parse(PretrainConfig, parser, argv, namespace=ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if ns.print_config:
        print(json.dumps(options.to_dict(config), indent=2, ensure_ascii=False))
        return 0
    if ns.export:
        try:
            step = export_run(config, ns.export)
        except FileNotFoundError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        print(f"exported step {step} to {ns.export}")
        return 0
    history = pretrain(config)
    if history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}"
              + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return end_worker(0, only_under_torchrun=True)


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
