"""`glmkit serve`: glmkit.serving.openai_api.serve on a model loaded from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from glmkit.commands.common import add_model_arguments, load_from_args
from glmkit.loading.tools import model_name
from glmkit.serving.openai_api import MAX_BATCH_SIZE, MAX_BODY_BYTES, MAX_QUEUE, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmkit serve",
        description="Serve a GLM model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/models, "
                    "ChatGLM-6B's POST / and GET /health.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get("GLMKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $GLMKIT_API_KEY; unset = no key)")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                        help=f"most requests decoded together (default {MAX_BATCH_SIZE})")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                        help=f"most requests waiting before new ones get 503 (default {MAX_QUEUE})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body accepted (default {MAX_BODY_BYTES})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("port", "max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            print(f"glmkit serve: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    loaded = load_from_args("glmkit serve", args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    serve(model, tokenizer, model_name(args.model), args.host, args.port, api_key=args.api_key,
          max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
