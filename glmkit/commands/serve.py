"""`glmkit serve`: glmkit.serving.openai_api.serve on a model loaded from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Literal

from glmkit.commands.common import ModelOptions, load_from_args, parse_options
from glmkit.core import options
from glmkit.core.extras import require_extra
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import model_name
from glmkit.serving.jobs import MAX_BATCH_SIZE, MAX_QUEUE
from glmkit.serving.protocol import MAX_BODY_BYTES
from glmkit.serving.scheduler import BLOCK_SIZE, MAX_BATCHED_TOKENS, PREFILL_CHUNK


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5G', '1048576' -> bytes (K/M/G/T: powers of 1000 with B, of 1024 with iB or alone)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MB, 1048576)")
    number, unit, suffix = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1000 if suffix.lower() == "b" and unit else 1024
    value = int(float(number) * base ** power)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return value


@dataclass(kw_only=True)
class ServeOptions(ModelOptions):
    host: str = option("127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    port: int = option(8000, help="port (default 8000)")
    api_key: str | None = option(default_factory=lambda: os.environ.get("GLMKIT_API_KEY"),
                                 help="require 'Authorization: Bearer KEY' on every route but /health "
                                      "(default: $GLMKIT_API_KEY; unset = no key)")
    max_batch_size: int = option(MAX_BATCH_SIZE, help=f"most requests decoded together (default {MAX_BATCH_SIZE})")
    max_queue: int = option(MAX_QUEUE, help=f"most requests waiting before new ones get 503 (default {MAX_QUEUE})")
    kv_cache_memory: int | None = option(None, parse=parse_bytes,
                                         help="memory of the paged KV cache, e.g. 2GiB or 512MB or bytes (default: "
                                              "half the free GPU memory, or a quarter of the available RAM, at most "
                                              "--max-batch-size contexts)")
    block_size: int = option(BLOCK_SIZE, help=f"tokens per KV cache block (default {BLOCK_SIZE})")
    prefill_chunk: int = option(PREFILL_CHUNK, help=f"most prompt tokens prefilled per decode step (default "
                                                    f"{PREFILL_CHUNK})")
    max_batched_tokens: int = option(MAX_BATCHED_TOKENS, help="most tokens one step computes, decode rows and prefill "
                                                              "together (vLLM's max_num_batched_tokens; default "
                                                              f"{MAX_BATCHED_TOKENS})")
    prefix_caching: bool = option(True, flags=("--no-prefix-cache",), action="store_false",
                                  help="do not keep prompts' KV blocks for later requests sharing their prefix")
    request_timeout: float | None = option(None, help="seconds a request may take, queueing included; past it: 504 "
                                                      "(default: no limit)")
    max_body_bytes: int = option(MAX_BODY_BYTES, help=f"largest request body accepted (default {MAX_BODY_BYTES})")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        ServeOptions, prog="glmkit serve", dashes=True,
        description="Serve a GLM model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/models, "
                    "ChatGLM-6B's POST / and GET /health.",
    )


def cli_main(argv: list[str]) -> int:
    args = parse_options(ServeOptions, build_parser(), argv)
    require_extra("serve")  # before the model load: a missing extra fails at once
    from glmkit.serving.openai_api import serve  # FastAPI and prometheus_client: the serve extra
    for name in ("port", "max_batch_size", "max_queue", "max_body_bytes", "block_size", "prefill_chunk",
                 "max_batched_tokens"):
        if getattr(args, name) < (0 if name == "port" else 1):
            print(f"glmkit serve: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    loaded = load_from_args("glmkit serve", args)
    if loaded is None:
        return 1
    if args.request_timeout is not None and args.request_timeout <= 0:
        print(f"glmkit serve: --request-timeout must be positive, got {args.request_timeout}", file=sys.stderr)
        return 2
    model, tokenizer = loaded
    try:
        serve(model, tokenizer, model_name(args.model), args.host, args.port, api_key=args.api_key,
              max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
              log_level=args.log_level, request_timeout=args.request_timeout, kv_cache_memory=args.kv_cache_memory,
              block_size=args.block_size, prefill_chunk=args.prefill_chunk, prefix_caching=args.prefix_caching,
              max_batched_tokens=args.max_batched_tokens)
    except ValueError as err:  # e.g. a KV cache too small for one context
        print(f"glmkit serve: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
