"""Tool calling for ChatGLM3 and GLM-4: tool schemas, OpenAI-shaped messages -> each family's native messages, the
model's answer -> tool calls, and the constraint behind `tool_choice` "required" / a named function.

How each family writes a tool call (the text after `<|assistant|>`; the first line is the message's metadata):

| family   | tool description (native)                                           | a call                                                 | a result               |
|----------|---------------------------------------------------------------------|--------------------------------------------------------|------------------------|
| chatglm3 | system message: CHATGLM3_TOOL_PROMPT + "\\n" + json.dumps(tools, indent=4) | `name\\n```python\\ntool_call(a=1, b='x')\\n```` | `<|observation|>` msg  |
| glm4     | system message `{"content": None, "tools": [...]}` the chat template renders as `# 可用工具` | `name\\n{"a": 1, "b": "x"}`           | `<|observation|>` msg  |

A plain answer has an empty metadata line (it starts with "\\n").

OpenAI messages -> native messages, as THUDM's own OpenAI servers map them (GLM-4 `basic_demo/glm_server.py`'s
`process_messages`, the last revision before basic_demo was removed, a3e59fb; ChatGLM3 `openai_api_demo/utils.py`'s
`process_chatglm_messages`, 732294f):

| OpenAI                                              | chatglm3                                          | glm4                                             |
|-----------------------------------------------------|---------------------------------------------------|--------------------------------------------------|
| `tools` (tool_choice not "none")                    | first: system, content CHATGLM3_TOOL_PROMPT, `tools` as given | first: system, content None, `tools` (bare function dicts wrapped as `{"type": "function", "function": ...}`) |
| system / developer                                  | system                                            | system                                           |
| user                                                | user                                              | user                                             |
| assistant, plain content                            | assistant, metadata ""                            | assistant, metadata "", content stripped         |
| assistant `tool_calls` (arguments: a JSON string)   | per call: assistant, metadata = name, content = "```python\\ntool_call(k=v, ...)\\n```" (the form the model writes) | per call: assistant, metadata = name, content = the arguments string |
| assistant legacy `function_call`                    | the same, from `function_call`; a content holding the model's raw output is split at `<|assistant|>` into metadata/content as the demo does | the same, from `function_call` |
| tool (`tool_call_id`) / legacy function             | observation                                       | observation                                      |

(glmkit.core.chat's `tools=` gives ChatGLM3 the bare function dicts instead, the form of ChatGLM3's own tool demo and
PROMPT.md.) glmkit departs from those servers where they lose information: the caller's system message is kept (both servers
drop it when tools are given), a system message is not repeated (GLM-4's server inserts it a second time when no tools
are given), a multi-line assistant answer stays one message (GLM-4's server makes one message per line), text that
an assistant message carries next to its tool calls is kept as a plain assistant message before them, and a
`tool_call_id` must name a call an earlier assistant message made. `tool_choice` naming one function keeps only that
tool in the prompt, as GLM-4's server does (its extra empty assistant message renders as nothing, so it is left out).

Parsing (`parse_tool_calls`) follows the originals' response processing without evaluating model output:
- chatglm3 (modeling_chatglm.py `process_response`): the last `<|assistant|>` part; a non-empty metadata line is a
  call; the lines between the first and the last line of its content hold `tool_call(...)`, which the original
  `eval`s and glmkit reads with `ast` (keyword arguments whose values are Python literals).
- glm4 (glm_server.py `process_response`): a part whose first line is the name of an offered tool (or GLM-4's
  built-in `cogview` / `simple_browser`) and whose second line starts with "{" is a call; the arguments are the JSON
  of the lines after the name. glmkit reads every `<|assistant|>` part, so parallel calls come back as a list.
A call the model got wrong (arguments that do not parse, are not an object, are not JSON-serialisable) gives an
entry `{"name", "error", "text"}` instead of `{"name", "arguments"}`; nothing raises.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any

CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_BUILTIN_TOOLS = ("cogview", "simple_browser")
TOOL_FAMILIES = ("chatglm3", "glm4")
NATIVE_ROLES = ("system", "user", "assistant", "observation")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolError(ValueError):
    """A tool schema, a tool choice or a tool message that cannot be used; the message says which and why."""


# ------------------------------------------------------------------------------------------------ tool schemas
def tool_function(tool: Any, where: str = "tools[0]", strict: bool = True) -> dict[str, Any]:
    """The function dict (`name`, `description`, `parameters`) of an OpenAI tool `{"type": "function", "function":
    {...}}` or of a bare function dict; a clear ToolError for anything else. strict: names follow OpenAI's rule
    (1-64 of A-Z a-z 0-9 _ -); otherwise any one-line name (ChatGLM3's own demo has "/text-to-speech")."""
    if not isinstance(tool, dict):
        raise ToolError(f"{where} must be an object, got {type(tool).__name__}")
    if "function" in tool or "type" in tool:
        if tool.get("type") != "function":
            raise ToolError(f"{where}.type must be 'function', got {json.dumps(tool.get('type'))}")
        fn = tool.get("function")
        where = f"{where}.function"
    else:
        fn = tool
    if not isinstance(fn, dict):
        raise ToolError(f"{where} must be an object with a 'name'")
    name = fn.get("name")
    if strict and (not isinstance(name, str) or not TOOL_NAME.match(name)):
        raise ToolError(f"{where}.name must be 1-64 letters, digits, '_' or '-', got {json.dumps(name)}")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise ToolError(f"{where}.name must be a one-line, non-empty string, got {json.dumps(name)}")
    if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
        raise ToolError(f"{where}.description must be a string")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ToolError(f"{where}.parameters must be a JSON Schema object, got {type(params).__name__}")
        if params.get("type", "object") != "object":
            raise ToolError(f"{where}.parameters.type must be 'object', got {json.dumps(params.get('type'))}")
        if "properties" in params and not isinstance(params["properties"], dict):
            raise ToolError(f"{where}.parameters.properties must be an object")
    return fn


def validate_tools(tools: Any, param: str = "tools", strict: bool = True) -> list[dict[str, Any]]:
    """Checks a tool list (OpenAI tools or bare function dicts): a non-empty list, valid functions, unique names
    (strict: OpenAI's name rule, see tool_function)."""
    if not isinstance(tools, list) or not tools:
        raise ToolError(f"'{param}' must be a non-empty list of tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool_function(tool, f"{param}[{i}]", strict)["name"]
        if name in seen:
            raise ToolError(f"{param}[{i}]: the tool name {name!r} is given twice")
        seen.add(name)
    return list(tools)


def tool_names(tools: Sequence[Any] | None) -> list[str]:
    """The function names of a tool list (OpenAI tools, bare function dicts, or GLM-4's built-in tool entries)."""
    names = []
    for tool in tools or []:
        if isinstance(tool, dict) and tool.get("type") in GLM4_BUILTIN_TOOLS + ("python",):
            names.append(tool["type"])
        elif isinstance(tool, dict):
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
    return names


def wrap_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool `{"type": "function", "function": ...}` (GLM-4's template reads that shape); wrapped ones and
    GLM-4's built-in entries (`{"type": "python"}`...) pass through."""
    if "type" in tool:
        return tool
    return {"type": "function", "function": tool}


def select_tools(tools: list[dict[str, Any]] | None, tool_choice: Any = None,
                 param: str = "tool_choice") -> tuple[list[dict[str, Any]], list[str] | None]:
    """(tools to put into the prompt, names the answer must call or None) for an OpenAI tool_choice: "none" (no
    tools), "auto" / None (the model decides), "required" (one of them), or {"type": "function", "function":
    {"name": ...}} (that one, the only tool left in the prompt)."""
    tools = list(tools or [])
    if tool_choice is None or tool_choice == "auto":
        return tools, None
    if tool_choice == "none":
        return [], None
    if tool_choice == "required":
        if not tools:
            raise ToolError(f"'{param}' is 'required' but no tools are given")
        return tools, tool_names(tools)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError(f"'{param}' must be 'none', 'auto', 'required' or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        chosen = [t for t in tools if tool_names([t]) == [name]]
        if not chosen:
            raise ToolError(f"'{param}' names the function {name!r}, which is not one of the tools "
                            f"{tool_names(tools)}")
        return chosen, [name]
    raise ToolError(f"'{param}' must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                    f"{{\"name\": ...}}}}, got {json.dumps(tool_choice)}")


# --------------------------------------------------------------------------------- a Python function as a tool
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
                               tuple: "array", dict: "object", type(None): "null"}


def _json_schema(annotation: Any) -> dict[str, Any]:
    """JSON Schema of a type annotation (str, int, float, bool, list[X], dict, Literal[...], X | None, Annotated)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        schema = _json_schema(args[0])
        desc = next((a for a in args[1:] if isinstance(a, str)), None)
        return {**schema, "description": desc} if desc else schema
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        inner = [a for a in args if a is not type(None)]
        return _json_schema(inner[0]) if len(inner) == 1 else {"anyOf": [_json_schema(a) for a in inner]}
    if origin in (list, tuple, set, Sequence):
        schema: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = _json_schema(args[0])
        return schema
    if origin is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    raise ToolError(f"cannot describe the type {annotation!r} in JSON Schema; use str, int, float, bool, list, dict "
                    "or Literal")


def _docstring_args(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) from a Google-style docstring ("Args:" section)."""
    lines = doc.splitlines()
    desc_lines, args, current, in_args = [], {}, None, False
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            if stripped in ("Returns:", "Raises:", "Yields:", "Examples:", "Example:") or (
                    stripped and not line.startswith((" ", "\t"))):
                in_args = False
                current = None
                continue
            m = re.match(r"^\s*(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if m:
                current = m.group(1)
                args[current] = m.group(3).strip()
            elif current and stripped:
                args[current] = f"{args[current]} {stripped}".strip()
        elif not any(stripped == s for s in ("Returns:", "Raises:")):
            desc_lines.append(line)
        else:
            break
    return "\n".join(desc_lines).strip(), args


def function_schema(fn: Callable) -> dict[str, Any]:
    """An OpenAI tool for a plain Python function: its name, its docstring (the part before "Args:") as the
    description, and a JSON Schema of its parameters from the signature (type hints; parameters without a default
    are required) and the docstring's "Args:" lines."""
    if not callable(fn) or not getattr(fn, "__name__", None):
        raise ToolError(f"{fn!r} is not a named function")
    name = fn.__name__
    if not TOOL_NAME.match(name):
        raise ToolError(f"function name {name!r} is not a valid tool name (1-64 letters, digits, '_' or '-')")
    description, arg_docs = _docstring_args(inspect.getdoc(fn) or "")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones
        hints = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"{name}: *{pname} / **{pname} cannot be described as tool parameters")
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolError(f"{name}: the positional-only parameter {pname!r} cannot be passed by name")
        try:
            schema = _json_schema(hints.get(pname, param.annotation))
        except ToolError as err:
            raise ToolError(f"{name}({pname}): {err}") from None
        if pname in arg_docs and "description" not in schema:
            schema["description"] = arg_docs[pname]
        properties[pname] = schema
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    function: dict[str, Any] = {"name": name, "description": description,
                                "parameters": {"type": "object", "properties": properties, "required": required}}
    return {"type": "function", "function": function}


# ------------------------------------------------------------------------- OpenAI messages -> native messages
def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ToolError(f"{where}.content must be a string or a list of text parts")


def _arguments(value: Any, where: str) -> tuple[str, dict[str, Any] | None]:
    """(the arguments as a string, as a dict when they are a JSON object) of a tool call's `arguments`."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False), value
    if value is None:
        return "{}", {}
    if not isinstance(value, str):
        raise ToolError(f"{where}.arguments must be a JSON string")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value, None
    return value, parsed if isinstance(parsed, dict) else None


def _python_literal(value: Any) -> str:
    """A Python literal of a JSON value, as ChatGLM3 writes `tool_call(...)` arguments and THUDM's OpenAI demo sends
    them back: `repr` of the value (`city='Beijing'`, `days=3`, `ok=True`, `tags=['a', {'b': 1}]`)."""
    def check(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ToolError(f"cannot write {v!r} as a Python literal")
        if isinstance(v, list):
            for item in v:
                check(item)
        elif isinstance(v, dict):
            for item in v.values():
                check(item)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise ToolError(f"cannot write {type(v).__name__} as a Python literal")
    check(value)
    return repr(value)


def chatglm3_call_content(arguments: dict[str, Any]) -> str:
    """The content of a ChatGLM3 tool-call message: "```python\\ntool_call(a=1, b='x')\\n```"."""
    for key in arguments:
        if not (isinstance(key, str) and key.isidentifier()):
            raise ToolError(f"ChatGLM3 writes tool arguments as Python keywords; {key!r} is not an identifier")
    body = ", ".join(f"{k}={_python_literal(v)}" for k, v in arguments.items())
    return f"```python\ntool_call({body})\n```"


def _is_openai(message: dict[str, Any]) -> bool:
    return (message.get("role") in ("tool", "function", "developer") or bool(message.get("tool_calls"))
            or bool(message.get("function_call")))


def has_tools_message(messages: Sequence[dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "system" and "tools" in m for m in messages)


def to_native_messages(family: str, messages: Sequence[Any], tools: list[Any] | None = None) -> list[dict[str, Any]]:
    """A conversation as the family's native role dicts (see the module docstring's table). Native messages (roles
    system/user/assistant/observation with `metadata`, a system message with `tools`) pass through unchanged;
    OpenAI ones (role tool/function/developer, assistant `tool_calls` / `function_call`) are mapped. `tools` adds the
    family's tool system message first."""
    if not isinstance(messages, (list, tuple)):
        raise ToolError("messages must be a list of {role, content} objects")
    if tools and family not in TOOL_FAMILIES:
        raise ToolError(f"{family} has no tool calling (only ChatGLM3 and GLM-4 do); call it without tools")
    out: list[dict[str, Any]] = []
    if tools:
        if has_tools_message(messages):
            raise ToolError("the tools are given twice: as `tools` and in a system message of the conversation")
        if family == "chatglm3":
            out.append({"role": "system", "content": CHATGLM3_TOOL_PROMPT, "tools": list(tools)})
        else:
            out.append({"role": "system", "content": None, "tools": [wrap_tool(t) for t in tools]})
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ToolError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not _is_openai(message):
            if role not in NATIVE_ROLES:
                raise ToolError(f"{where}.role {json.dumps(role)} is not one of system, user, assistant, tool, "
                                "observation")
            if family not in TOOL_FAMILIES and (role == "observation" or message.get("metadata") or "tools" in message):
                raise ToolError(f"{where}: {family} has no tool messages (no observation role, metadata or tools)")
            if family == "glm4" and role == "assistant" and "metadata" not in message \
                    and isinstance(message.get("content"), str):
                # an OpenAI-shaped plain reply: GLM-4's server strips it (process_messages: sub_content.strip());
                # user, system and observation contents go through as they are, there and in the template
                message = {**message, "content": message["content"].strip()}
            out.append(message)
            continue
        if family not in TOOL_FAMILIES:
            raise ToolError(f"{where}: {family} has no tool calling (role {role!r}, tool_calls, function_call are "
                            "for ChatGLM3 and GLM-4)")
        if role == "developer":
            out.append({"role": "system", "content": _text(message.get("content"), where)})
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id")
            if role == "tool" and call_id is not None and call_ids and call_id not in call_ids:
                raise ToolError(f"{where}.tool_call_id {json.dumps(call_id)} names no tool call of an earlier "
                                "assistant message")
            content = message.get("content")
            out.append({"role": "observation", "content": content if isinstance(content, str)
                        else json.dumps(content, ensure_ascii=False)})
        elif role == "assistant":
            out.extend(_assistant_calls(family, message, where, call_ids))
        else:
            raise ToolError(f"{where}: role {role!r} cannot carry tool_calls or function_call")
    return out


def _assistant_calls(family: str, message: dict[str, Any], where: str, call_ids: set[str]) -> list[dict[str, Any]]:
    text = _text(message.get("content"), where)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ToolError(f"{where}.tool_calls must be a list")
    legacy = message.get("function_call")
    if legacy and family == "chatglm3" and text.strip():
        # ChatGLM3's demo sends the model's own output back as content: "name\n```python ...```" parts
        out = []
        for part in text.split("<|assistant|>"):
            metadata, _, body = part.partition("\n") if "\n" in part else ("", "", part)
            out.append({"role": "assistant", "metadata": metadata, "content": body.strip()})
        return out
    entries: list[tuple[str, Any]] = []
    for j, call in enumerate(calls):
        cw = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ToolError(f"{cw} must be an object with 'id', 'type': 'function' and 'function': "
                            "{'name', 'arguments'}")
        if isinstance(call.get("id"), str):
            call_ids.add(call["id"])
        entries.append((call["function"].get("name"), call["function"].get("arguments")))
    if legacy:
        if not isinstance(legacy, dict):
            raise ToolError(f"{where}.function_call must be an object with 'name' and 'arguments'")
        entries.append((legacy.get("name"), legacy.get("arguments")))
    if family == "glm4":
        text = text.strip()  # as a plain reply (above)
    out = [{"role": "assistant", "metadata": "", "content": text}] if text else []
    for j, (name, arguments) in enumerate(entries):
        cw = f"{where}.tool_calls[{j}].function"
        if not isinstance(name, str) or not name:
            raise ToolError(f"{cw}.name must be a non-empty string")
        raw, parsed = _arguments(arguments, cw)
        if family == "chatglm3":
            if parsed is None:
                raise ToolError(f"{cw}.arguments must be a JSON object (ChatGLM3 writes it as tool_call(...))")
            content = chatglm3_call_content(parsed)
        else:
            content = raw
        out.append({"role": "assistant", "metadata": name, "content": content})
    return out


# -------------------------------------------------------------------------------- model output -> tool calls
def _tool_call_kwargs(code: str) -> dict[str, Any]:
    """The keyword arguments of `tool_call(a=..., b=...)`, values read as Python literals (never evaluated)."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not Python: {err.msg}") from None
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes, absurd nesting
        raise ValueError(f"not Python: {type(err).__name__}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("not a tool_call(...) expression")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise ValueError("tool_call(...) takes keyword arguments only")
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"the value of {kw.arg!r} is not a Python literal") from None
    return out


def _jsonable(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments as JSON would carry them (tuples become lists); ValueError for what JSON cannot hold."""
    try:
        return json.loads(json.dumps(arguments, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"the arguments are not JSON-serialisable ({err})") from None


def _split_metadata(part: str) -> tuple[str, str]:
    return tuple(part.split("\n", 1)) if "\n" in part else ("", part)  # type: ignore[return-value]


def _parse_chatglm3(text: str) -> list[dict[str, Any]]:
    metadata, content = _split_metadata(text.split("<|assistant|>")[-1])
    name = metadata.strip()
    if not name:
        return []
    code = "\n".join(content.split("\n")[1:-1])  # the lines inside the ```python fence
    try:
        return [{"name": name, "arguments": _jsonable(_tool_call_kwargs(code))}]
    except ValueError as err:
        return [{"name": name, "error": f"{name}: not a tool call glmkit can read ({err})", "text": content}]


_BROWSER_SEARCH = re.compile(r'search\("(.+?)"\s*,\s*recency_days\s*=\s*(\d+)\)')


def _parse_glm4(text: str, tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    names = set(tool_names(tools))
    calls: list[dict[str, Any]] = []
    for part in text.split("<|assistant|>"):
        lines = part.strip().split("\n")
        if len(lines) < 2 or not lines[1].startswith("{"):
            continue
        name, raw = lines[0].strip(), "\n".join(lines[1:]).strip()
        if name not in names and name not in GLM4_BUILTIN_TOOLS:
            continue
        if name == "cogview":
            calls.append({"name": name, "arguments": {"prompt": raw}})
            continue
        try:
            arguments = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as err:
            match = _BROWSER_SEARCH.match(raw) if name == "simple_browser" else None
            if match:
                calls.append({"name": name, "arguments": {"query": match.group(1),
                                                          "recency_days": int(match.group(2))}})
            else:
                why = f"{err.msg} at character {err.pos}" if isinstance(err, json.JSONDecodeError) else "nested too deeply"
                calls.append({"name": name, "error": f"{name}: the arguments are not valid JSON ({why})", "text": raw})
            continue
        if not isinstance(arguments, dict):
            calls.append({"name": name, "error": f"{name}: the arguments must be a JSON object, got "
                                                 f"{type(arguments).__name__}", "text": raw})
            continue
        calls.append({"name": name, "arguments": arguments})
    return calls


def parse_tool_calls(family: str, text: str, tools: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """The tool calls in a model's answer (the decoded text after `<|assistant|>`, stop token excluded):
    `[{"name": str, "arguments": dict}, ...]`, `[]` for a plain answer. A call the model wrote wrongly gives
    `{"name", "error", "text"}` in its place. `tools` (the request's tools) is what GLM-4 may call: its parser
    counts a call only when the name is one of them (or a GLM-4 built-in tool); ChatGLM3's does not look at names.
    ChatGLM-6B and ChatGLM2 have no tool calls: always `[]`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if family == "chatglm3":
        return _parse_chatglm3(text)
    if family == "glm4":
        return _parse_glm4(text, tools)
    if family in ("chatglm", "chatglm2"):
        return []
    raise ValueError(f"unknown family {family!r}; expected one of chatglm, chatglm2, chatglm3, glm4")


# ---------------------------------------------------------------------------- tool_choice: a forced metadata line
_SURFACES: dict[int, tuple[list[str | None], dict[str, list[int]]]] = {}


def token_surfaces(tokenizer) -> tuple[list[str | None], dict[str, list[int]]]:
    """Each token id's text (None where it is not whole UTF-8 or decodes to nothing) and the ids by first character,
    computed once per tokenizer."""
    key = id(tokenizer)
    cached = _SURFACES.get(key)
    if cached is None or len(cached[0]) != tokenizer.vocab_size:
        surfaces: list[str | None] = []
        by_first: dict[str, list[int]] = {}
        for i in range(tokenizer.vocab_size):
            try:
                raw = tokenizer.token_bytes(i)
            except (IndexError, KeyError):
                raw = b""
            try:
                text = raw.decode("utf-8") or None
            except UnicodeDecodeError:
                text = None
            surfaces.append(text)
            if text:
                by_first.setdefault(text[0], []).append(i)
        cached = _SURFACES[key] = (surfaces, by_first)
    return cached


class ForcedCall:
    """A logits processor for one answer that must begin with the metadata line of a call: one of `names` followed
    by a newline (tool_choice "required" or a named function). Until that line is written, only tokens that keep the
    decoded answer a prefix of such a line (or complete it) may be picked; then it lets everything through.

    Called as `processor(generated_ids, scores_row)` with the answer's tokens so far and that row's scores [V]."""

    def __init__(self, tokenizer, names: Sequence[str]) -> None:
        if not names:
            raise ToolError("a forced tool call needs at least one tool name")
        self.tokenizer = tokenizer
        self.targets = [f"{n}\n" for n in names]
        self.surfaces, self.by_first = token_surfaces(tokenizer)
        self.done = False

    def _fits(self, text: str) -> bool:
        return any(t.startswith(text) or text.startswith(t) for t in self.targets)

    def __call__(self, generated: Sequence[int], scores):
        import torch

        if self.done:
            return scores
        text = self.tokenizer.decode(list(generated))
        if any(text.startswith(t) for t in self.targets):
            self.done = True
            return scores
        if not self._fits(text):  # the line went elsewhere (cannot happen while this processor runs): let it be
            self.done = True
            return scores
        allowed = []
        firsts = {t[len(text)] for t in self.targets if t.startswith(text)} | ({" "} if not text else set())
        for i in sorted(i for c in firsts for i in self.by_first.get(c, ())):
            surface = self.surfaces[i]
            if i >= scores.shape[-1]:
                continue
            candidate = text + surface
            if not (self._fits(candidate) or (not text and self._fits(candidate.lstrip(" ")))):
                continue
            if self._fits(self.tokenizer.decode(list(generated) + [i])):  # exact check on the few that pass
                allowed.append(i)
        if not allowed:
            self.done = True
            return scores
        keep = torch.full_like(scores, float("-inf"))
        index = torch.tensor(allowed, dtype=torch.long, device=scores.device)
        keep[..., index] = scores[..., index]
        return keep
