"""Chat for every GLM family, as each original `chat()` / `stream_chat()` does it, through glmkit.core.generate.

Per family (read from `tokenizer.family`):

| family   | prompt                                                                                   | defaults (max_length, top_p, temperature) | stop ids                      |
|----------|------------------------------------------------------------------------------------------|------------------------------------------|-------------------------------|
| chatglm  | bare query on the first turn, else `[Round i]\\n问：q\\n答：r\\n` (i from 0) + `[gMASK] <sop>` | 2048, 0.7, 0.95                          | the model's eos (`<eop>`)     |
| chatglm2 | `[gMASK] sop` + `[Round i]\\n\\n问：q\\n\\n答：r\\n\\n` (i from 1)                          | 8192, 0.8, 0.8                           | the model's eos (`</s>`)      |
| chatglm3 | `[gMASK] sop` + `<|role|>` + enc(metadata + "\\n") + enc(content) per message + `<|assistant|>` | 8192, 0.8, 0.8                    | eos, `<|user|>`, `<|observation|>` |
| glm4     | the checkpoint's jinja chat template: `[gMASK]<sop>` + `<|role|>{metadata}\\n{content}` per message + `<|assistant|>` | 8192, 0.8, 0.8 | `<|endoftext|>`, `<|user|>`, `<|observation|>` |

The prompts themselves are built in glmkit.core.chat_template (also behind every tokenizer's `apply_chat_template`).

Sampling uses top_k 50 unless given (transformers' default, which the originals inherit), and every family adds the
NaN/inf guard (`InvalidScoreLogitsProcessor`: all scores 0, token 5 at 5e4). `max_length` counts prompt + answer.

History: ChatGLM-6B/ChatGLM2 keep `[(query, response), ...]`. ChatGLM3/GLM-4 keep role dicts
(`{"role": "user"|"assistant"|"system"|"observation", "content": ..., "metadata": ...}`) as their originals do; a
caller that passes `(query, response)` tuples gets tuples back, so one calling convention works for every family.

Beyond the originals: history that does not fit `max_length` (default: the family's, capped at
`model.config.max_seq_len`) is dropped oldest turn first (the returned history still holds every turn); `system=` adds a system message for ChatGLM3/GLM-4 (a clear
error elsewhere); the caller's history list is never mutated. num_beams > 1 runs glmkit's deterministic beam
search (transformers' beam-search scoring; sampling arguments are ignored in that mode and stream_chat yields once).

Tools (ChatGLM3, GLM-4): `tools=[...]` puts the family's tool system message first (glmkit.core.tools; ChatGLM3 gets
bare function dicts, as its own tool demo writes them); a tool call
comes back as `{"name", "parameters"}` (ChatGLM3's chat() shape, for both families) and its result goes back as the
next query with `role="observation"`. GLM-4's original has no chat(); glmkit gives it ChatGLM3's, with GLM-4's JSON
calls parsed by glmkit.core.tools.parse_tool_calls. `stop=` ends the answer before the first of some strings.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from glmkit.core.chat_template import (
    answer_style,
    apply_chat_template,
    chatglm2_prompt,
    chatglm3_ids,
    chatglm_prompt,
    prompt_opens_thinking,
)
from glmkit.core.generate import beam_search, generate_stream, invalid_score_guard
from glmkit.core.reasoning import parse_answer, split_reasoning
from glmkit.core.tokenizer import load_tokenizer
from glmkit.core.tools import TOOL_FAMILIES, ToolError, parse_tool_calls, to_native_messages, validate_tools

Turn = tuple[str, str]

# The sampling defaults of each family, the one table chat(), the HTTP API and the web page read.
DEFAULTS: dict[str, dict[str, Any]] = {
    "chatglm": {"max_length": 2048, "top_p": 0.7, "temperature": 0.95},
    "chatglm2": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
    "chatglm3": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
    # GLM-4 has no chat(); its generation_config samples with top_p 0.8 / temperature 0.8. glmkit caps the default
    # length at 8192 (the model's 128K context would preallocate a huge KV cache); pass max_length for more.
    "glm4": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
    # GLM-130B is a base model without a chat format: the query (after the earlier turns' text) is the prompt,
    # framed as its generate.py frames one ([gMASK] unless it has a mask, sop); scripts/generate.sh samples
    # with top_p 0.7, temperature 1.0.
    "glm130b": {"max_length": 2048, "top_p": 0.7, "temperature": 1.0},
}
HF_DEFAULT_TOP_K = 50
INVALID_SCORE_TOKEN_ID = 5
ROLES = ("system", "user", "assistant", "observation", "tool")

_PUNCT = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")]


# -------------------------------------------------------------------------------------------- prompt building

def family_of(tokenizer) -> str:
    fam = getattr(tokenizer, "family", None)
    if fam == "glm":
        raise ValueError("the original GLM (glm-large-chinese, glm-2b, glm-10b, glm-10b-chinese) fills blanks and has "
                         "no chat format or stop tokens: use `glmkit fill` / glmkit.fill.fill")
    if fam not in DEFAULTS:
        raise ValueError(f"tokenizer family {fam!r} is not one of {sorted(DEFAULTS)}; load it with "
                         "glmkit.load_tokenizer")
    return fam


def as_glmkit_tokenizer(tokenizer):
    """glmkit's tokenizer for `tokenizer`: itself, or, for a transformers tokenizer of a GLM checkpoint (the
    `AutoTokenizer.from_pretrained(..., trust_remote_code=True)` users come with), glmkit's reading of the same
    files."""
    if getattr(tokenizer, "family", None) in DEFAULTS:
        return tokenizer
    from pathlib import Path

    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str) and Path(vocab_file).is_file():
        return load_tokenizer(Path(vocab_file).parent)
    raise ValueError(f"{type(tokenizer).__name__} is not a GLM tokenizer glmkit can read; pass "
                     "glmkit.load_tokenizer(path)")


def _is_messages(history: Sequence[Any]) -> bool:
    return bool(history) and isinstance(history[0], dict)


def _as_turns(history: Sequence[Any] | None) -> list[Turn]:
    turns: list[Turn] = []
    for i, item in enumerate(history or []):
        if isinstance(item, dict):
            raise ValueError("this family keeps history as (query, response) pairs, got a role dict at "
                             f"history[{i}]")
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair, got {item!r}")
        turns.append((str(item[0]), str(item[1])))
    return turns


def _as_messages(history: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Role dicts from either format; tuples become a user and an assistant message."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(history or []):
        if isinstance(item, dict):
            if item.get("role") not in ROLES:
                raise ValueError(f"history[{i}] has role {item.get('role')!r}; expected one of {ROLES}")
            messages.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            messages.append({"role": "user", "content": str(item[0])})
            messages.append({"role": "assistant", "metadata": "", "content": str(item[1])})
        else:
            raise ValueError(f"history[{i}] must be a (query, response) pair or a role dict, got {item!r}")
    return messages


def glm4_prompt(tokenizer, messages: Sequence[dict[str, Any]]) -> str:
    """GLM-4's prompt text for native messages: the tokenizer's chat template (see glmkit.core.chat_template)."""
    return apply_chat_template(tokenizer, list(messages), tokenize=False)


def with_tools(family: str, messages: list[dict[str, Any]], tools: list[Any] | None) -> list[dict[str, Any]]:
    """Messages with the family's tool system message for `tools`: it replaces one the history already holds (so a
    chat can pass the same tools every turn), else it comes first. ChatGLM3 gets bare function dicts, the form its
    own tool demo (tools_using_demo/cli_demo_tool.py) and PROMPT.md give the model."""
    if tools is None:
        return messages
    if family not in TOOL_FAMILIES:
        raise ToolError(f"{family} has no tool calling (only ChatGLM3 and GLM-4 do); call it without tools")
    tools = validate_tools(tools, strict=False)
    if family == "chatglm3":
        tools = [t["function"] if t.get("type") == "function" and "function" in t else t for t in tools]
    tools_message = to_native_messages(family, [], tools)[0]
    for i, m in enumerate(messages):
        if m.get("role") == "system" and "tools" in m:
            return messages[:i] + [tools_message] + messages[i + 1:]
    return [tools_message] + messages


def _ids_for(tokenizer, family: str, query: str, history: Sequence[Any], system: str | None,
             role: str = "user", tools: list[Any] | None = None,
             template_kwargs: dict[str, Any] | None = None) -> list[int]:
    if template_kwargs and family != "glm4":
        raise ValueError(f"{family} has no jinja chat template to pass {sorted(template_kwargs)} to (enable_thinking "
                         "is for GLM-4.5/4.6/4.7)")
    if family == "glm130b":
        if system is not None or role != "user" or tools is not None:
            raise ValueError("GLM-130B has no system prompt, roles or tools (it has no chat format)")
        return tokenizer.encode("".join(f"{q} {r} " for q, r in _as_turns(history)) + query)
    if family in ("chatglm", "chatglm2"):
        if system is not None:
            raise ValueError(f"{family} has no system prompt (only ChatGLM3 and GLM-4 do); put it into the query")
        if role != "user":
            raise ValueError(f"{family} has no roles; role={role!r} is only for ChatGLM3 and GLM-4")
        if tools is not None:
            raise ToolError(f"{family} has no tool calling (only ChatGLM3 and GLM-4 do); call it without tools")
        turns = _as_turns(history)
        prompt = chatglm_prompt(query, turns) if family == "chatglm" else chatglm2_prompt(query, turns)
        return tokenizer.encode(prompt)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if family == "glm4" and answer_style(tokenizer) == "xml":  # GLM-4.5: OpenAI messages, tools at the top level
        messages = _as_messages(history)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        messages.append({"role": _xml_role(role), "content": query})
        return apply_chat_template(tokenizer, messages, tools=validate_tools(tools, strict=False) if tools else None,
                                   template_kwargs=template_kwargs)
    messages = with_tools(family, _as_messages(history), tools)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    messages = messages + [{"role": role, "content": query}]
    if family == "chatglm3":
        return chatglm3_ids(tokenizer, messages)
    return apply_chat_template(tokenizer, messages, template_kwargs=template_kwargs)


def _xml_role(role: str) -> str:
    """GLM-4.5's template names a tool result "tool" (glmkit's chat() calls it "observation" for every family)."""
    return "tool" if role == "observation" else role


def _template_kwargs(enable_thinking: bool | None) -> dict[str, Any] | None:
    if enable_thinking is None:
        return None
    if not isinstance(enable_thinking, bool):
        raise TypeError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
    return {"enable_thinking": enable_thinking}


def build_chat_input(tokenizer, query: str, history: Sequence[Any] | None = None, system: str | None = None,
                     role: str = "user", tools: list[Any] | None = None,
                     enable_thinking: bool | None = None) -> list[int]:
    """The prompt ids the family's original chat() feeds the model (no truncation). enable_thinking: GLM-4.5's
    switch (False: `/nothink` and an empty `<think></think>`; None: the template's default)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    tokenizer = as_glmkit_tokenizer(tokenizer)
    return _ids_for(tokenizer, family_of(tokenizer), query, list(history or []), system, role, tools,
                    _template_kwargs(enable_thinking))


def _drop_oldest(history: list[Any]) -> list[Any]:
    """History without its oldest exchange (system messages stay)."""
    if not _is_messages(history):
        return history[1:]
    keep_head = [m for m in history if m.get("role") == "system"]
    rest = [m for m in history if m.get("role") != "system"]
    i = 1
    while i < len(rest) and rest[i].get("role") != "user":  # drop the user turn and everything answering it
        i += 1
    return keep_head + rest[i:]


def fit_history(tokenizer, query: str, history: Sequence[Any] | None, limit: int, system: str | None = None,
                role: str = "user", tools: list[Any] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[Any]]:
    """Prompt ids and the history they hold, dropping the oldest turns until the prompt leaves room for at
    least one new token within `limit` (prompt + answer)."""
    family = family_of(tokenizer)
    kept = list(history or [])
    while True:
        ids = _ids_for(tokenizer, family, query, kept, system, role, tools, template_kwargs)
        if len(ids) < limit:
            return ids, kept
        non_system = [m for m in kept if not (isinstance(m, dict) and m.get("role") == "system")]
        if not non_system:
            raise ValueError(f"the query alone takes {len(ids)} tokens, which leaves no room to answer within "
                             f"max_length {limit}; shorten it or raise max_length")
        kept = _drop_oldest(kept)


# -------------------------------------------------------------------------------------------- responses

def process_chatglm_response(response: str) -> str:
    """ChatGLM-6B: strip, date placeholder, and half-width , ! : ; ? next to a CJK character -> full width."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCT:
        h = re.escape(half)
        response = re.sub(r"([\u4e00-\u9fff])" + h, r"\1" + full, response)
        response = re.sub(h + r"([\u4e00-\u9fff])", full + r"\1", response)
    return response


def process_chatglm2_response(response: str) -> str:
    return response.strip().replace("[[训练时间]]", "2023年")


def process_chatglm3_response(output: str, history: Sequence[dict[str, Any]],
                              family: str = "chatglm3") -> tuple[Any, list[dict[str, Any]]]:
    """ChatGLM3's process_response (GLM-4 answers have the same shape): each `<|assistant|>`-separated part is
    `metadata\ncontent`; an empty metadata is a plain answer (stripped), a non-empty one a call, returned as
    `{"name", "parameters"}` when the conversation offers tools and the call parses (glmkit.core.tools.
    parse_tool_calls; never evaluated), else as `{"name", "content"}`. A part without a newline is taken as content
    (the original would raise)."""
    content: Any = ""
    history = copy.deepcopy(list(history))
    tools = next((m["tools"] for m in history if m.get("role") == "system" and "tools" in m), None)
    for response in output.split("<|assistant|>"):
        metadata, content = response.split("\n", maxsplit=1) if "\n" in response else ("", response)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        calls = parse_tool_calls(family, f"{metadata}\n{content}", tools) if tools is not None else []
        if calls and "arguments" in calls[0]:
            content = {"name": metadata.strip(), "parameters": calls[0]["arguments"]}
        else:
            content = {"name": metadata.strip(), "content": content}
    return content, history


# -------------------------------------------------------------------------------------------- chat

def _limits(model, family: str, max_length: int | None) -> int:
    """The total length (prompt + answer) to generate to. An explicit max_length is honoured as given, as the
    originals do (their rotary positions have no hard limit); the family default is capped at the model's
    context so a small model never allocates a cache for 8192 tokens it was not built for."""
    model_max = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_length is None:
        max_length = DEFAULTS[family]["max_length"]
        if max_length is None or (model_max and model_max < max_length):
            if model_max is None:
                raise ValueError("pass max_length: the model config has no max_seq_len")
            return int(model_max)
        return int(max_length)
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return int(max_length)


def stop_token_ids(model, tokenizer, family: str | None = None) -> list[int]:
    """The tokens that end generated text: the one rule of chat, `glmkit generate`, evaluation and the server.

    ChatGLM3 and GLM-4 stop at eos, `<|user|>` and `<|observation|>` (GLM-4's 151329, 151336, 151338), plus any
    other eos id the model's config names; ChatGLM-6B, ChatGLM2 and GLM-130B at the config's eos ids (the
    tokenizer's eos when it names none); the original GLM, which only fills blanks, at `<eop>` and eos.
    family: the tokenizer's (default) or a family name."""
    family = family or getattr(tokenizer, "family", None)
    config_ids = [int(i) for i in (getattr(getattr(model, "config", None), "eos_token_ids", []) or [])]
    if family in ("chatglm3", "glm4"):
        ids = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    elif family == "glm":
        ids = [getattr(tokenizer, "eop_token_id", None), tokenizer.eos_token_id]
    else:
        return config_ids or [int(tokenizer.eos_token_id)]
    ids = [int(i) for i in ids if i is not None]
    return ids + [i for i in config_ids if i not in ids]


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string begins in text (None if none occurs)."""
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def partial_stop(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may still become one)."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _cut(state: tuple[Any, list[Any]], end: int) -> tuple[Any, list[Any]]:
    """A (response, history) state whose text answer ends at `end` (a stop string or a held-back partial one)."""
    response, history = state
    if not isinstance(response, str) or end >= len(response):
        return state
    response = response[:end]
    history = list(history)
    last = history[-1]
    if isinstance(last, tuple):
        history[-1] = (last[0], response)
    else:
        history[-1] = {**last, "content": response}
    return response, history


def _response_state(family: str, tokenizer, out: list[int], query: str, history: list[Any], role: str,
                    as_tuples: bool, reading: tuple[str, bool, Any] | None = None,
                    final: bool = True) -> tuple[Any, list[Any]]:
    """(response, new history) for the tokens generated so far, as each family's chat() post-processes them.
    reading: (answer style, prompt opens <think>, tools) for answers with reasoning (see _reasoning_state)."""
    if reading is not None:
        return _reasoning_state(family, tokenizer.decode(out[:-1]), query, history, role, as_tuples, reading, final)
    if family == "glm130b":
        response = tokenizer.decode(out, skip_special_tokens=True).strip()
        return response, history + [(query, response)]
    if family in ("chatglm", "chatglm2"):
        text = tokenizer.decode(out)
        response = process_chatglm_response(text) if family == "chatglm" else process_chatglm2_response(text)
        return response, history + [(query, response)]
    # ChatGLM3 drops the last generated token (the stop token when generation ended on one); GLM-4's chat template
    # path has no chat(), glmkit drops a trailing stop token the same way.
    text = tokenizer.decode(out[:-1])
    messages = _as_messages(history) + [{"role": role, "content": query}]
    response, new_messages = process_chatglm3_response(text, messages, family)
    if as_tuples:
        answer = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        return response, history + [(query, answer)]
    return response, new_messages


def _reasoning_state(family: str, text: str, query: str, history: list[Any], role: str, as_tuples: bool,
                     reading: tuple[str, bool, Any], final: bool) -> tuple[Any, list[Any]]:
    """GLM-4.5/4.6/4.7 ("xml") and GLM-Z1 ("think") answers: the reasoning goes to the assistant message's
    `reasoning_content`, the reply is the response; GLM-4.5's calls become the message's OpenAI `tool_calls` and the
    response is the first call as {"name", "parameters"} (every family's chat() shape). While the answer grows
    (final=False), tags cut in the middle are held back."""
    style, thinking_open, tools = reading
    if style == "xml":
        parsed = parse_answer(text, tools, thinking_open, calls=tools is not None, partial=not final)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        response: Any = parsed.content
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
            first = parsed.tool_calls[0]["function"]
            response = {"name": first["name"], "parameters": json.loads(first["arguments"])}
        messages = _as_messages(history) + [{"role": _xml_role(role), "content": query}, message]
        for k, call in enumerate(parsed.tool_calls):  # ids stable while the answer streams, unique in the history
            call["id"] = f"call_{len(messages) - 1}_{k}"
    else:  # GLM-Z1: reasoning, then a GLM-4 answer (metadata line first)
        reasoning = parse_answer(text, thinking_open=thinking_open, calls=False, partial=not final).reasoning
        rest = split_reasoning(text, thinking_open)[1] if reasoning is None or "</think>" in text else ""
        messages = _as_messages(history) + [{"role": role, "content": query}]
        response, messages = process_chatglm3_response("\n" + rest, messages, family)
        if reasoning is not None:
            messages[-1] = {**messages[-1], "reasoning_content": reasoning}
    if as_tuples:
        answer = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        return response, history + [(query, answer)]
    return response, messages


def _has_reasoning(state: tuple[Any, list[Any]]) -> bool:
    last = state[1][-1] if state[1] else None
    return isinstance(last, dict) and bool(last.get("reasoning_content"))


def stream_chat(model, tokenizer, query: str, history: Sequence[Any] | None = None, max_length: int | None = None,
                do_sample: bool = True, top_p: float | None = None, temperature: float | None = None,
                system: str | None = None, logits_processor: Sequence[Callable] | None = None, num_beams: int = 1,
                role: str = "user", tools: list[Any] | None = None, stop: str | Sequence[str] | None = None,
                enable_thinking: bool | None = None, **gen_kwargs: Any) -> Iterator[tuple[Any, list[Any]]]:
    """Yields (response so far, history + this turn) as tokens arrive; the last item equals chat()'s result.

    A response whose text ends in an incomplete UTF-8 character ("\\ufffd") is held back until it completes (as
    ChatGLM2/3 do), so is an end that may still become a stop string; the final state is always yielded.

    tools (ChatGLM3, GLM-4): OpenAI tools or bare function dicts, described to the model in the family's tool
    system message (which replaces one the history holds); a call comes back as {"name", "parameters"}, to be
    answered with chat(..., query=result, history=history, role="observation").
    stop: strings that end the answer (cut before the first one), matched across token boundaries.

    GLM-4.5/4.6/4.7 and GLM-Z1 (templates with `<think>`): the history's new assistant message carries the
    reasoning as `reasoning_content` (streamed as it grows) and GLM-4.5's calls as OpenAI `tool_calls`; tools are
    not stored in the history (pass them every turn); enable_thinking=False switches GLM-4.5's thinking off."""
    tokenizer = as_glmkit_tokenizer(tokenizer)
    family = family_of(tokenizer)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a string or a list of non-empty strings")
    history = list(history or [])
    as_tuples = family in ("chatglm", "chatglm2", "glm130b") or (bool(history) and not _is_messages(history))
    if tools is not None and as_tuples and family in TOOL_FAMILIES:
        raise ValueError("tools need a role-dict history (the (query, response) pairs cannot hold tool calls)")
    limit = _limits(model, family, max_length)
    ids, _ = fit_history(tokenizer, query, history, limit, system, role, tools, _template_kwargs(enable_thinking))
    style = answer_style(tokenizer)
    reading = None
    if style is not None:
        reading = (style, prompt_opens_thinking(tokenizer.decode(ids[-4:])), tools)
    if tools is not None and style != "xml":
        history = with_tools(family, history, tools)
    if system is not None and family in ("chatglm3", "glm4") and not as_tuples:
        history = [{"role": "system", "content": system}] + history
    defaults = DEFAULTS[family]
    guard = lambda input_ids, scores: invalid_score_guard(input_ids, scores, INVALID_SCORE_TOKEN_ID)  # noqa: E731
    processors = list(logits_processor or []) + [guard]
    gen_kwargs = dict(gen_kwargs)
    gen_kwargs.setdefault("top_k", HF_DEFAULT_TOP_K if do_sample else 0)
    gen_kwargs.setdefault("eos_token_id", stop_token_ids(model, tokenizer, family))
    device = getattr(model, "device", None) or next(model.parameters()).device
    if num_beams > 1:
        beams = beam_search(model, torch.tensor([ids], dtype=torch.long, device=device), num_beams=num_beams,
                            max_length=limit, eos_token_id=gen_kwargs["eos_token_id"], logits_processors=processors,
                            repetition_penalty=gen_kwargs.get("repetition_penalty", 1.0))
        state = _response_state(family, tokenizer, beams[0].tolist(), query, history, role, as_tuples, reading)
        cut = find_stop(state[0], stop) if stop and isinstance(state[0], str) else None
        yield state if cut is None else _cut(state, cut)
        return
    stream = generate_stream(
        model, torch.tensor([ids], dtype=torch.long, device=device), max_length=limit, do_sample=do_sample,
        temperature=defaults["temperature"] if temperature is None else temperature,
        top_p=defaults["top_p"] if top_p is None else top_p, logits_processors=processors, **gen_kwargs)
    out: list[int] = []
    last: tuple[Any, list[Any]] | None = None
    yielded = False
    for step in stream:
        out.append(int(step[0]))
        last = _response_state(family, tokenizer, out, query, history, role, as_tuples, reading, final=False)
        text = last[0]
        if stop and isinstance(text, str):
            cut = find_stop(text, stop)
            if cut is not None:
                stream.close()
                yield _cut(last, cut)
                return
        # hold back an unfinished character; ChatGLM2/3 also wait for a non-empty response
        if isinstance(text, str) and (text.endswith("\ufffd") or (not text and family != "chatglm"
                                                                  and not _has_reasoning(last))):
            yielded = False
            continue
        held = partial_stop(text, stop) if stop and isinstance(text, str) else 0
        if held:
            yielded = False
            yield _cut(last, len(text) - held)
            continue
        yielded = True
        yield last
    if last is None or reading is not None:  # no room to generate (an empty answer), or held-back tags to release
        final = _response_state(family, tokenizer, out, query, history, role, as_tuples, reading)
        yielded = yielded and final == last
        last = final
    if not yielded:
        yield last


def chat(model, tokenizer, query: str, history: Sequence[Any] | None = None, max_length: int | None = None,
         num_beams: int = 1, do_sample: bool = True, top_p: float | None = None, temperature: float | None = None,
         system: str | None = None, logits_processor: Sequence[Callable] | None = None, role: str = "user",
         tools: list[Any] | None = None, stop: str | Sequence[str] | None = None,
         enable_thinking: bool | None = None, **gen_kwargs: Any) -> tuple[Any, list[Any]]:
    """response, history = chat(model, tokenizer, "你好", history=[]), with the family's template, defaults,
    stop tokens and post-processing (see the module docstring; tools and stop as in stream_chat; other keyword
    arguments such as presence_penalty, frequency_penalty, repetition_penalty, top_k, seed, max_new_tokens reach
    glmkit.core.generate.generate_stream)."""
    result = None
    for result in stream_chat(model, tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                              top_p=top_p, temperature=temperature, system=system, logits_processor=logits_processor,
                              num_beams=num_beams, role=role, tools=tools, stop=stop,
                              enable_thinking=enable_thinking, **gen_kwargs):
        pass
    assert result is not None  # stream_chat always yields its final state
    return result


# ------------------------------------------------------------------------------------------ streaming text
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
