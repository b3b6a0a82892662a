"""`glmkit finetune`: glmkit.training.finetune.finetune with ChatGLM-6B's ptuning/main.py arguments as flags.

    glmkit finetune --do_train --train_file poem-gen/train.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --output_dir out/pt --pre_seq_len 16 --max_steps 300 --learning_rate 2e-2 \\
        --per_device_train_batch_size 8
    glmkit finetune --do_predict --test_file poem-gen/dev.json --prompt_column content --response_column summary \\
        --model_name_or_path glm-tiny --ptuning_checkpoint out/pt/checkpoint-300 --output_dir out/pt \\
        --predict_with_generate
    glmkit finetune --stage dpo --do_train --train_file poem-form/train.json --model_name_or_path glm-tiny \\
        --method lora --adapter out/sft/checkpoint-400 --output_dir out/dpo --max_steps 200   (docs/alignment.md)
    glmkit finetune --config ft.yaml learning_rate=1e-2 --max_steps 10   (YAML keys = the flag names)
    torchrun --nproc_per_node 2 -m glmkit.commands.finetune --method full ...   (FSDP; gloo on CPU)

Each flag is the FinetuneArgs field of the same name; glmkit.core.options generates the parser from the fields.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from glmkit.core import options
from glmkit.distributed.launch import end_worker
from glmkit.training.finetune import finetune
from glmkit.training.finetune_args import FinetuneArgs

PROG = "glmkit finetune"
# the flag groups of --help: a group starts at the field named
SECTIONS = {"do_train": "what to do", "model_name_or_path": "model", "train_file": "data (JSON Lines)",
            "output_dir": "training", "generation_max_length": "generation (--predict_with_generate; defaults as "
                                                               "main.py)",
            "stage": "alignment (--stage rm / dpo / grpo / pairs; docs/alignment.md)"}


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        FinetuneArgs, prog=PROG, sections=SECTIONS,
        description="Fine-tune a GLM-family model with ChatGLM-6B's ptuning/main.py arguments (train.sh works "
                    "with `python3 main.py` replaced by `glmkit finetune`). P-tuning v2 when --pre_seq_len is given, "
                    "full fine-tuning otherwise, LoRA with --method lora. Options may also come from a YAML file "
                    "(--config) and key=value overrides; flags win.")


def parse_args(argv: Sequence[str]) -> FinetuneArgs:
    """FinetuneArgs from the command line (exits with status 2 on a bad flag, value or missing required one)."""
    parser = build_parser()
    try:
        return options.parse(FinetuneArgs, parser, argv)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        finetune(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return end_worker(0, only_under_torchrun=True)


if __name__ == "__main__":
    sys.exit(cli_main())
