"""The HTTP API's shapes: OpenAI-shaped errors, request bodies validated into prompt token ids and sampling settings,
and the model family's chat template both ways (messages -> prompt ids, answer tokens -> text or tool calls).

Validation is explicit, so every error names the field and what was wrong.

Tool calling (ChatGLM3, GLM-4): `tools` + `tool_choice` ("none" | "auto" | "required" | a named function) or the
legacy `functions` + `function_call`; messages may hold assistant `tool_calls` and `tool` results. The conversation
becomes the family's native prompt through the tokenizer's `apply_chat_template` (glmkit.core.chat_template / tools);
the answer is parsed with glmkit.core.tools.parse_tool_calls. With "auto" a call whose arguments do not parse is
answered as text (as THUDM's servers do); with "required" or a named function the answer is forced to begin with a
tool's name line (glmkit.core.tools.ForcedCall) and the call is returned even when its arguments are not valid JSON
(they come back as the model wrote them: validate them, as OpenAI advises).

Reasoning models (GLM-4.5/4.6/4.7 templates with XML calls, GLM-Z1 templates with `<think>`): the answer's
reasoning comes back as `reasoning_content` and GLM-4.5's `<tool_call>` blocks as `tool_calls`, parsed by
glmkit.core.reasoning as vLLM's glm45 reasoning and tool parsers do; `chat_template_kwargs` (e.g.
{"enable_thinking": false}, as vLLM takes it) reaches the template. Forcing a call ("required", a named function)
is not offered for XML calls (the forced name line is GLM-4's call format).
"""

from __future__ import annotations

import json
import math
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from glmkit.core import chat
from glmkit.core.chat import DEFAULTS, HF_DEFAULT_TOP_K, build_chat_input, family_of, fit_history
from glmkit.core.chat_template import answer_style, prompt_opens_thinking
from glmkit.core.reasoning import parse_answer, split_reasoning
from glmkit.core.tools import TOOL_FAMILIES, ToolError, parse_tool_calls, select_tools, tool_names, validate_tools

MAX_STOP_SEQUENCES = 4
MAX_N = 16  # most choices per request
MAX_TOP_LOGPROBS = 20
# ChatGLM-6B's api.py defaults for POST /
LEGACY_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class SamplingParams:
    """Everything that decides how one answer is decoded; the engine reads a request's settings only from here."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's, over the answer's own tokens (glmkit.core.generate)
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and the k most likely ones
    forced_tools: tuple[str, ...] | None = None  # the answer must begin with one of these tool names' call line

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share a batch; None runs alone. (logprobs and forced tool calls are per row
        and do not split batches.)"""
        penalties = (self.presence_penalty, self.frequency_penalty)
        if not self.do_sample:
            return ("greedy", *penalties)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k, *penalties)


def sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None,
             **extra: Any) -> SamplingParams:
    """Request settings -> SamplingParams as model.chat() would sample: temperature (or top_p) 0 is greedy, and
    sampling keeps the 50 most likely tokens first (transformers' top_k default, which ChatGLM's chat inherits).
    `extra`: the other SamplingParams fields (penalties, logprobs, forced_tools)."""
    if temperature == 0 or top_p == 0:
        return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, seed=seed, **extra)

    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                          top_k=HF_DEFAULT_TOP_K, seed=seed, **extra)


def call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


@dataclass
class Answer:
    """One finished choice: text, or tool calls ({"id", "type", "function": {"name", "arguments"}})."""

    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    reasoning: str | None = None  # reasoning models: the <think> part (None: the answer had none)


