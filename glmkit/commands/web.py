"""`glmkit web`: glmkit.serving.web.launch on a model loaded from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from glmkit.commands.common import ModelOptions, load_from_args, parse_options
from glmkit.core import options
from glmkit.core.extras import require_extra
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import model_name
from glmkit.serving.toolbox import Toolbox
from glmkit.serving.web import launch


@dataclass(kw_only=True)
class WebOptions(ModelOptions):
    host: str = option("127.0.0.1", help="address to bind (default 127.0.0.1)")
    port: int = option(7860, help="port (default 7860)")
    share: bool = option(False, help="also open a public gradio.live link (needs internet)")
    tools: str | None = option(None, metavar="FILE.py",
                               help="Python functions the model may call (ChatGLM3, GLM-4); calls and results are "
                                    "shown")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(WebOptions, prog="glmkit web", dashes=True,
                                description="Chat with a GLM model in the browser (Gradio), answers streamed.")


def cli_main(argv: list[str]) -> int:
    args = parse_options(WebOptions, build_parser(), argv)
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
