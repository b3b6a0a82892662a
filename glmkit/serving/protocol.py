"""The HTTP API's shapes: OpenAI-shaped errors, request bodies validated into prompt token ids and sampling settings,
and the model family's chat template both ways (messages -> prompt ids, answer tokens -> text or tool calls).

The request bodies are pydantic models (ChatCompletionRequest, LegacyChatRequest: the OpenAPI document at
/openapi.json is generated from them); their field checks raise OpenAI-shaped errors that name the field and what
was wrong.

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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SkipValidation, ValidationInfo

from glmkit.core import chat
from glmkit.core.chat import DEFAULTS, HF_DEFAULT_TOP_K, build_chat_input, family_of, fit_history
from glmkit.core.chat_template import answer_style, prompt_opens_thinking
from glmkit.core.reasoning import parse_answer, split_reasoning
from glmkit.core.tools import TOOL_FAMILIES, ToolError, parse_tool_calls, select_tools, tool_names, validate_tools

MAX_STOP_SEQUENCES = 4
MAX_N = 16  # most choices per request
MAX_TOP_LOGPROBS = 20
MAX_BODY_BYTES = 1 << 20  # largest request body the server reads
# POST / is ChatGLM-6B's api.py, which calls ChatGLM-6B's chat() with that family's defaults, whatever the model
LEGACY_DEFAULTS = DEFAULTS["chatglm"]


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
        return self.finish(self.tokenizer.decode(token_ids))

    def finish(self, text: str) -> str:
        """The family's post-processing of an answer's decoded text (text() = finish(decode)); whole-text, since
        ChatGLM-6B's punctuation fix looks at both neighbours and every family strips."""
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


# ---- field checks: each raises the OpenAI-shaped 400 that names its field (pydantic's own messages would not)
def _number(lo: float, hi: float) -> Any:
    """A number in [lo, hi] (None: the default)."""
    def check(value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name,
                           code="invalid_type")
        if not lo <= value <= hi:
            raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                           code="invalid_value")
        return float(value)

    return Annotated[float | None, Field(ge=lo, le=hi), BeforeValidator(check)]


def _integer(lo: int | None = None, hi: int | None = None, hi_text: str | None = None) -> Any:
    """An integer, at least lo / at most hi when given (None: the default)."""
    def check(value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name,
                           code="invalid_type")
        _in_range(name, value, lo, hi, hi_text)
        return value

    return Annotated[int | None, Field(ge=lo, le=hi), BeforeValidator(check)]


def _in_range(name: str, value: int, lo: int | None, hi: int | None, hi_text: str | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi_text or hi}" if hi is not None else f"at least {lo}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", param=name, code="invalid_value")


def _flag(show_value: bool = True) -> Any:
    """true or false (None: the default)."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if value is not None and not isinstance(value, bool):
            got = f", got {json.dumps(value)}" if show_value else ""
            raise APIError(400, f"'{info.field_name}' must be true or false{got}", param=info.field_name,
                           code="invalid_type")
        return value

    return Annotated[bool | None, BeforeValidator(check)]


def _model_name(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
    return value


def _stream_options(value: Any) -> Any:
    if not value:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return value


def _top_logprobs(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'top_logprobs' must be an integer, got {json.dumps(value)}", param="top_logprobs",
                       code="invalid_type")
    if not info.data.get("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    _in_range("top_logprobs", value, 0, MAX_TOP_LOGPROBS)
    return value


def _stop(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(value) > MAX_STOP_SEQUENCES or any(not s for s in value):
        raise APIError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop",
                       code="invalid_value")
    return value


def _max_tokens(value: Any, info: ValidationInfo) -> Any:
    if info.field_name == "max_tokens" and info.data.get("max_completion_tokens") is not None:
        return None  # max_completion_tokens, OpenAI's newer name, wins
    return _integer_value(info.field_name, value, 1)


def _integer_value(name: str, value: Any, lo: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name, code="invalid_type")
    _in_range(name, value, lo, None)
    return value


def _messages(value: Any, info: ValidationInfo) -> Any:
    """The family's message rules (roles, content), before pydantic reads the messages."""
    fmt = (info.context or {}).get("format")
    if fmt is not None and fmt.has_tools:
        check_tool_messages(value)
    else:
        parse_messages(value)
    return value


