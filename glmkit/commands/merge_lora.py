"""`glmkit merge-lora`: glmkit.loading.loader.merge_lora_checkpoint from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glmkit.adapters.lora import ADAPTER_CONFIG
from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import merge_lora_checkpoint


@dataclass(kw_only=True)
class MergeLoraOptions:
    base: str = option(help="base model: a folder or a name such as glm-tiny")
    adapter: str = option(help="the LoRA adapter folder")
    output: str = option(help="folder for the merged model (created)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(None, help="dtype of the merged weights "
                                                                                "(default: the base's)")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        MergeLoraOptions, prog="glmkit merge-lora", dashes=True,
        description="Fold a LoRA adapter (adapter_config.json + adapter_model.safetensors, as written by "
                    "`glmkit finetune --method lora` or PEFT) into its base model and save the merged model.")


def cli_main(argv: Sequence[str] | None = None) -> int:
    args = parse_options(MergeLoraOptions, build_parser(), list(sys.argv[1:] if argv is None else argv))
    try:
        out = merge_lora_checkpoint(args.base, args.adapter, args.output, dtype=args.dtype)
    except FileNotFoundError as e:
        print(f"glmkit merge-lora: {e}", file=sys.stderr)
        return 2
    if not any(Path(out).glob("*.model")) and not (Path(out) / "tokenizer_config.json").exists():
        print(f"note: {args.base} has no tokenizer files; {out} holds only the merged weights", file=sys.stderr)
    info = json.loads((Path(args.adapter) / ADAPTER_CONFIG).read_text())
    print(f"merged LoRA (r={info.get('r')}, alpha={info.get('lora_alpha')}, targets={info.get('target_modules')}) "
          f"into {args.base} -> {out}")
    return 0
