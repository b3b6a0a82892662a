"""`glmkit finetune`: glmkit.training.finetune.finetune with ChatGLM-6B's ptuning/main.py arguments as flags.

    glmkit finetune --do_train --train_file poem-gen/train.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --output_dir out/pt --pre_seq_len 16 --max_steps 300 --learning_rate 2e-2 \\
        --per_device_train_batch_size 8
    glmkit finetune --do_predict --test_file poem-gen/dev.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --ptuning_checkpoint out/pt/checkpoint-300 --output_dir out/pt \\
        --predict_with_generate
    torchrun --nproc_per_node 2 -m glmkit.commands.finetune --method full ...   (FSDP; gloo on CPU)

Each flag is the FinetuneArgs field of the same name; its default and help text come from that field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from glmkit.training.finetune import finetune
from glmkit.training.finetune_args import DTYPES, METHODS, QUANTIZATION_BITS, FinetuneArgs
from glmkit.training.pretrain import end_torchrun_worker

_FIELDS = {f.name: f for f in dataclasses.fields(FinetuneArgs)}


def _add(group: argparse._ArgumentGroup, name: str, **kwargs: Any) -> None:
    """--name with FinetuneArgs.name's default (or required=True when it has none) and help text."""
    f = _FIELDS[name]
    if f.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default
    group.add_argument(f"--{name}", help=f.metadata.get("help"), **kwargs)


def _flag(group: argparse._ArgumentGroup, name: str) -> None:
    _add(group, name, action="store_true")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmkit finetune",
        description="Fine-tune a GLM-family model with ChatGLM-6B's ptuning/main.py arguments (train.sh works "
                    "with `python3 main.py` replaced by `glmkit finetune`). P-tuning v2 when --pre_seq_len is given, "
                    "full fine-tuning otherwise, LoRA with --method lora.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to do")
    for name in ("do_train", "do_eval", "do_predict", "predict_with_generate"):
        _flag(g, name)

    g = p.add_argument_group("model")
    _add(g, "model_name_or_path")
    _add(g, "ptuning_checkpoint")
    _add(g, "adapter")
    _add(g, "method", choices=list(METHODS))
    _add(g, "pre_seq_len", type=int)
    _flag(g, "prefix_projection")
    _add(g, "quantization_bit", type=int, choices=list(QUANTIZATION_BITS))
    _add(g, "lora_rank", type=int)
    _add(g, "lora_alpha", type=float)
    _add(g, "lora_dropout", type=float)
    _add(g, "lora_target")
    _add(g, "dtype", choices=list(DTYPES))
    _add(g, "device")
    _add(g, "num_threads", type=int)

    g = p.add_argument_group("data (JSON Lines)")
    for name in ("train_file", "validation_file", "test_file", "prompt_column", "response_column", "history_column",
                 "source_prefix"):
        _add(g, name)
    for name in ("max_source_length", "max_target_length", "val_max_target_length", "max_train_samples",
                 "max_eval_samples", "max_predict_samples"):
        _add(g, name, type=int)
    _add(g, "ignore_pad_token_for_loss", type=_bool)
    _flag(g, "overwrite_cache")
    _add(g, "preprocessing_num_workers", type=int)

    g = p.add_argument_group("training")
    _add(g, "output_dir")
    _flag(g, "overwrite_output_dir")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _add(g, name, type=int)
    for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"):
        _add(g, name, type=float)
    _add(g, "max_steps", type=int)
    _add(g, "num_train_epochs", type=float)
    for name in ("warmup_steps", "logging_steps", "save_steps", "seed"):
        _add(g, name, type=int)
    for name in ("bf16", "fp16", "gradient_checkpointing"):
        _flag(g, name)
    _add(g, "resume_from_checkpoint")
    _add(g, "report_to")
    _add(g, "deepspeed")
    _add(g, "local_rank", type=int)
    _flag(g, "disable_tqdm")

    g = p.add_argument_group("generation (--predict_with_generate; defaults as main.py)")
    _add(g, "generation_max_length", type=int)
    _add(g, "do_sample", type=_bool)
    _add(g, "top_p", type=float)
    _add(g, "temperature", type=float)
    return p


def parse_args(argv: Sequence[str]) -> FinetuneArgs:
    """FinetuneArgs from command-line flags (argparse exits with status 2 on a bad flag)."""
    return FinetuneArgs(**vars(build_parser().parse_args(list(argv))))


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        finetune(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit finetune: error: {e}", file=sys.stderr)
        return 2
    return end_torchrun_worker(0)


if __name__ == "__main__":
    sys.exit(cli_main())