class ChatFormat:
    """The family's chat template for a model with `context` positions: conversation -> prompt ids, and answer
    tokens -> text as the family's chat() post-processes it."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer, self.context = tokenizer, context
        self.family = family_of(tokenizer)
        self.defaults = DEFAULTS[self.family]  # the family's chat temperature / top_p
        self.style = answer_style(tokenizer)  # "xml" (GLM-4.5), "think" (GLM-Z1) or None

    @property
    def has_tools(self) -> bool:
        return self.family in TOOL_FAMILIES

    def prompt_ids(self, query: str, history: list, system: str | None) -> list[int]:
        if system is not None and self.family in ("chatglm", "chatglm2"):
            # no system role in these families: fold it into the query, as ChatGLM2-6B's openai_api.py did
            query, system = f"{system}\n{query}", None
        try:
            ids = build_chat_input(self.tokenizer, query, history, system=system)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_prompt") from None
        return self._fits([int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)])

    def messages_ids(self, messages: list[dict], tools: list[dict] | None,
                     template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """ChatGLM3 / GLM-4: the prompt of OpenAI-shaped messages (and tools), through apply_chat_template."""
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools or None, **(template_kwargs or {}))
        except ToolError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_prompt") from None
        return self._fits([int(i) for i in ids])

    def _fits(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                                "(prompt and answer together). Shorten the messages.",
                           param="messages", code="context_length_exceeded")
        return ids

    def raw(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def tool_line(self, token_ids: list[int]) -> str | None:
        """ChatGLM3 / GLM-4: the answer's metadata line once it is complete ("" for a plain answer), else None."""
        text = self.tokenizer.decode(token_ids)
        return text.partition("\n")[0].strip() if "\n" in text else None

    def thinking_open(self, ids: list[int]) -> bool:
        """The prompt ends inside `<think>` (GLM-Z1, GLM-4.7): the answer starts with reasoning."""
        return self.style is not None and prompt_opens_thinking(self.tokenizer.decode(ids[-4:]))

    def answer(self, token_ids: list[int], text: str, tools: list[dict] | None, forced: bool,
               thinking_open: bool = False) -> Answer:
        """A finished choice: tool calls when `tools` were offered and the answer calls them (see the module
        docstring for "auto" vs forced), else `text` (the post-processed, stop-cut answer)."""
        if self.style == "xml":  # `text` is the answer as written (see text())
            parsed = parse_answer(text, tools, thinking_open, calls=bool(tools))
            offered = tool_names(tools) if tools else []
            calls = [c for c in parsed.tool_calls if c["function"]["name"] in offered]
            return Answer(parsed.content or (None if calls else ""), calls, parsed.reasoning)
        if self.style == "think":
            reasoning, rest = split_reasoning(text, thinking_open)
            return Answer(rest.strip(), [], reasoning)
        if not tools or not self.has_tools:
            return Answer(text)
        raw = self.tokenizer.decode(token_ids)
        calls = []
        offered = tool_names(tools)
        for call in parse_tool_calls(self.family, raw, tools):
            if call["name"] not in offered:  # (ChatGLM3's parser does not look at names; a client can only run these)
                continue
            if "arguments" in call:
                calls.append((call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
            elif forced:
                calls.append((call["name"], call["text"].strip()))
        if forced and not calls:  # the forced name line was cut short (a length limit): report what there is
            name, _, rest = raw.partition("\n")
            if name.strip() in offered:
                calls.append((name.strip(), rest.strip()))
        if not calls:
            return Answer(text)
        return Answer(None, [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                             for n, a in calls])

    def text(self, token_ids: list[int]) -> str:
        """The answer text of the generated tokens (stop token excluded), post-processed as the family's chat()
        does it. ChatGLM3/GLM-4 answers start with a metadata line, empty for a plain answer; a non-empty one
        (a tool call) is returned as the model wrote it."""
        text = self.tokenizer.decode(token_ids)
        if self.style is not None:  # reasoning and calls are parsed from the text as written (answer())
            return text
        if self.family == "chatglm":
            return chat.process_chatglm_response(text)
        if self.family == "chatglm2":
            return chat.process_chatglm2_response(text)
        metadata, _, content = text.partition("\n")
        if not metadata.strip():
            return content.strip().replace("[[训练时间]]", "2023年")
        return text.strip()


# ---- field validators
def _number(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                       code="invalid_value")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name, code="invalid_type")
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise APIError(400, f"messages[{index}].content is missing", param=f"messages.{index}.content",
                       code="missing_content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones make sense to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                    "are supported", param=f"messages.{index}.content", code="invalid_content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts, got "
                        f"{type(content).__name__}", param=f"messages.{index}.content", code="invalid_type")


# ---- POST /v1/chat/completions
def parse_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI messages -> (system, [(user, assistant), ...], query). The last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    systems: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, content) of the conversation proper
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                           param=f"messages.{i}", code="invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} is not supported; use 'system', 'user' or "
                                "'assistant'", param=f"messages.{i}.role", code="invalid_role")
        text = _content(message, i)
        if role in ("system", "developer"):
            systems.append(text)
        elif turns and turns[-1][0] == role:  # two in a row from the same side read as one message
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message (after any system messages) must have role 'user'",
                       param="messages", code="invalid_value")
    query = turns.pop()[1]
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for role, text in turns:
        if role == "user":
            pending_user = text
        else:
            history.append((pending_user or "", text))
            pending_user = None
    if pending_user is not None:  # cannot happen (roles alternate and the last user turn was popped)
        query = pending_user + "\n" + query
    return ("\n".join(systems) if systems else None), history, query


