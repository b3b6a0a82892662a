"""Chat for every GLM family, as each original `chat()` / `stream_chat()` does it, through glmkit.core.generate.

Per family (read from `tokenizer.family`):

| family   | prompt                                                                                   | defaults (max_length, top_p, temperature) | stop ids                      |
|----------|------------------------------------------------------------------------------------------|------------------------------------------|-------------------------------|
| chatglm  | bare query on the first turn, else `[Round i]\\n问：q\\n答：r\\n` (i from 0) + `[gMASK] <sop>` | 2048, 0.7, 0.95                          | the model's eos (`<eop>`)     |
| chatglm2 | `[gMASK] sop` + `[Round i]\\n\\n问：q\\n\\n答：r\\n\\n` (i from 1)                          | 8192, 0.8, 0.8                           | the model's eos (`</s>`)      |
| chatglm3 | `[gMASK] sop` + `<|role|>` + enc(metadata + "\\n") + enc(content) per message + `<|assistant|>` | 8192, 0.8, 0.8                    | eos, `<|user|>`, `<|observation|>` |
| glm4     | the chat template: `[gMASK]<sop>` + `<|role|>{metadata}\\n{content}` per message + `<|assistant|>` | 8192, 0.8, 0.8                   | `<|endoftext|>`, `<|user|>`, `<|observation|>` |

Sampling uses top_k 50 unless given (transformers' default, which the originals inherit), and every family adds the
NaN/inf guard (`InvalidScoreLogitsProcessor`: all scores 0, token 5 at 5e4). `max_length` counts prompt + answer.

History: ChatGLM-6B/ChatGLM2 keep `[(query, response), ...]`. ChatGLM3/GLM-4 keep role dicts
(`{"role": "user"|"assistant"|"system"|"observation", "content": ..., "metadata": ...}`) as their originals do; a
caller that passes `(query, response)` tuples gets tuples back, so one calling convention works for every family.

Beyond the originals: history that does not fit `max_length` (default: the family's, capped at
`model.config.max_seq_len`) is dropped oldest turn first (the returned history still holds every turn); `system=` adds a system message for ChatGLM3/GLM-4 (a clear
error elsewhere); the caller's history list is never mutated. num_beams > 1 runs glmkit's deterministic beam
search (transformers' beam-search scoring; sampling arguments are ignored in that mode and stream_chat yields once).
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from glmkit.core.generate import beam_search, generate_stream, invalid_score_guard
from glmkit.core.tokenizer import load_tokenizer

Turn = tuple[str, str]

DEFAULTS: dict[str, dict[str, Any]] = {
    "chatglm": {"max_length": 2048, "top_p": 0.7, "temperature": 0.95},
    "chatglm2": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
    "chatglm3": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
    # GLM-4 has no chat(); its generation_config samples with top_p 0.8 / temperature 0.8. glmkit caps the default
    # length at 8192 (the model's 128K context would preallocate a huge KV cache); pass max_length for more.
    "glm4": {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
}
HF_DEFAULT_TOP_K = 50
INVALID_SCORE_TOKEN_ID = 5
ROLES = ("system", "user", "assistant", "observation")

_PUNCT = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")]


# -------------------------------------------------------------------------------------------- prompt building

def family_of(tokenizer) -> str:
    fam = getattr(tokenizer, "family", None)
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


def chatglm_prompt(query: str, history: Sequence[Turn]) -> str:
    """ChatGLM-6B: the bare query without history; otherwise 0-based rounds with single newlines."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def chatglm2_prompt(query: str, history: Sequence[Turn]) -> str:
    """ChatGLM2-6B: 1-based rounds with blank lines between the parts."""
    prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def _message_content(item: dict[str, Any]) -> str:
    content = item.get("content", "")
    if not isinstance(content, str):  # an assistant tool call kept as a dict
        content = json.dumps(content, ensure_ascii=False)
    if item.get("role") == "system" and "tools" in item:
        content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
    return content


