"""`glmkit web`: glmkit.serving.web.launch on a model loaded from the command line."""

from __future__ import annotations

import argparse
import sys

from glmkit.commands.common import add_model_arguments, load_from_args
from glmkit.core.extras import require_extra
from glmkit.loading.checkpoint_ops import model_name
from glmkit.serving.toolbox import Toolbox
from glmkit.serving.web import launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit web",
                                     description="Chat with a GLM model in the browser (Gradio), answers streamed.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    parser.add_argument("--tools", default=None, metavar="FILE.py",
                        help="Python functions the model may call (ChatGLM3, GLM-4); calls and results are shown")
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_extra("web")  # before the model load: a missing extra fails at once
    try:  # a bad tools file is reported before the (slow) model load
        toolbox = Toolbox.from_file(args.tools) if args.tools else None
    except ValueError as err:
        print(f"glmkit web: --tools: {err}", file=sys.stderr)
        return 2
    loaded = load_from_args("glmkit web", args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    try:
        launch(model, tokenizer, model_name(args.model), args.host, args.port, args.share, tools=toolbox)
    except ValueError as err:  # a family without tool calling
        print(f"glmkit web: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
