"""Plain Python functions as tools for `glmkit chat --tools FILE.py` and `glmkit web --tools FILE.py`: load them,
describe them to the model (glmkit.core.tools.function_schema: signature + docstring -> JSON Schema), run the calls
the model makes and feed the results back, as ChatGLM3's tool demo (tools_using_demo/cli_demo_tool.py) does.

FILE.py is imported as a module. Its tools are the list `TOOLS` when it defines one, else every public function
defined in it (names not starting with "_"; imported functions are left out). Each call runs the function with the
model's arguments as keywords; its return value (JSON-encoded unless it is a string) or the error it raised goes
back to the model as the `<|observation|>` message.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from glmkit.core.chat import family_of
from glmkit.core.tools import TOOL_FAMILIES, ToolError, function_schema

MAX_TOOL_ROUNDS = 5  # tool calls in a row for one user message before glmkit stops the loop


class Toolbox:
    """Named Python functions, their tool schemas, and running a call."""

    def __init__(self, functions: list[Callable]) -> None:
        if not functions:
            raise ToolError("no tools: give at least one function")
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict] = []
        for fn in functions:
            schema = function_schema(fn)
            name = schema["function"]["name"]
            if name in self.functions:
                raise ToolError(f"two tools are named {name!r}")
            self.functions[name] = fn
            self.schemas.append(schema)

    @classmethod
    def from_file(cls, path: str | Path) -> Toolbox:
        """The tools of a Python file (see the module docstring)."""
        path = Path(path)
        if not path.is_file() or path.suffix != ".py":
            raise ToolError(f"{path} is not a Python file (.py) with tool functions")
        name = f"glmkit_tools_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ToolError(f"importing {path} failed: {type(err).__name__}: {err}") from None
        listed = getattr(module, "TOOLS", None)
        if listed is not None:
            if not isinstance(listed, (list, tuple)) or not all(callable(f) for f in listed):
                raise ToolError(f"{path}: TOOLS must be a list of functions")
            functions = list(listed)
        else:
            functions = [obj for key, obj in vars(module).items()
                         if inspect.isfunction(obj) and obj.__module__ == name and not key.startswith("_")]
        if not functions:
            raise ToolError(f"{path} defines no public functions to use as tools")
        try:
            return cls(functions)
        except ToolError as err:
            raise ToolError(f"{path}: {err}") from None

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    def run(self, name: str, arguments: Any) -> str:
        """The call's result as the text the model reads; an error message (never an exception) when the tool is
        unknown, the arguments do not fit, or the function raises."""
        fn = self.functions.get(name)
        if fn is None:
            return f"error: there is no tool named {name!r}; the tools are {', '.join(self.names)}"
        if not isinstance(arguments, dict):
            return f"error: the arguments of {name} must be a JSON object, got {json.dumps(arguments)}"
        try:
            result = fn(**arguments)
        except Exception as err:
            return f"error: {name} raised {type(err).__name__}: {err}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def check_family(tokenizer) -> None:
    family = family_of(tokenizer)
    if family not in TOOL_FAMILIES:
        raise ToolError(f"this model's family ({family}) has no tool calling; --tools needs a ChatGLM3 or GLM-4 model")


def chat_with_tools(model: Any, tokenizer: Any, query: str, history: list, toolbox: Toolbox | None,
                    max_rounds: int = MAX_TOOL_ROUNDS, **chat_kwargs: Any) -> Iterator[tuple[str, Any, list]]:
    """One user turn, running the model's tool calls until it answers in text. Yields events:
    ("answer", response so far, history) while the model writes (response: text, or a dict for a call);
    ("call", {"name", "parameters"}, history) for each call, then ("result", (name, result text), history);
    ("stopped", max_rounds, history) if it keeps calling tools. Without a toolbox it is model.stream_chat."""
    role = "user"
    if toolbox is not None:
        chat_kwargs = {**chat_kwargs, "tools": toolbox.schemas}
    for _ in range(max_rounds + 1):
        response: Any = ""
        for response, history in model.stream_chat(tokenizer, query, history=history, role=role, **chat_kwargs):
            yield "answer", response, history
        chat_kwargs.pop("system", None)  # the first turn put it into the history
        if toolbox is None or not (isinstance(response, dict) and "parameters" in response):
            return
        yield "call", response, history
        query, role = toolbox.run(response["name"], response["parameters"]), "observation"
        yield "result", (response["name"], query), history
    yield "stopped", max_rounds, history


def describe_call(call: dict) -> str:
    """`name({"arg": ...})`, how the terminal and the web page show a call."""
    return f"{call['name']}({json.dumps(call.get('parameters', {}), ensure_ascii=False)})"


__all__ = ["MAX_TOOL_ROUNDS", "Toolbox", "chat_with_tools", "check_family", "describe_call"]