def check_tool_messages(messages: Any) -> list[dict]:
    """ChatGLM3 / GLM-4 messages: roles system, developer, user, assistant, tool, function with text content (an
    assistant's may be null next to its tool_calls); the conversation ends with a user message or a tool result."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                           param=f"messages.{i}", code="invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} is not supported; use 'system', 'user', "
                                "'assistant' or 'tool'", param=f"messages.{i}.role", code="invalid_role")
        if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise APIError(400, f"messages[{i}].tool_call_id must be a string", param=f"messages.{i}.tool_call_id",
                           code="invalid_type")
        out.append({**message, "content": _content(message, i)})
    if out[-1]["role"] not in ("user", "tool", "function"):
        raise APIError(400, "the last message must have role 'user' (or 'tool', a tool's result)", param="messages",
                       code="invalid_value")
    return out


def _tools_of(body: dict, fmt: ChatFormat) -> tuple[list[dict] | None, list[dict] | None, tuple[str, ...] | None,
                                                    bool]:
    """(tools for the prompt, tools the answer may call, forced names, legacy functions) of `tools` / `tool_choice`
    or the legacy `functions` / `function_call`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    functions, function_call = body.get("functions"), body.get("function_call")
    legacy = tools is None and functions is not None
    if tools is not None and functions is not None:
        raise APIError(400, "give 'tools' or the legacy 'functions', not both", param="functions",
                       code="invalid_value")
    if legacy:
        tools, param = functions, "functions"
        if isinstance(function_call, dict):
            choice = {"type": "function", "function": function_call}
        else:
            choice = function_call
        choice_param = "function_call"
    else:
        param, choice_param = "tools", "tool_choice"
        if tools is None and function_call is not None:
            raise APIError(400, "'function_call' needs 'functions'", param="function_call", code="invalid_value")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise APIError(400, f"'{choice_param}' needs '{param}'", param=choice_param, code="invalid_value")
        return None, None, None, False
    if not fmt.has_tools:
        raise APIError(400, f"'{param}': this model ({fmt.family}) has no tool calling; only ChatGLM3 and GLM-4 "
                            "models do", param=param, code="tools_not_supported")
    try:
        if legacy and isinstance(tools, list):
            tools = [t if not isinstance(t, dict) or "function" in t or "type" in t else
                     {"type": "function", "function": t} for t in tools]
        tools = validate_tools(tools, param)
        prompt_tools, forced = select_tools(tools, choice, choice_param)
    except ToolError as err:
        bad = choice_param if str(err).startswith(f"'{choice_param}'") else param
        raise APIError(400, str(err), param=bad, code="invalid_value") from None
    if choice == "none":
        return None, None, None, legacy
    return prompt_tools, prompt_tools, tuple(forced) if forced else None, legacy


@dataclass
class ChatRequest:
    ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    stop: list[str]
    n: int = 1
    tools: list[dict] | None = None  # what the answer may call (None: answer with text only)
    legacy_functions: bool = False  # the request used `functions`: answer with `function_call`
    thinking_open: bool = False  # the prompt ends inside <think> (the answer starts with reasoning)

    @property
    def forced(self) -> bool:
        return self.params.forced_tools is not None


