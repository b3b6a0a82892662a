"""`glmkit chat`: glmkit.serving.terminal.TerminalChat on a model loaded from the command line."""

from __future__ import annotations

import argparse
import sys

from glmkit.commands.common import add_model_arguments, load_from_args
from glmkit.loading.checkpoint_ops import model_name
from glmkit.serving.terminal import COMMANDS_HELP, TerminalChat
from glmkit.serving.toolbox import Toolbox


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmkit chat",
        description="Chat with a GLM model in the terminal; the answer is streamed as it is generated. "
                    f"Commands: {COMMANDS_HELP}. Through a pipe (stdin not a terminal) each input line gets its "
                    "answer, ended by a newline, with no prompts on stdout.",
    )
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt (families with a system role: ChatGLM3, GLM-4)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per turn, prompt and history included; the oldest turns are dropped to "
                             "fit (default: the family's, 2048 for ChatGLM-6B; capped at the model's context)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="most tokens per answer (default: whatever max-length leaves)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature; 0 = greedy (default: the family's chat default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the family's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the answer before TEXT (repeatable)")
    parser.add_argument("--presence-penalty", type=float, default=None,
                        help="OpenAI's presence penalty, -2..2 (default 0)")
    parser.add_argument("--frequency-penalty", type=float, default=None,
                        help="OpenAI's frequency penalty, -2..2 (default 0)")
    parser.add_argument("--tools", default=None, metavar="FILE.py",
                        help="Python functions the model may call (ChatGLM3, GLM-4): the public functions of FILE.py "
                             "(or its TOOLS list), described by their signatures and docstrings; each call is shown, "
                             "run, and its result fed back")
    parser.add_argument("--no-thinking", dest="thinking", action="store_const", const=False, default=None,
                        help="switch thinking off (GLM-4.5/4.6/4.7: /nothink and an empty <think></think>)")
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
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
