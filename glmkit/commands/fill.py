"""`glmkit fill`: glmkit.core.fill.fill on a text from the command line."""

from __future__ import annotations

import argparse
import sys

from glmkit.core.fill import fill
from glmkit.core.tokenizer import load_tokenizer
from glmkit.loading.loader import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmkit fill",
        description="Fill [MASK] (a span), [sMASK] (a sentence) and [gMASK] (the rest of the text) blanks, left "
                    "to right. A text without blanks is continued.",
        epilog='example: glmkit fill "床前明月[MASK]，疑是地上霜。"')
    p.add_argument("text", help="text with [MASK] / [sMASK] / [gMASK] blanks")
    p.add_argument("--model", default="glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="limit per blank, [gMASK] included (default: 64, and 128 for a [gMASK] blank)")
    p.add_argument("--gmask-max-new-tokens", type=int, default=None,
                   help="a separate limit for [gMASK] blanks (default: --max-new-tokens)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's on GPU, "
                                                 "float32 on CPU)")
    p.add_argument("--show-blanks", action="store_true", help="also print each blank's answer on its own line")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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
