"""Each family's chat prompt, built exactly as the original builds it, and `apply_chat_template` (transformers'
convention) over all of them. The tokenizers' `apply_chat_template` method and glmkit.core.chat both come here.

| family   | prompt                                                                                         | ids                          |
|----------|------------------------------------------------------------------------------------------------|------------------------------|
| chatglm  | bare query on the first turn, else `[Round i]\\n问：q\\n答：r\\n` (i from 0)                        | encode(prompt) (+ `[gMASK] <sop>`) |
| chatglm2 | `[Round i]\\n\\n问：q\\n\\n答：r\\n\\n` (i from 1)                                                  | encode(prompt) (`[gMASK] sop` +) |
| chatglm3 | `build_chat_input`: per message `<|role|>` + sp(metadata + "\\n") + sp(content), system `tools` as `content + "\\n" + json.dumps(tools, indent=4)` | `[gMASK] sop` + those + `<|assistant|>` |
| glm4     | the `chat_template` of tokenizer_config.json, rendered with jinja2 as transformers renders it    | encode(text, no special tokens added) |

GLM-4's template is the checkpoint's own (tokenizer_config.json `chat_template`, a named-template list's "default",
or a `chat_template.jinja` beside it). A folder without one gets the template glm-4-9b-chat publishes, bundled as
glmkit/assets/glm4-chat-template.jinja (verbatim: the tokenizer_config.json string of THUDM/glm-4-9b-chat, as quoted
in ShishirPatil/gorilla bfcl_eval/model_handler/local_inference/glm.py @6ea5797 and ollama's template tests).
Rendering matches transformers' `_compile_jinja_template`: a sandboxed environment with trim_blocks, lstrip_blocks
and loopcontrols, `tojson` as json.dumps (ensure_ascii=False, no sorting, indent as given), `raise_exception` and
`strftime_now`, and the tokenizer's special tokens (eos_token, pad_token, ...) as variables.

`tools=` and OpenAI-shaped messages are first mapped to the family's native messages (glmkit.core.tools): GLM-4's
template reads tools from a system message, so the tools become that message (as GLM-4's own OpenAI server does),
unless the template itself reads a `tools` variable, which then gets them. ChatGLM3 checkpoints that ship a jinja
`chat_template` are still built with `build_chat_input`, the format the model was trained on.

With `tokenize=False` the prompt text is returned: for ChatGLM-6B/ChatGLM2 the text before `encode` adds its special
tokens; for ChatGLM3 the parts joined as text ("[gMASK]sop<|user|>\\nq<|assistant|>"; ChatGLM3's tokenizer reads
role-token strings in text as plain text, so the ids come from the parts, not from this text).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from glmkit.core.tools import ToolError, has_tools_message, to_native_messages, validate_tools

Turn = tuple[str, str]
GLM4_DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "assets" / "glm4-chat-template.jinja"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                       "additional_special_tokens")


# ----------------------------------------------------------------------------------------- ChatGLM-6B / ChatGLM2
def chatglm_prompt(query: str, history: Sequence[Turn], always_rounds: bool = False) -> str:
    """ChatGLM-6B: the bare query without history; otherwise 0-based rounds with single newlines. `always_rounds`:
    the rounds even without history (ptuning/main.py's training rows when a history column is set)."""
    if not history and not always_rounds:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def chatglm2_prompt(query: str, history: Sequence[Turn]) -> str:
    """ChatGLM2-6B: 1-based rounds with blank lines between the parts."""
    prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def _rounds(family: str, messages: Sequence[dict[str, Any]]) -> tuple[list[Turn], str]:
    """(history pairs, query) of a user/assistant conversation that ends with the user's message."""
    turns: list[Turn] = []
    pending: str | None = None
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system":
            raise ValueError(f"{family} has no system role (only ChatGLM3 and GLM-4 do); put it into the query")
        if role not in ("user", "assistant"):
            raise ValueError(f"messages[{i}]: {family} has only user and assistant messages, got role {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        if (role == "user") != (pending is None):
            raise ValueError(f"messages[{i}]: {family} needs user and assistant messages in turn, starting with "
                             "the user's")
        if role == "user":
            pending = content
        else:
            turns.append((pending or "", content))
            pending = None
    if pending is None:
        raise ValueError(f"{family}'s prompt ends with the user's question: the last message must be the user's")
    return turns, pending


# -------------------------------------------------------------------------------------------------- ChatGLM3
def message_content(item: dict[str, Any]) -> str:
    """A native message's content as build_chat_input encodes it (a system message's tools JSON-dumped after it)."""
    content = item.get("content", "")
    if content is None:
        content = ""
    if not isinstance(content, str):  # an assistant tool call kept as a dict
        content = json.dumps(content, ensure_ascii=False)
    if item.get("role") == "system" and "tools" in item:
        content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
    return content


def chatglm3_ids(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """ChatGLM3 `build_chat_input`: per message `<|role|>` + enc(metadata + "\\n") + enc(content), encoded
    separately with SentencePiece; `[gMASK] sop` first and `<|assistant|>` last."""
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    for item in messages:
        ids.append(tokenizer.get_command(f"<|{item['role']}|>"))
        ids += tokenizer.sp_encode(f"{item.get('metadata', '') or ''}\n")
        ids += tokenizer.sp_encode(message_content(item))
    return ids + ([tokenizer.get_command("<|assistant|>")] if add_generation_prompt else [])


def chatglm3_text(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    parts = ["[gMASK]sop"] + [f"<|{m['role']}|>{m.get('metadata', '') or ''}\n{message_content(m)}" for m in messages]
    return "".join(parts) + ("<|assistant|>" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------------- GLM-4
def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The jinja2 template, compiled with transformers' chat-template environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the tokenizer's chat_template is not valid jinja: {err}") from None


@functools.lru_cache(maxsize=16)
def template_reads_tools(source: str) -> bool:
    """True when the template reads a top-level `tools` variable and no message's `tools` (GLM-4-9B's template
    reads `item['tools']` of a system message, and only sets a local `tools` from it)."""
    import jinja2
    from jinja2 import meta

    if re.search(r"\[\s*['\"]tools['\"]\s*\]|\w\.tools\b", source):
        return False
    return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(source))


def chat_template_source(tokenizer, tools: Any = None) -> str:
    """The tokenizer's jinja chat template (see the module docstring for where it is looked up)."""
    cfg = getattr(tokenizer, "init_kwargs", {}) or {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # transformers' named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        if template is None:
            raise ValueError(f"the tokenizer's chat_template list has no 'default' template: {sorted(named)}")
    if template is None:
        beside = Path(getattr(tokenizer, "vocab_file", "")).parent / "chat_template.jinja"
        template = beside.read_text(encoding="utf-8") if beside.is_file() else None
    if template is None:
        template = GLM4_DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    if not isinstance(template, str):
        raise ValueError("the tokenizer's chat_template must be a jinja string")
    return template


def is_xml_tool_template(source: str) -> bool:
    """GLM-4.5/4.6/4.7's template family: OpenAI-shaped messages (role "tool", assistant tool_calls and
    reasoning_content), `tools` read at the top level, calls written as <tool_call>name<arg_key>..</tool_call>."""
    return "<arg_key>" in source


def answer_style(tokenizer) -> str | None:
    """How this tokenizer's answers are read: "xml" (GLM-4.5/4.6/4.7: `<think>` reasoning and XML tool calls),
    "think" (a GLM-4 template with `<think>` reasoning: GLM-Z1, whose generation prompt opens it), or None (the
    answer is text or a GLM-4 metadata-line call)."""
    if getattr(tokenizer, "family", None) != "glm4":
        return None
    source = chat_template_source(tokenizer)
    if is_xml_tool_template(source):
        return "xml"
    return "think" if "<think>" in source else None


def prompt_opens_thinking(prompt: str) -> bool:
    """The prompt ends inside `<think>` (GLM-Z1, GLM-4.7): the answer starts with reasoning."""
    return prompt.rstrip().endswith("<think>")


def xml_template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as GLM-4.5's template reads them: tool-call arguments as mappings (OpenAI sends JSON text)."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for j, call in enumerate(calls):
                fn = dict(call.get("function", call))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
                fixed.append({**call, "function": fn} if "function" in call else fn)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def render_glm4(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[Any] | None = None, source: str | None = None,
                template_kwargs: dict[str, Any] | None = None) -> str:
    """GLM-4's prompt text: the chat template rendered over native messages (tools already in a system message,
    unless the template reads `tools` itself)."""
    import jinja2

    source = source if source is not None else chat_template_source(tokenizer, tools)
    cfg = getattr(tokenizer, "init_kwargs", {}) or {}
    special = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        elif key == "additional_special_tokens" and isinstance(value, list):
            value = [v.get("content") if isinstance(v, dict) else v for v in value]
        if value is not None:
            special[key] = value
    reserved = {"messages", "tools", "documents", "add_generation_prompt", *special} & set(template_kwargs or {})
    if reserved:
        raise ValueError(f"template variables {sorted(reserved)} are set by the chat template itself")
    try:
        return compile_template(source).render(**(template_kwargs or {}), messages=list(messages), tools=tools,
                                               documents=None, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as err:
        raise ValueError(f"the chat template failed on these messages: {err}") from None


# ---------------------------------------------------------------------------------------------- all families
def apply_chat_template(tokenizer, messages: Sequence[dict[str, Any]], tools: list[Any] | None = None,
                        add_generation_prompt: bool = True, tokenize: bool = True,
                        template_kwargs: dict[str, Any] | None = None) -> list[int] | str:
    """The prompt the family's original builds for `messages` (native or OpenAI-shaped role dicts), as ids or, with
    tokenize=False, as text. `tools` (OpenAI tools or bare function dicts) are described to the model the family's
    way; ChatGLM-6B and ChatGLM2 have no tools, system role or tool messages (a ValueError says so)."""
    family = getattr(tokenizer, "family", None)
    if family not in ("chatglm", "chatglm2", "chatglm3", "glm4"):
        raise ValueError(f"tokenizer family {family!r} has no chat template glmkit knows")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    if tools is not None:
        if family not in ("chatglm3", "glm4"):
            raise ToolError(f"{family} has no tool calling (only ChatGLM3 and GLM-4 do); call it without tools")
        tools = validate_tools(tools, strict=False)
    if family in ("chatglm", "chatglm2"):
        native = to_native_messages(family, messages)
        if not add_generation_prompt:
            raise ValueError(f"{family}'s prompt always ends with the answer's cue (答：); add_generation_prompt=False "
                             "has no meaning there")
        turns, query = _rounds(family, native)
        text = chatglm_prompt(query, turns) if family == "chatglm" else chatglm2_prompt(query, turns)
        return tokenizer.encode(text) if tokenize else text
    if family == "chatglm3":
        native = to_native_messages(family, messages, tools)
        for i, m in enumerate(native):
            if m.get("role") not in ("system", "user", "assistant", "observation"):
                raise ValueError(f"messages[{i}].role {m.get('role')!r} is not a ChatGLM3 role")
        if tokenize:
            return chatglm3_ids(tokenizer, native, add_generation_prompt)
        return chatglm3_text(native, add_generation_prompt)
    source = chat_template_source(tokenizer, tools)
    if is_xml_tool_template(source):  # GLM-4.5/4.6/4.7: the template takes OpenAI messages and tools as they are
        text = render_glm4(tokenizer, xml_template_messages(messages), add_generation_prompt, tools, source,
                           template_kwargs)
        return tokenizer.encode(text, add_special_tokens=False) if tokenize else text
    own_tools = bool(tools) and template_reads_tools(source)
    native = to_native_messages(family, messages, None if own_tools else tools)
    if own_tools and has_tools_message(native):
        raise ToolError("the tools are given twice: as `tools` and in a system message of the conversation")
    text = render_glm4(tokenizer, native, add_generation_prompt, tools if own_tools else None, source,
                       template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False) if tokenize else text
