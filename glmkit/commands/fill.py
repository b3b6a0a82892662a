"""`glmkit fill`: glmkit.core.fill.fill on a text from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.fill import fill
from glmkit.core.options import option
from glmkit.core.tokenizer import load_tokenizer
from glmkit.loading.loader import load_model


@dataclass(kw_only=True)
class FillOptions:
    text: str = option(positional=True, help="text with [MASK] / [sMASK] / [gMASK] blanks")
    model: str = option("glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
    max_new_tokens: int | None = option(None, help="limit per blank, [gMASK] included (default: 64, and 128 for a "
                                                   "[gMASK] blank)")
    gmask_max_new_tokens: int | None = option(None, help="a separate limit for [gMASK] blanks (default: "
                                                         "--max-new-tokens)")
    do_sample: bool = option(False, help="sample instead of greedy decoding")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = option(None, help="random seed for sampling")
    dtype: str | None = option(None, help="float32, bfloat16 or float16 (default: the checkpoint's on GPU, float32 "
                                          "on CPU)")
    show_blanks: bool = option(False, help="also print each blank's answer on its own line")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        FillOptions, prog="glmkit fill", dashes=True,
        description="Fill [MASK] (a span), [sMASK] (a sentence) and [gMASK] (the rest of the text) blanks, left "
                    "to right. A text without blanks is continued.",
        epilog='example: glmkit fill "床前明月[MASK]，疑是地上霜。"')


def cli_main(argv: list[str]) -> int:
    args = parse_options(FillOptions, build_parser(), argv)
    try:
        model = load_model(args.model, dtype=args.dtype or "float32")
        tokenizer = load_tokenizer(args.model)
        model.eval()
        result = fill(model, tokenizer, args.text, max_new_tokens=args.max_new_tokens,
                      gmask_max_new_tokens=args.gmask_max_new_tokens, do_sample=args.do_sample,
                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      repetition_penalty=args.repetition_penalty, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit fill: {e}", file=sys.stderr)
        return 2
    print(result.text)
    if args.show_blanks:
        for i, ans in enumerate(result.answers, 1):
            print(f"[{i}] {ans}")
    return 0
