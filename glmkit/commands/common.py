"""What the commands share: the model options of the front doors (generate, chat, serve, web) as one dataclass that
each command's options extend, loading the model from them, and parsing a command's options with
glmkit.core.options (flags, `--config FILE.yaml`, `key=value` overrides)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from glmkit.core import options
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import DEFAULT_MODEL, load_chat_model

T = TypeVar("T")


@dataclass(kw_only=True)
class ModelOptions:
    """The model options every front door takes."""

    model: str = option(DEFAULT_MODEL, help="a model folder, a Hugging Face id, or 'glm-tiny' (the bundled model; "
                                            "the default)")
    quantize: Literal["int4", "int8"] | None = option(None, help="weight-only quantization applied while loading")
    adapter: str | None = option(None, metavar="DIR",
                                 help="a LoRA or P-tuning adapter folder to load on top of the model")
    device: str | None = option(None, help="torch device (default: cuda when available, else cpu)")


def parse_options(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str]) -> T:
    """`cls` from the command line of an options.build_parser parser; a bad value, key or config file is a usage
    error (status 2), as a bad flag is."""
    try:
        return options.parse(cls, parser, argv)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


def load_from_args(prog: str, args: ModelOptions) -> tuple[Any, Any] | None:
    """load_chat_model from the ModelOptions; None (after a one-line error on stderr) when the model cannot be
    loaded, so every front door fails the same way."""
    try:
        return load_chat_model(args.model, quantize=args.quantize, adapter=args.adapter, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"{prog}: cannot load {args.model!r}: {err}", file=sys.stderr)
        return None
