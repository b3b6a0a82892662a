"""`glmkit generate`: glmkit.core.generate.generate_stream on a prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from glmkit.commands.common import ModelOptions, load_from_args, parse_options
from glmkit.core import options
from glmkit.core.chat import family_of, find_stop, partial_stop, stop_token_ids
from glmkit.core.generate import generate_stream
from glmkit.core.options import option


@dataclass(kw_only=True)
class GenerateOptions(ModelOptions):
    prompt: str = option(positional=True, help="the text to continue")
    max_new_tokens: int = 128
    temperature: float = option(0.8, help="0 = greedy")
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = option(0.0, help="OpenAI's presence penalty, -2..2")
    frequency_penalty: float = option(0.0, help="OpenAI's frequency penalty, -2..2")
    stop: list[str] = option(default_factory=list, action="append", metavar="TEXT",
                             help="end the text before TEXT (repeatable); generation also ends at the family's stop "
                                  "tokens (GLM-4: <|endoftext|>, <|user|>, <|observation|>)")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(GenerateOptions, prog="glmkit generate", dashes=True,
                                description="Generate a continuation of PROMPT, streaming it to stdout. For chat "
                                            "models prefer `glmkit chat`.")


def cli_main(argv: list[str]) -> int:
    args = parse_options(GenerateOptions, build_parser(), argv)
    for flag in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(args, flag) <= 2:
            print(f"glmkit generate: --{flag.replace('_', '-')} must be between -2 and 2", file=sys.stderr)
            return 2
    if not all(args.stop):
        print("glmkit generate: --stop takes a non-empty text", file=sys.stderr)
        return 2

    loaded = load_from_args("glmkit generate", args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    stops = stop_token_ids(model, tokenizer, family_of(tokenizer))
    ids = tokenizer.encode(args.prompt)
    out: list[int] = []
    printed = ""
    for tok in generate_stream(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                               do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                               top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                               presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                               eos_token_id=stops, seed=args.seed):
        if int(tok[0]) in stops:
            break
        out.append(int(tok[0]))
        text = tokenizer.decode(out)
        cut = find_stop(text, args.stop)
        if cut is not None:
            sys.stdout.write(text[len(printed):cut] + "\n")  # (a stop string's start is never printed early)
            return 0
        text = text[: len(text) - partial_stop(text, args.stop)]
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    text = tokenizer.decode(out)
    sys.stdout.write(text[len(printed):] + "\n")
    return 0
