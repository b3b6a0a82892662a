"""`glmkit chat`: chat with a model in the terminal, the answer streamed as it is generated.

Interactive (stdin is a terminal): a welcome line names the model and the commands; `clear` empties the history,
`stop` or Ctrl-D quits, Ctrl-C interrupts the current answer and keeps the chat going.
Through a pipe (stdin is not a terminal): each input line gets its answer on stdout, ended by a newline (the answer
itself is not altered, so a multi-line answer stays multi-line), with no prompts or decoration; the welcome line goes
to stderr. `clear` and `stop` work there too.

Also home to the small helpers the other front doors (serve.py, web.py) share: loading a model for chat and
turning a growing answer into appendable pieces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

DEFAULT_MODEL = "glm-tiny"
COMMANDS_HELP = "'clear' empties the history, 'stop' or Ctrl-D quits, Ctrl-C interrupts an answer"


# ---------------------------------------------------------------------------------------------- shared helpers
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every front door takes."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a model folder, a Hugging Face id, or 'glm-tiny' (the bundled model; the default)")
    parser.add_argument("--quantize", choices=("int4", "int8"), default=None,
                        help="weight-only quantization applied while loading")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA or P-tuning adapter folder to load on top of the model")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")


def model_name(path_or_id: str) -> str:
    """The name shown to users and returned by the API: the bundled name, a hub id, or a folder's name."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path.resolve().name or str(path)
    return path_or_id


def load_chat_model(path_or_id: str = DEFAULT_MODEL, *, quantize: str | None = None, adapter: str | None = None,
                    device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) ready for chat; the tokenizer always comes from the base model."""
    import torch

    from glmkit import load_model, load_tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path_or_id, device=device, adapter=adapter, quantize=quantize)
    model.eval()
    tokenizer = load_tokenizer(path_or_id)
    return model, tokenizer


def load_from_args(prog: str, args: argparse.Namespace) -> tuple[Any, Any] | None:
    """load_chat_model from the add_model_arguments options; None (after a one-line error on stderr) when the
    model cannot be loaded, so every front door fails the same way."""
    try:
        return load_chat_model(args.model, quantize=args.quantize, adapter=args.adapter, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"{prog}: cannot load {args.model!r}: {err}", file=sys.stderr)
        return None


def context_length(model: Any) -> int:
    """The most tokens (prompt + answer) the model takes."""
    return int(model.config.max_seq_len)


def response_text(response: Any) -> str:
    """chat()'s response as text: ChatGLM3/GLM-4 give a dict when the answer's metadata line is not empty (a tool
    call); it is shown the way the model wrote it, metadata line first."""
    if isinstance(response, str):
        return response
    if isinstance(response, dict):
        body = response.get("content")
        if body is None:
            body = json.dumps(response.get("parameters", {}), ensure_ascii=False)
        return f"{response.get('name', '')}\n{body}"
    return str(response)


# A growing answer can still change at its end: an incomplete UTF-8 sequence decodes as U+FFFD, trailing spaces
# are stripped, and ChatGLM's post-processing widens a half-width mark once a CJK character follows it. Holding
# those back makes every emitted piece final, so the pieces always add up to the finished answer.
_UNSTABLE_TAIL = set(" \t\r\n\ufffd,!:;?")


class TextDelta:
    """Turns successive versions of an answer (the full text so far) into pieces that only ever append."""

    def __init__(self) -> None:
        self.sent = ""

    def update(self, text: str) -> str:
        end = len(text)
        while end > len(self.sent) and text[end - 1] in _UNSTABLE_TAIL:
            end -= 1
        return self._emit(text[:end])

    def finish(self, text: str) -> str:
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""  # nothing new (or an earlier piece changed: it was already shown, so keep going)
        piece = text[len(self.sent):]
        self.sent = text
        return piece


# ---------------------------------------------------------------------------------------------- the chat loop
class TerminalChat:
    """One chat session: the history, the generation settings, and the printing."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, system: str | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, out: TextIO = sys.stdout) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.history: list = []
        self.out = out
        # unset options keep the family's chat defaults (max_length is capped at the model's context by chat())
        self.gen_kwargs: dict[str, Any] = {}
        if max_length is not None:
            self.gen_kwargs["max_length"] = max_length
        if max_new_tokens is not None:
            self.gen_kwargs["max_new_tokens"] = max_new_tokens
        if system is not None:
            from glmkit.chat import build_chat_input

            build_chat_input(tokenizer, "", [], system=system)  # a family without a system role fails here, early
            self.gen_kwargs["system"] = system
        if temperature is not None:
            if temperature == 0:
                self.gen_kwargs["do_sample"] = False  # temperature 0 means greedy
            else:
                self.gen_kwargs["temperature"] = temperature
        if top_p is not None:
            self.gen_kwargs["top_p"] = top_p
        if seed is not None:
            self.gen_kwargs["seed"] = seed

    def welcome(self) -> str:
        return f"glmkit chat with {self.name}: type a message and press Enter; {COMMANDS_HELP}."

    def answer(self, query: str) -> bool:
        """Streams one answer to `out`; False when Ctrl-C interrupted it (the partial answer stays in history)."""
        delta = TextDelta()
        response, history = "", self.history
        kwargs = dict(self.gen_kwargs)
        if self.history:
            kwargs.pop("system", None)  # the first turn put it into the history (ChatGLM3/GLM-4 role messages)
        stream = self.model.stream_chat(self.tokenizer, query, history=self.history, **kwargs)
        try:
            for response, history in stream:
                self._write(delta.update(response_text(response)))
            self._write(delta.finish(response_text(response)))
            self.history = history
            return True
        except KeyboardInterrupt:
            stream.close()
            self._write(delta.finish(response_text(response)))
            self._write(" [interrupted]")
            if response:
                self.history = history  # keep what was shown, so "go on" can continue it
            return False
        except ValueError as err:  # e.g. a query too long for max_length: say so and keep chatting
            self._write(f"[error: {err}]")
            return True

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def run_interactive(self, stdin: TextIO = sys.stdin) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(self.welcome(), file=self.out, flush=True)
        while True:
            try:
                query = input("\nYou: ").strip()
            except EOFError:
                print(file=self.out)
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl-C interrupts an answer; type 'stop' or press Ctrl-D to quit)", file=self.out)
                continue
            if not query:
                continue
            if query == "stop":
                return 0
            if query == "clear":
                self.history = []
                print("History cleared.", file=self.out, flush=True)
                continue
            self._write(f"\n{self.name}: ")
            self.answer(query)
            self._write("\n")

    def run_pipe(self, stdin: TextIO = sys.stdin) -> int:
        """One answer per input line, nothing else on stdout."""
        print(self.welcome(), file=sys.stderr, flush=True)
        try:
            for line in stdin:
                query = line.strip()
                if not query:
                    continue
                if query == "stop":
                    break
                if query == "clear":
                    self.history = []
                    continue
                if not self.answer(query):
                    self._write("\n")
                    return 130
                self._write("\n")
        except KeyboardInterrupt:
            return 130
        return 0


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
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        print(f"glmkit chat: {err}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        return chat.run_interactive()
    return chat.run_pipe()


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
