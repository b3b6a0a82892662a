"""`glmkit chat`: glmkit.serving.terminal.TerminalChat on a model loaded from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from glmkit.commands.common import ModelOptions, load_from_args, parse_options
from glmkit.core import options
from glmkit.core.options import option
from glmkit.loading.checkpoint_ops import model_name
from glmkit.serving.terminal import COMMANDS_HELP, TerminalChat
from glmkit.serving.toolbox import Toolbox


@dataclass(kw_only=True)
class ChatOptions(ModelOptions):
    system: str | None = option(None, help="system prompt (families with a system role: ChatGLM3, GLM-4)")
    max_length: int | None = option(None, help="most tokens per turn, prompt and history included; the oldest turns "
                                               "are dropped to fit (default: the family's, 2048 for ChatGLM-6B; "
                                               "capped at the model's context)")
    max_new_tokens: int | None = option(None, help="most tokens per answer (default: whatever max-length leaves)")
    temperature: float | None = option(None, help="sampling temperature; 0 = greedy (default: the family's chat "
                                                  "default)")
    top_p: float | None = option(None, help="nucleus sampling mass (default: the family's)")
    seed: int | None = option(None, help="random seed, for reproducible sampling")
    stop: list[str] | None = option(None, action="append", metavar="TEXT",
                                    help="end the answer before TEXT (repeatable)")
    presence_penalty: float | None = option(None, help="OpenAI's presence penalty, -2..2 (default 0)")
    frequency_penalty: float | None = option(None, help="OpenAI's frequency penalty, -2..2 (default 0)")
    tools: str | None = option(None, metavar="FILE.py",
                               help="Python functions the model may call (ChatGLM3, GLM-4): the public functions of "
                                    "FILE.py (or its TOOLS list), described by their signatures and docstrings; each "
                                    "call is shown, run, and its result fed back")
    thinking: bool | None = option(None, flags=("--no-thinking",), action="store_const", const=False,
                                   help="switch thinking off (GLM-4.5/4.6/4.7: /nothink and an empty <think></think>)")


def build_parser() -> argparse.ArgumentParser:
    return options.build_parser(
        ChatOptions, prog="glmkit chat", dashes=True,
        description="Chat with a GLM model in the terminal; the answer is streamed as it is generated. "
                    f"Commands: {COMMANDS_HELP}. Through a pipe (stdin not a terminal) each input line gets its "
                    "answer, ended by a newline, with no prompts on stdout.",
    )


def cli_main(argv: list[str]) -> int:
    args = parse_options(ChatOptions, build_parser(), argv)
    for flag in ("max_length", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            print(f"glmkit chat: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}",
                  file=sys.stderr)
            return 2
    if args.temperature is not None and args.temperature < 0:
        print(f"glmkit chat: --temperature must be >= 0, got {args.temperature}", file=sys.stderr)
        return 2
    if args.top_p is not None and not 0 < args.top_p <= 1:
        print(f"glmkit chat: --top-p must be in (0, 1], got {args.top_p}", file=sys.stderr)
        return 2
    for flag in ("presence_penalty", "frequency_penalty"):
        value = getattr(args, flag)
        if value is not None and not -2 <= value <= 2:
            print(f"glmkit chat: --{flag.replace('_', '-')} must be between -2 and 2, got {value}", file=sys.stderr)
            return 2
    if args.stop is not None and not all(args.stop):
        print("glmkit chat: --stop takes a non-empty text", file=sys.stderr)
        return 2
    try:  # a bad tools file is reported before the (slow) model load
        toolbox = Toolbox.from_file(args.tools) if args.tools else None
    except ValueError as err:
        print(f"glmkit chat: --tools: {err}", file=sys.stderr)
        return 2
    try:
        loaded = load_from_args("glmkit chat", args)
    except KeyboardInterrupt:
        return 130
    if loaded is None:
        return 1
    model, tokenizer = loaded
    try:
        chat = TerminalChat(model, tokenizer, model_name(args.model), system=args.system,
                            max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            tools=toolbox, stop=args.stop,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            thinking=args.thinking)
    except ValueError as err:
        print(f"glmkit chat: {err}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        return chat.run_interactive()
    return chat.run_pipe()


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