def chatglm3_ids(tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """ChatGLM3 `build_chat_input`: per message `<|role|>` + enc(metadata + "\\n") + enc(content), encoded
    separately with SentencePiece; `[gMASK] sop` first and `<|assistant|>` last."""
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    for item in messages:
        ids.append(tokenizer.get_command(f"<|{item['role']}|>"))
        ids += tokenizer.sp_encode(f"{item.get('metadata', '') or ''}\n")
        ids += tokenizer.sp_encode(_message_content(item))
    return ids + [tokenizer.get_command("<|assistant|>")]


def glm4_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """GLM-4's chat template (without tools): messages with empty content are skipped, as the template does."""
    parts = ["[gMASK]<sop>"]
    for item in messages:
        if "tools" in item:
            raise ValueError("GLM-4 tool descriptions (a system message with 'tools') are not supported by "
                             "glmkit's chat; put the tool text into the system content")
        content = _message_content(item)
        if content:
            parts.append(f"<|{item['role']}|>{item.get('metadata', '') or ''}\n{content}")
    parts.append("<|assistant|>")
    return "".join(parts)


def _ids_for(tokenizer, family: str, query: str, history: Sequence[Any], system: str | None,
             role: str = "user") -> list[int]:
    if family in ("chatglm", "chatglm2"):
        if system is not None:
            raise ValueError(f"{family} has no system prompt (only ChatGLM3 and GLM-4 do); put it into the query")
        if role != "user":
            raise ValueError(f"{family} has no roles; role={role!r} is only for ChatGLM3 and GLM-4")
        turns = _as_turns(history)
        prompt = chatglm_prompt(query, turns) if family == "chatglm" else chatglm2_prompt(query, turns)
        return tokenizer.encode(prompt)
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    messages = _as_messages(history)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    messages = messages + [{"role": role, "content": query}]
    if family == "chatglm3":
        return chatglm3_ids(tokenizer, messages)
    return tokenizer.encode(glm4_prompt(messages), add_special_tokens=False)


def build_chat_input(tokenizer, query: str, history: Sequence[Any] | None = None, system: str | None = None,
                     role: str = "user") -> list[int]:
    """The prompt ids the family's original chat() feeds the model (no truncation)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    tokenizer = as_glmkit_tokenizer(tokenizer)
    return _ids_for(tokenizer, family_of(tokenizer), query, list(history or []), system, role)


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
                role: str = "user") -> tuple[list[int], list[Any]]:
    """Prompt ids and the history they hold, dropping the oldest turns until the prompt leaves room for at
    least one new token within `limit` (prompt + answer)."""
    family = family_of(tokenizer)
    kept = list(history or [])
    while True:
        ids = _ids_for(tokenizer, family, query, kept, system, role)
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


def _tool_call_arguments(code: str) -> dict[str, Any]:
    """The keyword arguments of `tool_call(a=..., b=...)` (ChatGLM3 eval()s this; glmkit parses literals only)."""
    tree = ast.parse(code.strip(), mode="eval")
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
            and not call.args):
        raise ValueError("not a tool_call(...) with keyword arguments")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}


def process_chatglm3_response(output: str, history: Sequence[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """ChatGLM3's process_response: each `<|assistant|>`-separated part is `metadata\\ncontent`; an empty metadata
    is a plain answer (stripped), a non-empty one a tool call (a dict). A part without a newline is taken as
    content (the original would raise)."""
    content: Any = ""
    history = copy.deepcopy(list(history))
    for response in output.split("<|assistant|>"):
        metadata, content = response.split("\n", maxsplit=1) if "\n" in response else ("", response)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if history[0]["role"] == "system" and "tools" in history[0]:
                code = "\n".join(content.split("\n")[1:-1])
                try:
                    content = {"name": metadata.strip(), "parameters": _tool_call_arguments(code)}
                except (ValueError, SyntaxError):
                    content = {"name": metadata.strip(), "content": content}
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


def stop_token_ids(model, tokenizer, family: str) -> list[int]:
    if family in ("chatglm3", "glm4"):
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    ids = list(getattr(model.config, "eos_token_ids", []) or [])
    return ids or [tokenizer.eos_token_id]


def _response_state(family: str, tokenizer, out: list[int], query: str, history: list[Any], role: str,
                    as_tuples: bool) -> tuple[Any, list[Any]]:
    """(response, new history) for the tokens generated so far, as each family's chat() post-processes them."""
    if family in ("chatglm", "chatglm2"):
        text = tokenizer.decode(out)
        response = process_chatglm_response(text) if family == "chatglm" else process_chatglm2_response(text)
        return response, history + [(query, response)]
    # ChatGLM3 drops the last generated token (the stop token when generation ended on one); GLM-4's chat template
    # path has no chat(), glmkit drops a trailing stop token the same way.
    text = tokenizer.decode(out[:-1])
    messages = _as_messages(history) + [{"role": role, "content": query}]
    response, new_messages = process_chatglm3_response(text, messages)
    if as_tuples:
        answer = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        return response, history + [(query, answer)]
    return response, new_messages


def stream_chat(model, tokenizer, query: str, history: Sequence[Any] | None = None, max_length: int | None = None,
                do_sample: bool = True, top_p: float | None = None, temperature: float | None = None,
                system: str | None = None, logits_processor: Sequence[Callable] | None = None, num_beams: int = 1,
                role: str = "user", **gen_kwargs: Any) -> Iterator[tuple[Any, list[Any]]]:
    """Yields (response so far, history + this turn) as tokens arrive; the last item equals chat()'s result.

    A response whose text ends in an incomplete UTF-8 character ("\\ufffd") is held back until it completes (as
    ChatGLM2/3 do); the final state is always yielded."""
    tokenizer = as_glmkit_tokenizer(tokenizer)
    family = family_of(tokenizer)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    history = list(history or [])
    as_tuples = family in ("chatglm", "chatglm2") or (bool(history) and not _is_messages(history))
    limit = _limits(model, family, max_length)
    ids, _ = fit_history(tokenizer, query, history, limit, system, role)
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
        yield _response_state(family, tokenizer, beams[0].tolist(), query, history, role, as_tuples)
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
        last = _response_state(family, tokenizer, out, query, history, role, as_tuples)
        text = last[0]
        # hold back an unfinished character; ChatGLM2/3 also wait for a non-empty response
        if isinstance(text, str) and (text.endswith("\ufffd") or (not text and family != "chatglm")):
            yielded = False
            continue
        yielded = True
        yield last
    if last is None:  # no room to generate: an empty answer
        last = _response_state(family, tokenizer, out, query, history, role, as_tuples)
        yielded = False
    if not yielded:
        yield last


def chat(model, tokenizer, query: str, history: Sequence[Any] | None = None, max_length: int | None = None,
         num_beams: int = 1, do_sample: bool = True, top_p: float | None = None, temperature: float | None = None,
         system: str | None = None, logits_processor: Sequence[Callable] | None = None, role: str = "user",
         **gen_kwargs: Any) -> tuple[Any, list[Any]]:
    """response, history = chat(model, tokenizer, "你好", history=[]), with the family's template, defaults,
    stop tokens and post-processing (see the module docstring)."""
    result = None
    for result in stream_chat(model, tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                              top_p=top_p, temperature=temperature, system=system, logits_processor=logits_processor,
                              num_beams=num_beams, role=role, **gen_kwargs):
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
