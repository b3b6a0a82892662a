"""`glmkit bench`: glmkit.evaluation.bench.run_benchmark, printed as one table."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Literal

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.options import option
from glmkit.evaluation.bench import PRECISIONS, format_table, run_benchmark


@dataclass(kw_only=True)
class BenchOptions:
    layers: int = option(28, help="transformer layers (28 = full ChatGLM-6B; bf16 needs ~12 GB at 28, fewer layers "
                                  "run faster and in less memory)")
    prompt_tokens: int = option(128, help="prompt length for prefill (default 128)")
    decode_tokens: int = option(16, help="decode steps timed (default 16)")
    threads: int | None = option(None, help="torch threads (default: torch's default)")
    precisions: str = option(",".join(PRECISIONS), help="comma-separated subset of bf16,int8,int4 (default all)")
    group_size: int | None = option(None, help="INT4 group size (default: glmkit's)")
    model: str = option("chatglm-6b", help="preset shape (default chatglm-6b)")
    head: Literal["int8", "int4", "none"] | None = option(
        None, help="output layer / embedding of the int8 and int4 runs (default as load_model: floating point for "
                   "int8, int8 for int4)")
    repeats: int = option(1, help="rounds over all precisions, interleaved; each figure is its best round (on a "
                                  "shared machine, 2-3 rounds steady the ratios; default 1)")
    json: bool = option(False, help="print the results as JSON after the table")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        BenchOptions, prog="glmkit bench", dashes=True,
        description="Prefill/decode tokens per second and peak RSS of bf16, INT8 and INT4 at the ChatGLM-6B shape "
                    "(random weights, batch 1), beside the memory-bandwidth roofline measured in the same run.")


def cli_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parse_options(BenchOptions, parser, argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    try:
        bandwidth, results = run_benchmark(precisions, layers=args.layers, prompt_tokens=args.prompt_tokens,
                                           decode_tokens=args.decode_tokens, group_size=args.group_size,
                                           threads=args.threads, model=args.model, repeats=args.repeats,
                                           head=args.head)
    except ValueError as e:
        parser.error(str(e))
    except RuntimeError as e:
        print(f"glmkit bench: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} shape, {args.layers} layers, batch 1, {args.prompt_tokens}-token prompt, "
          f"{args.decode_tokens} decode steps, {results[0]['threads']} threads, "
          + (f"best of {args.repeats} interleaved rounds, " if args.repeats > 1 else "")
          + f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(format_table(results, bandwidth))
    if args.json:
        print(json.dumps({"bandwidth": bandwidth, "results": results}, indent=2))
    return 0
