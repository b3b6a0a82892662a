"""`glmkit tokenizer`: glmkit.training.tokenizer.train_tokenizer (`tokenizer train`) from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Literal

from glmkit.commands.common import parse_options
from glmkit.core import options
from glmkit.core.options import option
from glmkit.training.tokenizer import train_tokenizer

TRAIN_HELP = "train a SentencePiece tokenizer in a ChatGLM family's file layout"


@dataclass(kw_only=True)
class TrainTokenizerOptions:
    input: list[str] = option(nargs="+", type=str, metavar="FILE",
                              help="training text: JSON Lines files with a 'text' field, or plain text files")
    vocab_size: int = option(help="size of the whole id space (len(tokenizer)), special and byte pieces included")
    family: Literal["chatglm", "chatglm2", "chatglm3"] = "chatglm"
    output: str = option(metavar="DIR", help="folder to write the tokenizer to")
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9995
    max_sentences: int = option(300_000, help="lines sampled from the inputs for training (keeps training fast)")
    seed: int = 0


def build_parser() -> argparse.ArgumentParser:
    """The `glmkit tokenizer` parser: its subcommands (each parsed by its own options parser)."""
    parser = argparse.ArgumentParser(prog="glmkit tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help=TRAIN_HELP, add_help=False)
    return parser


def build_train_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        TrainTokenizerOptions, prog="glmkit tokenizer train", dashes=True,
        description="Train a SentencePiece tokenizer (byte fallback, the family's special pieces) and write it in "
                    "the family's layout: ice_text.model + tokenizer_config.json (chatglm) or tokenizer.model + "
                    "tokenizer_config.json (chatglm2/chatglm3).")


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        build_parser().parse_args(argv)  # --help, or the error naming the subcommands
        return 2
    args = parse_options(TrainTokenizerOptions, build_train_parser(), argv[1:])
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.family, args.output, model_type=args.model_type,
                              character_coverage=args.character_coverage, max_sentences=args.max_sentences,
                              seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit tokenizer train: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {tok.family} tokenizer with {len(tok)} ids to {args.output}")
    return 0
