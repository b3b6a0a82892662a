"""`glmkit generate`: glmkit.core.generate.generate_stream on a prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

import torch

from glmkit.commands.common import add_model_arguments, load_from_args
from glmkit.core.generate import generate_stream


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="glmkit generate", description="Generate a continuation of PROMPT, "
                                     "streaming it to stdout. For chat models prefer `glmkit chat`.")
    parser.add_argument("prompt", help="the text to continue")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    loaded = load_from_args("glmkit generate", args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    ids = tokenizer.encode(args.prompt)
    out: list[int] = []
    printed = ""
    for tok in generate_stream(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                               do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                               top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                               seed=args.seed):
        if int(tok[0]) in model.config.eos_token_ids:
            break
        out.append(int(tok[0]))
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(out)[len(printed):] + "\n")
    return 0