def parse_chat_request(body: Any, fmt: ChatFormat) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {json.dumps(stream)}", param="stream",
                       code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    n = _integer(body, "n")
    if n is None:
        n = 1
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be between 1 and {MAX_N}, got {n}", param="n", code="invalid_value")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise APIError(400, f"'logprobs' must be true or false, got {json.dumps(logprobs)}", param="logprobs",
                       code="invalid_type")
    top_logprobs = _integer(body, "top_logprobs")
    if top_logprobs is not None:
        if not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}",
                           param="top_logprobs", code="invalid_value")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "'parallel_tool_calls' must be true or false", param="parallel_tool_calls",
                       code="invalid_type")
    temperature = _number(body, "temperature", 0.0, 2.0, fmt.defaults["temperature"])
    top_p = _number(body, "top_p", 0.0, 1.0, fmt.defaults["top_p"])
    presence = _number(body, "presence_penalty", -2.0, 2.0, 0.0)
    frequency = _number(body, "frequency_penalty", -2.0, 2.0, 0.0)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"'seed' must be between 0 and 2**63 - 1, got {seed}", param="seed", code="invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise APIError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop",
                       code="invalid_value")

    prompt_tools, callable_tools, forced, legacy = _tools_of(body, fmt)
    if forced and fmt.style == "xml":
        raise APIError(400, "this model writes XML tool calls: tool_choice 'auto' or 'none' only (a forced call is "
                            "not supported for it)", param="tool_choice", code="invalid_value")
    template_kwargs = body.get("chat_template_kwargs")
    if template_kwargs is not None and (not isinstance(template_kwargs, dict) or not fmt.has_tools or
                                        fmt.family != "glm4"):
        raise APIError(400, "'chat_template_kwargs' must be an object, for a model with a jinja chat template "
                            "(GLM-4 and later)", param="chat_template_kwargs", code="invalid_value")
    if fmt.has_tools:
        ids = fmt.messages_ids(check_tool_messages(body.get("messages")), prompt_tools, template_kwargs)
    else:
        system, history, query = parse_messages(body.get("messages"))
        ids = fmt.prompt_ids(query, history, system)
    room = fmt.context - len(ids)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens < 1:
        raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name, code="invalid_value")
    elif max_tokens > room:
        raise APIError(400, f"'{name}' is {max_tokens}, but the prompt takes {len(ids)} of the model's "
                            f"{fmt.context} tokens, leaving {room}. Lower '{name}' or shorten the messages.",
                       param=name, code="context_length_exceeded")
    params = sampling(max_tokens, temperature, top_p, seed, presence_penalty=presence, frequency_penalty=frequency,
                      logprobs=(top_logprobs or 0) if logprobs else None, forced_tools=forced)
    include_usage = bool(options.get("include_usage", False))
    return ChatRequest(ids, params, stream, include_usage, stop, n, callable_tools, legacy, fmt.thinking_open(ids))


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- ChatGLM-6B's POST /
def parse_legacy_request(body: Any, fmt: ChatFormat) -> tuple[list[int], SamplingParams, str, list]:
    """ChatGLM-6B's POST / body -> prompt ids and settings; api.py's defaults where a field is missing or null."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object with at least 'prompt'", code="invalid_type")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, f"'prompt' must be a string, got {json.dumps(prompt)}", param="prompt",
                       code="invalid_type")
    history = body.get("history") or []
    if not isinstance(history, list):
        raise APIError(400, "'history' must be a list of [query, response] pairs", param="history",
                       code="invalid_type")
    pairs: list[tuple[str, str]] = []
    for i, turn in enumerate(history):
        if isinstance(turn, list) and not turn:
            continue  # api.py's own default was [[]]
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise APIError(400, f"history[{i}] must be a [query, response] pair of strings", param="history",
                           code="invalid_type")
        pairs.append((turn[0], turn[1]))
    max_length = _integer(body, "max_length") or LEGACY_DEFAULTS["max_length"]
    if max_length < 1:
        raise APIError(400, f"'max_length' must be positive, got {max_length}", param="max_length",
                       code="invalid_value")
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    temperature = _number(body, "temperature", 0.0, 100.0, None)
    top_p = LEGACY_DEFAULTS["top_p"] if top_p is None else top_p
    temperature = LEGACY_DEFAULTS["temperature"] if temperature is None else temperature
    # as model.chat does: history that does not fit is dropped oldest turn first (the reply keeps all of it)

    limit = min(max_length, fmt.context)
    try:
        ids, _ = fit_history(fmt.tokenizer, prompt, pairs, limit)
    except ValueError as err:
        raise APIError(400, str(err), param="prompt", code="context_length_exceeded") from None
    return ids, sampling(limit - len(ids), temperature, top_p), prompt, pairs