class TextPart(BaseModel):
    """A content part; only text ones are supported."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class FunctionDefinition(BaseModel):
    name: str = Field(description="1-64 letters, digits, '_' or '-'")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object")


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessage(BaseModel):
    """One message. ChatGLM3 / GLM-4 also take role "tool" (or "function") results and assistant tool_calls; the
    other families system, developer, user and assistant."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = Field(None, description="null only next to an assistant's tool_calls")
    name: SkipValidation[str | None] = None
    # checked against the conversation by glmkit.core.tools (its errors name the message)
    tool_calls: SkipValidation[list[dict[str, Any]] | None] = None
    tool_call_id: SkipValidation[str | None] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: SkipValidation[bool] = False


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions, OpenAI's chat completion request. Unknown fields are ignored; missing
    sampling settings take the model family's chat defaults (glmkit.core.chat.DEFAULTS). Fields are checked in this
    order; the first wrong one is answered with a 400 naming it."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"required": ["messages"]})
    model: Annotated[str | None, BeforeValidator(_model_name)] = None
    stream: _flag() = None
    stream_options: Annotated[StreamOptions | None, BeforeValidator(_stream_options)] = None
    n: _integer(1, MAX_N) = None
    logprobs: _flag() = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_top_logprobs)] = None
    parallel_tool_calls: _flag(show_value=False) = None
    temperature: _number(0.0, 2.0) = Field(None, description="0 = greedy; default: the family's")
    top_p: _number(0.0, 1.0) = Field(None, description="default: the family's")
    presence_penalty: _number(-2.0, 2.0) = None
    frequency_penalty: _number(-2.0, 2.0) = None
    seed: _integer(0, 2**63 - 1, "2**63 - 1") = None
    stop: Annotated[list[str] | str | None, BeforeValidator(_stop)] = Field(None, description="up to 4 strings")
    # checked together by glmkit.core.tools (ChatGLM3 and GLM-4 only)
    tools: SkipValidation[list[ToolDefinition] | None] = None
    tool_choice: SkipValidation[Literal["none", "auto", "required"] | dict[str, Any] | None] = None
    functions: SkipValidation[list[FunctionDefinition] | None] = Field(None, description="legacy: use tools")
    function_call: SkipValidation[Literal["none", "auto"] | dict[str, Any] | None] = Field(
        None, description="legacy: use tool_choice")
    messages: Annotated[list[ChatMessage] | None, BeforeValidator(_messages)] = Field(None, validate_default=True)
    # reaches the chat template (GLM-4 and later), e.g. {"enable_thinking": false} as vLLM takes it
    chat_template_kwargs: SkipValidation[dict[str, Any] | None] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1), BeforeValidator(_max_tokens)] = None
    max_tokens: Annotated[int | None, Field(ge=1), BeforeValidator(_max_tokens)] = Field(
        None, description="default: the rest of the context")


def _legacy_history(value: Any) -> Any:
    value = value or []
    if not isinstance(value, list):
        raise APIError(400, "'history' must be a list of [query, response] pairs", param="history",
                       code="invalid_type")
    pairs = []
    for i, turn in enumerate(value):
        if isinstance(turn, list) and not turn:
            continue  # api.py's own default was [[]]
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise APIError(400, f"history[{i}] must be a [query, response] pair of strings", param="history",
                           code="invalid_type")
        pairs.append(turn)
    return pairs


def _legacy_prompt(value: Any) -> Any:
    if not isinstance(value, str):
        raise APIError(400, f"'prompt' must be a string, got {json.dumps(value)}", param="prompt",
                       code="invalid_type")
    return value


def _legacy_max_length(value: Any) -> Any:
    value = _integer_value("max_length", value)
    if value is not None and value < 0:
        raise APIError(400, f"'max_length' must be positive, got {value}", param="max_length",
                       code="invalid_value")
    return value or None  # 0, as null, takes the default (api.py's `max_length or 2048`)


