"""What the model-serving commands (generate, chat, serve, web, fill) share: the model options and loading them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from glmkit.loading.checkpoint_ops import DEFAULT_MODEL, load_chat_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every front door takes."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a model folder, a Hugging Face id, or 'glm-tiny' (the bundled model; the default)")
    parser.add_argument("--quantize", choices=("int4", "int8"), default=None,
                        help="weight-only quantization applied while loading")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA or P-tuning adapter folder to load on top of the model")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")


def load_from_args(prog: str, args: argparse.Namespace) -> tuple[Any, Any] | None:
    """load_chat_model from the add_model_arguments options; None (after a one-line error on stderr) when the
    model cannot be loaded, so every front door fails the same way."""
    try:
        return load_chat_model(args.model, quantize=args.quantize, adapter=args.adapter, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"{prog}: cannot load {args.model!r}: {err}", file=sys.stderr)
        return None
