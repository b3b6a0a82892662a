"""`glmkit eval`: glmkit.evaluation.perplexity.perplexity_report (`eval ppl`) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmkit.core.tokenizer import load_tokenizer
from glmkit.evaluation.perplexity import perplexity_report, read_texts
from glmkit.loading.loader import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmkit eval", description="Evaluate a model.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="per-token loss and perplexity (plus per-character CE) on a text file",
                         description="Scores every document of --data as a continuation of tokenizer.encode('') "
                                     "(ChatGLM-6B: [gMASK] <sop>) and prints per-token loss, perplexity and "
                                     "per-character cross-entropy (nats).")
    ppl.add_argument("--model", default="glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
    ppl.add_argument("--data", required=True, help=".jsonl ({\"text\": ...} per line), .txt or a folder of them")
    ppl.add_argument("--key", default="text", help="JSON field holding the text (default text)")
    ppl.add_argument("--limit", type=int, help="score only the first N documents")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-tokens", type=int, help="cut documents to this many tokens (default: model max)")
    ppl.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    ppl.add_argument("--unigram-corpus", nargs="+", metavar="PATH",
                     help="also report a character unigram model fitted on these files/folders")
    ppl.add_argument("--json", metavar="FILE", help="write the numbers to this JSON file")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts = read_texts(args.data, args.key, args.limit)
        model = load_model(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit eval ppl: {e}", file=sys.stderr)
        return 2
    model.eval()
    out = {"model": str(args.model), "data": str(args.data),
           **perplexity_report(model, tokenizer, texts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                               unigram_corpus=args.unigram_corpus, key=args.key, progress=not args.no_progress)}
    print(f"documents {out['documents']}  tokens {out['tokens']}  characters {out['characters']}")
    print(f"per-token loss {out['token_loss']:.4f} nats  perplexity {out['perplexity']:.2f}")
    print(f"per-character cross-entropy {out['char_ce']:.4f} nats/char")
    if "unigram_char_ce" in out:
        print(f"character unigram CE {out['unigram_char_ce']:.4f} nats/char  ->  model is "
              f"{100 * out['reduction_vs_unigram']:.1f}% lower")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
