"""The HTTP API's shapes: OpenAI-shaped errors, request bodies validated into prompt token ids and sampling settings,
and the model family's chat template both ways (messages -> prompt ids, answer tokens -> text).

Validation is explicit, so every error names the field and what was wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from glmkit.core import chat
from glmkit.core.chat import DEFAULTS, HF_DEFAULT_TOP_K, build_chat_input, family_of, fit_history

MAX_STOP_SEQUENCES = 4
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
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share a batch; None runs alone."""
        if not self.do_sample:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k)


def sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> SamplingParams:
    """Request settings -> SamplingParams as model.chat() would sample: temperature (or top_p) 0 is greedy, and
    sampling keeps the 50 most likely tokens first (transformers' top_k default, which ChatGLM's chat inherits)."""
    if temperature == 0 or top_p == 0:
        return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, seed=seed)

    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                          top_k=HF_DEFAULT_TOP_K, seed=seed)


class ChatFormat:
    """The family's chat template for a model with `context` positions: conversation -> prompt ids, and answer
    tokens -> text as the family's chat() post-processes it."""

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer, self.context = tokenizer, context
        self.family = family_of(tokenizer)
        self.defaults = DEFAULTS[self.family]  # the family's chat temperature / top_p

    def prompt_ids(self, query: str, history: list, system: str | None) -> list[int]:
        if system is not None and self.family in ("chatglm", "chatglm2"):
            # no system role in these families: fold it into the query, as ChatGLM2-6B's openai_api.py did
            query, system = f"{system}\n{query}", None
        try:
            ids = build_chat_input(self.tokenizer, query, history, system=system)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_prompt") from None
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                                "(prompt and answer together). Shorten the messages.",
                           param="messages", code="context_length_exceeded")
        return ids

    def text(self, token_ids: list[int]) -> str:
        """The answer text of the generated tokens (stop token excluded), post-processed as the family's chat()
        does it. ChatGLM3/GLM-4 answers start with a metadata line, empty for a plain answer; a non-empty one
        (a tool call) is returned as the model wrote it."""
        text = self.tokenizer.decode(token_ids)
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


@dataclass
class ChatRequest:
    ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    stop: list[str]


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
    if n is not None and n != 1:
        raise APIError(400, f"'n' must be 1 (one answer per request), got {n}", param="n", code="invalid_value")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise APIError(400, f"'{unsupported}' is not supported by this server", param=unsupported,
                           code="unsupported_parameter")
    if body.get("logprobs"):
        raise APIError(400, "'logprobs' is not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    temperature = _number(body, "temperature", 0.0, 2.0, fmt.defaults["temperature"])
    top_p = _number(body, "top_p", 0.0, 1.0, fmt.defaults["top_p"])
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
    params = sampling(max_tokens, temperature, top_p, seed)
    include_usage = bool(options.get("include_usage", False))
    return ChatRequest(ids, params, stream, include_usage, stop)


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
