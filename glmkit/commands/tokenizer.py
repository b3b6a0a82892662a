"""`glmkit tokenizer`: glmkit.training.tokenizer.train_tokenizer (`tokenizer train`) from the command line."""

from __future__ import annotations

import argparse
import sys

from glmkit.training.tokenizer import train_tokenizer


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmkit tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece tokenizer in a ChatGLM family's file layout",
                        description="Train a SentencePiece tokenizer (byte fallback, the family's special pieces) "
                                    "and write it in the family's layout: ice_text.model + tokenizer_config.json "
                                    "(chatglm) or tokenizer.model + tokenizer_config.json (chatglm2/chatglm3).")
    tr.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="training text: JSON Lines files with a 'text' field, or plain text files")
    tr.add_argument("--vocab-size", type=int, required=True,
                    help="size of the whole id space (len(tokenizer)), special and byte pieces included")
    tr.add_argument("--family", choices=["chatglm", "chatglm2", "chatglm3"], default="chatglm")
    tr.add_argument("--output", required=True, metavar="DIR", help="folder to write the tokenizer to")
    tr.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tr.add_argument("--character-coverage", type=float, default=0.9995)
    tr.add_argument("--max-sentences", type=int, default=300_000,
                    help="lines sampled from the inputs for training (keeps training fast)")
    tr.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.family, args.output, model_type=args.model_type,
                              character_coverage=args.character_coverage, max_sentences=args.max_sentences,
                              seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit tokenizer train: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {tok.family} tokenizer with {len(tok)} ids to {args.output}")
    return 0
