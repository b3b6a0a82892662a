"""GLM-4.5/4.6/4.7 and GLM-Z1 answers: `<think>` reasoning, the reply, and XML tool calls, parsed as vLLM's glm45
reasoning parser and glm45 / glm47 tool parsers read them (vllm/reasoning/glm4_moe_reasoning_parser.py,
vllm/tool_parsers/glm4_moe_tool_parser.py).

An answer is `[<think>]reasoning</think>reply[<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...
</tool_call>...]`. The `<think>` may sit in the prompt (GLM-4.7's and GLM-Z1's generation prompt ends with it), so
text before `</think>` is reasoning whether or not the answer opened it. With thinking off the prompt ends in
`<think></think>` and the answer is the reply. Argument values are JSON (or Python literals) unless the tool's
schema says the parameter is a string; GLM-4.7 may write a call with no arguments as `<tool_call>name</tool_call>`.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*([^\n<]*?)\s*(?:\n|(?=<arg_key>)|(?=</tool_call>))(.*?)</tool_call>", re.DOTALL)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass
class ParsedAnswer:
    reasoning: str | None  # None: the answer has no reasoning part
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped, arguments as JSON text


def split_reasoning(text: str, thinking_open: bool = False) -> tuple[str | None, str]:
    """(reasoning, rest). thinking_open: the prompt ended inside `<think>` (the answer starts with reasoning)."""
    if THINK_CLOSE in text:
        head, _, rest = text.partition(THINK_CLOSE)
        return head.split(THINK_OPEN)[-1].strip("\n"), rest.lstrip("\n")
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):  # still thinking (or cut off while thinking)
        return stripped[len(THINK_OPEN):].lstrip("\n"), ""
    if thinking_open:
        return text.lstrip("\n"), ""
    return None, text


def _param_types(tools: Sequence[Any] | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        props = ((fn.get("parameters") or {}).get("properties") or {}) if isinstance(fn, dict) else {}
        out[str(fn.get("name"))] = {k: (v or {}).get("type", "") for k, v in props.items() if isinstance(v, dict)}
    return out


def _value(raw: str, kind: str) -> Any:
    if kind == "string":
        return raw
    for decode in (json.loads, ast.literal_eval):
        try:
            return decode(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return raw


def parse_tool_calls(text: str, tools: Sequence[Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(the text before the first call, OpenAI tool_calls) of a reply."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    types = _param_types(tools)
    calls = []
    for m in _CALL.finditer(text, start):
        name = m.group(1).strip()
        kinds = types.get(name, {})
        args = {k.strip(): _value(v.strip(), kinds.get(k.strip(), "")) for k, v in _ARG.findall(m.group(2))}
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return text[:start].rstrip(), calls


def parse_answer(text: str, tools: Sequence[Any] | None = None, thinking_open: bool = False, calls: bool = True,
                 partial: bool = False) -> ParsedAnswer:
    """calls=False: no tools were offered, so `<tool_call>` text stays in the reply (vLLM runs its tool parser only
    for requests with tools). partial: `text` is still growing, so a tag cut in the middle (`</thi`, `<tool_ca`)
    and a reply that may still open `<think>` are held back, as AnswerStream does."""
    reasoning, rest = split_reasoning(text, thinking_open)
    if partial and reasoning is not None and THINK_CLOSE not in text:
        reasoning = reasoning[:len(reasoning) - _partial_tail(reasoning, [THINK_CLOSE])]
    if partial and reasoning is None and THINK_OPEN.startswith(rest.lstrip()):
        rest = ""
    found: list[dict[str, Any]] = []
    if calls:
        rest, found = parse_tool_calls(rest, tools)
    if partial:
        rest = rest[:len(rest) - _partial_tail(rest, [CALL_OPEN] if calls else [])]
    return ParsedAnswer(reasoning, rest.strip(), found)


def _partial_tail(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of one of `tags` (held back while streaming)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class AnswerStream:
    """Streams an answer as OpenAI deltas: feed() the whole text so far, get (reasoning piece, content piece, calls
    completed since the last feed). A call is sent once its `</tool_call>` has arrived (as vLLM's glm45 parser
    buffers it); tags split across tokens are held back until they are whole."""

    def __init__(self, tools: Sequence[Any] | None = None, thinking_open: bool = False, calls: bool = True) -> None:
        self.tools, self.thinking_open, self.calls = tools, thinking_open, calls
        self.reasoning_sent, self.content_sent, self.calls_sent = "", "", 0

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, rest = split_reasoning(text, self.thinking_open)
        if reasoning is not None and THINK_CLOSE not in text and not final:
            reasoning = reasoning[:len(reasoning) - _partial_tail(reasoning, [THINK_CLOSE])]
        r_piece = ""
        if reasoning is not None and reasoning.startswith(self.reasoning_sent):
            r_piece, self.reasoning_sent = reasoning[len(self.reasoning_sent):], reasoning
        if reasoning is None and not final and THINK_OPEN.startswith(rest.lstrip()):
            rest = ""  # an answer that may still open <think>
        start = rest.find(CALL_OPEN) if self.calls else -1
        visible = rest if start < 0 else rest[:start]
        if start < 0 and not final and self.calls:
            visible = visible[:len(visible) - _partial_tail(visible, [CALL_OPEN])]
        if not self.content_sent:
            visible = visible.lstrip()
        visible = visible.rstrip()  # trailing whitespace waits: it may end the reply (stripped there)
        c_piece = ""
        if visible.startswith(self.content_sent):
            c_piece, self.content_sent = visible[len(self.content_sent):], visible
        calls = parse_tool_calls(rest, self.tools)[1] if start >= 0 else []
        new = calls[self.calls_sent:]
        self.calls_sent = len(calls)
        return r_piece, c_piece, new
