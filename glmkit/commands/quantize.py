"""`glmkit quantize`: glmkit.loading.checkpoint_ops.quantize_checkpoint from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import quantize_checkpoint
from glmkit.quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES, HEADS, SCHEMES, default_head, default_spec


@dataclass(kw_only=True)
class QuantizeOptions:
    src: str = option(positional=True, metavar="SRC", help="source checkpoint folder, bundled name or hub id")
    dst: str = option(positional=True, metavar="DST", help="output folder")
    bits: Literal[4, 8] = option(help="4 or 8")
    scheme: str | None = option(None, choices=SCHEMES,
                                help="rowwise = ChatGLM-6B's per-row absmax (INT8 default); group = group-wise INT4 "
                                     "(INT4 default, more accurate)")
    group_size: int | None = option(None, choices=GROUP_SIZES,
                                    help=f"inputs per scale for --scheme group (default {DEFAULT_GROUP_SIZE})")
    symmetric: bool = option(False, help="group scheme without zero points")
    head: str | None = option(None, choices=HEADS,
                              help="output layer and embedding: int8 (default with --bits 4: little error, half of "
                                   "bf16's bytes), int4 (group 32: fastest decode, about 2-4x the INT4 model's "
                                   "logits error on glm-tiny), none (floating point; default with --bits 8)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(
        None, help="dtype of the unquantized parts (default: the checkpoint's; with --calibrate, bfloat16 for a "
                   "float16 checkpoint)")
    calibrate: bool = option(False, help="quantize with GPTQ on calibration text")
    calibration_file: str | None = option(None, metavar="FILE", help="UTF-8 text to calibrate on (default: glmkit's "
                                                                     "bundled bilingual sample)")
    calibration_samples: int | None = option(None, metavar="N", help="token windows taken from the text (default 16)")
    calibration_length: int | None = option(None, metavar="T", help="tokens per window (default 256)")


SECTIONS = {"calibrate": (
    "calibration (GPTQ)", "Round with GPTQ on calibration text instead of to nearest: less error, same format "
    "and speed. Needs the float model in memory (a 6B model: ~12.5 GB in bf16) and time (a 6B model: ~50 min "
    "on 2 CPU cores).")}


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        QuantizeOptions, prog="glmkit quantize", dashes=True, sections=SECTIONS,
        description="Write an INT8/INT4 weight-only quantized copy of a checkpoint (config.json + model.safetensors "
                    "with the scheme in its metadata, plus the tokenizer files). The copy loads with "
                    "glmkit.load_model(DST) without quantizing again (memory-mapped). The output layer and the "
                    "embedding stay in floating point for --bits 8 (as the original's quantize(8)) and are INT8 "
                    "for --bits 4, unless --head says otherwise; norms and biases stay in "
                    "floating point.")


def cli_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parse_options(QuantizeOptions, parser, argv)
    try:
        spec = default_spec(args.bits, args.group_size, args.scheme, args.symmetric or None)
    except ValueError as e:
        parser.error(str(e))
    calibration = (args.calibration_file, args.calibration_samples, args.calibration_length)
    if not args.calibrate and any(v is not None for v in calibration):
        parser.error("the --calibration-* options need --calibrate")
    samples, length = args.calibration_samples or 16, args.calibration_length or 256
    if samples < 1 or length < 10:
        parser.error("--calibration-samples must be >= 1 and --calibration-length >= 10")
    try:
        text = Path(args.calibration_file).read_text(encoding="utf-8") if args.calibration_file else None
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"cannot read --calibration-file: {e}")
    out = quantize_checkpoint(args.src, args.dst, args.bits, group_size=args.group_size, scheme=args.scheme,
                              symmetric=args.symmetric, dtype=args.dtype, calibrate=args.calibrate,
                              calibration_text=text, calibration_samples=samples, calibration_length=length,
                              head=args.head)
    print(f"wrote {out} (INT{spec['bits']} {spec['scheme']}"
          + (f", group size {spec['group_size']}" if spec["group_size"] else "")
          + (", GPTQ-calibrated" if args.calibrate else "")
          + f", output layer {args.head or default_head(spec['bits'])})")
    return 0
