"""Chat with a model in the terminal, the answer streamed as it is generated (`glmkit chat` runs this).

Interactive (stdin is a terminal): a welcome line names the model and the commands; `clear` empties the history,
`stop` or Ctrl-D quits, Ctrl-C interrupts the current answer and keeps the chat going.
Through a pipe (stdin is not a terminal): each input line gets its answer on stdout, ended by a newline (the answer
itself is not altered, so a multi-line answer stays multi-line), with no prompts or decoration; the welcome line goes
to stderr. `clear` and `stop` work there too.

With tools (`glmkit chat --tools FILE.py`, glmkit.serving.toolbox; ChatGLM3 and GLM-4): each call the model makes
is shown as `[tool call] name({...})`, run, and its result shown as `[tool result] ...` and fed back to the model,
until it answers in text (at most 5 calls in a row). Through a pipe those lines go to stderr.

Reasoning models (GLM-4.5/4.6/4.7, GLM-Z1): the reasoning streams first, after `[thinking] `, then the answer on a
new line; through a pipe the reasoning goes to stderr. `thinking=False` (`glmkit chat --no-thinking`) switches
GLM-4.5's thinking off.

From Python: `TerminalChat(model, tokenizer, "name").run_pipe(sys.stdin)` (or `.run_interactive()`, `.answer(q)`).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from glmkit.core.chat import TextDelta, build_chat_input, response_text
from glmkit.serving.toolbox import Toolbox, chat_with_tools, check_family, describe_call

COMMANDS_HELP = "'clear' empties the history, 'stop' or Ctrl-D quits, Ctrl-C interrupts an answer"


# ---------------------------------------------------------------------------------------------- the chat loop
class TerminalChat:
    """One chat session: the history, the generation settings, and the printing."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, system: str | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, out: TextIO = sys.stdout,
                 tools: Toolbox | None = None, stop: list[str] | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, thinking: bool | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.history: list = []
        self.out = out
        self.tools = tools
        self.tool_out: TextIO = out  # where tool calls and results are shown (stderr through a pipe)
        if tools is not None:
            check_family(tokenizer)
        # unset options keep the family's chat defaults (max_length is capped at the model's context by chat())
        self.gen_kwargs: dict[str, Any] = {}
        if max_length is not None:
            self.gen_kwargs["max_length"] = max_length
        if max_new_tokens is not None:
            self.gen_kwargs["max_new_tokens"] = max_new_tokens
        if system is not None:
            build_chat_input(tokenizer, "", [], system=system)  # a family without a system role fails here, early
            self.gen_kwargs["system"] = system
        if temperature is not None:
            if temperature == 0:
                self.gen_kwargs["do_sample"] = False  # temperature 0 means greedy
            else:
                self.gen_kwargs["temperature"] = temperature
        if top_p is not None:
            self.gen_kwargs["top_p"] = top_p
        if thinking is not None:
            build_chat_input(tokenizer, "", [], enable_thinking=thinking)  # fails early for a family without it
            self.gen_kwargs["enable_thinking"] = thinking
        if seed is not None:
            self.gen_kwargs["seed"] = seed
        if stop:
            self.gen_kwargs["stop"] = list(stop)
        for key, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if value is not None:
                self.gen_kwargs[key] = value

    def welcome(self) -> str:
        return f"glmkit chat with {self.name}: type a message and press Enter; {COMMANDS_HELP}."

    def answer(self, query: str) -> bool:
        """Streams one answer to `out` (running tool calls, if any); False when Ctrl-C interrupted it (the partial
        answer stays in history)."""
        delta, thought = TextDelta(), TextDelta()
        response, history = "", self.history
        kwargs = dict(self.gen_kwargs)
        if self.history:
            kwargs.pop("system", None)  # the first turn put it into the history (ChatGLM3/GLM-4 role messages)
        events = chat_with_tools(self.model, self.tokenizer, query, self.history, self.tools, **kwargs)
        try:
            for kind, value, history in events:
                if kind == "answer":
                    response = value
                    self._think(thought, history, bool(value))
                    if isinstance(value, str):  # a call (a dict) is shown once it is complete
                        self._write(delta.update(value))
                    continue
                self._write(delta.finish(response) if isinstance(response, str) else "")
                delta, thought = TextDelta(), TextDelta()
                if kind == "call":
                    self._tool_line(f"[tool call] {describe_call(value)}")
                elif kind == "result":
                    self._tool_line(f"[tool result] {value[1]}")
                else:
                    self._tool_line(f"[stopped after {value} tool calls in a row]")
                response = ""
            self._write(delta.finish(response) if isinstance(response, str) else response_text(response))
            self.history = history
            return True
        except KeyboardInterrupt:
            events.close()
            self._write(delta.finish(response_text(response)))
            self._write(" [interrupted]")
            if response:
                self.history = history  # keep what was shown, so "go on" can continue it
            return False
        except ValueError as err:  # e.g. a query too long for max_length: say so and keep chatting
            self._write(f"[error: {err}]")
            return True

    def _think(self, thought: TextDelta, history: list, answering: bool) -> None:
        """Shows the reasoning of the answer being written (history's last message) as it grows; once the reply
        begins, the reasoning is finished and closed with a newline (thought.sent then ends in "\0")."""
        last = history[-1] if history else None
        reasoning = last.get("reasoning_content") if isinstance(last, dict) else None
        if not reasoning or thought.sent.endswith("\0"):
            return
        started = bool(thought.sent)
        piece = thought.finish(reasoning) if answering else thought.update(reasoning)
        text = ("" if started or not piece else "[thinking] ") + piece
        if answering:
            text += "\n"
            thought.sent += "\0"
        if not text:
            return
        if self.tool_out is self.out:
            self._write(text)
        else:
            print(text, end="", file=self.tool_out, flush=True)

    def _tool_line(self, line: str) -> None:
        if self.tool_out is self.out:
            self._write("\n" + line + "\n")
        else:
            print(line, file=self.tool_out, flush=True)

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
        """One answer per input line, nothing else on stdout (tool calls and results go to stderr)."""
        print(self.welcome(), file=sys.stderr, flush=True)
        self.tool_out = sys.stderr
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
