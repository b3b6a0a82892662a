"""`glmkit convert`: glmkit.core.sat.convert_sat_checkpoint from the command line."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Literal

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.checkpoint import as_dtype
from glmkit.core.options import option
from glmkit.core.sat import convert_sat_checkpoint


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    unit = (m.group(2) or "b").rstrip("b").replace("i", "")
    value = float(m.group(1)) * 1024 ** " kmgt".index(unit or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


@dataclass(kw_only=True)
class ConvertOptions:
    src: str = option(positional=True, metavar="SRC", help="the SAT checkpoint folder")
    dst: str = option(positional=True, metavar="DST", help="output folder")
    max_shard_size: int = option(parse_size("2GB"), parse=parse_size,
                                 help="largest output file (default 2GB; e.g. 500MB)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(None, help="cast floating-point weights "
                                                                                "(default: keep the checkpoint's)")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        ConvertOptions, prog="glmkit convert", dashes=True,
        description="Merge a GLM-130B SwissArmyTransformer checkpoint (SRC: `latest` + <iteration>/mp_rank_XX_"
                    "model_states.pt, any tensor-parallel degree, float or quantized by GLM-130B's convert_tp.py) "
                    "into DST: config.json + sharded model-XXXXX-of-YYYYY.safetensors (SAT's tensor names) that "
                    "glmkit.load_model(DST) reads directly. Reads one layer at a time: peak memory is one layer's "
                    "shards plus the output shard being filled.")


def cli_main(argv: list[str]) -> int:
    args = parse_options(ConvertOptions, build_parser(), argv)
    try:
        out = convert_sat_checkpoint(args.src, args.dst, max_shard_bytes=args.max_shard_size,
                                     dtype=as_dtype(args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"glmkit convert: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