class LegacyChatRequest(BaseModel):
    """The body of POST /, ChatGLM-6B's api.py; missing or null fields take its defaults (2048, 0.7, 0.95)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"required": ["prompt"]})
    prompt: Annotated[str | None, BeforeValidator(_legacy_prompt)] = Field(None, validate_default=True)
    history: Annotated[list[tuple[str, str]], BeforeValidator(_legacy_history)] = Field(
        default_factory=list, description="[[query, response], ...]")
    max_length: Annotated[int | None, Field(ge=1), BeforeValidator(_legacy_max_length)] = None
    top_p: _number(0.0, 1.0) = None
    temperature: _number(0.0, 100.0) = None


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


def _tools_of(req: ChatCompletionRequest, fmt: ChatFormat) -> tuple[list[dict] | None, list[dict] | None,
                                                                      tuple[str, ...] | None, bool]:
    """(tools for the prompt, tools the answer may call, forced names, legacy functions) of `tools` / `tool_choice`
    or the legacy `functions` / `function_call`."""
    tools, choice = req.tools, req.tool_choice
    functions, function_call = req.functions, req.function_call
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
    """A POST /v1/chat/completions body (parsed JSON) -> the prompt ids and settings of the request, or an APIError
    naming what is wrong (ChatCompletionRequest checks the fields; the tools and the prompt follow)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    req = ChatCompletionRequest.model_validate(body, context={"format": fmt})
    prompt_tools, callable_tools, forced, legacy = _tools_of(req, fmt)
    if forced and fmt.style == "xml":
        raise APIError(400, "this model writes XML tool calls: tool_choice 'auto' or 'none' only (a forced call is "
                            "not supported for it)", param="tool_choice", code="invalid_value")
    template_kwargs = req.chat_template_kwargs
    if template_kwargs is not None and (not isinstance(template_kwargs, dict) or not fmt.has_tools or
                                        fmt.family != "glm4"):
        raise APIError(400, "'chat_template_kwargs' must be an object, for a model with a jinja chat template "
                            "(GLM-4 and later)", param="chat_template_kwargs", code="invalid_value")
    messages = [m.model_dump(exclude_unset=True) for m in req.messages]
    if fmt.has_tools:
        ids = fmt.messages_ids(check_tool_messages(messages), prompt_tools, template_kwargs)
    else:
        system, history, query = parse_messages(messages)
        ids = fmt.prompt_ids(query, history, system)
    room = fmt.context - len(ids)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, name)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise APIError(400, f"'{name}' is {max_tokens}, but the prompt takes {len(ids)} of the model's "
                            f"{fmt.context} tokens, leaving {room}. Lower '{name}' or shorten the messages.",
                       param=name, code="context_length_exceeded")
    temperature = fmt.defaults["temperature"] if req.temperature is None else req.temperature
    top_p = fmt.defaults["top_p"] if req.top_p is None else req.top_p
    params = sampling(max_tokens, temperature, top_p, req.seed, presence_penalty=req.presence_penalty or 0.0,
                      frequency_penalty=req.frequency_penalty or 0.0,
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None, forced_tools=forced)
    include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
    return ChatRequest(ids, params, bool(req.stream), include_usage, req.stop, req.n or 1, callable_tools, legacy,
                       fmt.thinking_open(ids))


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- ChatGLM-6B's POST /
def parse_legacy_request(body: Any, fmt: ChatFormat) -> tuple[list[int], SamplingParams, str, list]:
    """ChatGLM-6B's POST / body -> prompt ids and settings; api.py's defaults where a field is missing or null."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object with at least 'prompt'", code="invalid_type")
    req = LegacyChatRequest.model_validate(body)
    max_length = req.max_length or LEGACY_DEFAULTS["max_length"]
    top_p = LEGACY_DEFAULTS["top_p"] if req.top_p is None else req.top_p
    temperature = LEGACY_DEFAULTS["temperature"] if req.temperature is None else req.temperature
    # as model.chat does: history that does not fit is dropped oldest turn first (the reply keeps all of it)
    limit = min(max_length, fmt.context)
    try:
        ids, _ = fit_history(fmt.tokenizer, req.prompt, req.history, limit)
    except ValueError as err:
        raise APIError(400, str(err), param="prompt", code="context_length_exceeded") from None
    return ids, sampling(limit - len(ids), temperature, top_p), req.prompt, req.history
