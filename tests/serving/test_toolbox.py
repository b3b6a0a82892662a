"""Python functions as tools: loading a tools file, running calls, and the tool loop of the terminal chat and the web
page (with a model whose answers are scripted below them: tests.helpers.chat_models.scripted_model), plus
`glmkit chat --tools` on the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from glmkit.core.tools import ToolError
from glmkit.serving.terminal import TerminalChat
from glmkit.serving.toolbox import Toolbox, chat_with_tools
from glmkit.serving.web import turn_messages
from tests.helpers.chat_models import build_tiny_chat_model, build_tiny_glm4_model, scripted_model
from tests.helpers.common import REPO

TOOLS_FILE = '''
import json as _json
from os.path import join  # imported: not a tool

CALLS = []


def get_weather(city: str, unit: str = "c") -> dict:
    """The weather in a city.

    Args:
        city: the city's name
    """
    CALLS.append(city)
    return {"city": city, "sky": "sunny", "unit": unit}


def broken(x: int) -> str:
    """Always fails."""
    raise RuntimeError("the tool is down")


def _helper():
    pass
'''


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "my_tools.py"
    path.write_text(TOOLS_FILE, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def scripted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"toolbox-{request.param}")
    folder = (build_tiny_glm4_model(root / "m") if request.param == "glm4"
              else build_tiny_chat_model(root / "m", "chatglm3", max_seq_len=2048))
    return scripted_model(folder)


def test_toolbox_from_file(tools_file, tmp_path):
    box = Toolbox.from_file(tools_file)
    assert box.names == ["get_weather", "broken"]
    weather = box.schemas[0]["function"]
    assert weather["description"] == "The weather in a city."
    assert weather["parameters"]["properties"]["city"] == {"type": "string", "description": "the city's name"}
    assert weather["parameters"]["required"] == ["city"]
    assert json.loads(box.run("get_weather", {"city": "Paris"})) == {"city": "Paris", "sky": "sunny", "unit": "c"}
    assert box.run("broken", {"x": 1}) == "error: broken raised RuntimeError: the tool is down"
    assert box.run("get_weather", {"town": "Paris"}).startswith("error: get_weather raised TypeError")
    assert box.run("nope", {}).startswith("error: there is no tool named 'nope'")
    assert box.run("get_weather", [1]).startswith("error: the arguments of get_weather must be a JSON object")

    listed = tmp_path / "listed.py"
    listed.write_text("def a(x: int): return x\ndef b(): return 1\nTOOLS = [b]\n")
    assert Toolbox.from_file(listed).names == ["b"]
    for body, message in (("raise ValueError('boom')", "importing"), ("x = 1", "no public functions"),
                          ("def f(*args): pass", r"\*args"), ("TOOLS = [1]", "TOOLS must be")):
        bad = tmp_path / "bad.py"
        bad.write_text(body)
        with pytest.raises(ToolError, match=message):
            Toolbox.from_file(bad)
    with pytest.raises(ToolError, match="not a Python file"):
        Toolbox.from_file(tmp_path / "missing.py")


def test_tool_loop_runs_calls_and_feeds_results_back(scripted, tools_file):
    model, tok = scripted
    box = Toolbox.from_file(tools_file)
    events = list(chat_with_tools(model, tok, "What's the weather in Paris?", [], box, do_sample=False))
    kinds = [k for k, _, _ in events]
    assert "call" in kinds and "result" in kinds and kinds[-1] == "answer"
    call = next(v for k, v, _ in events if k == "call")
    assert call == {"name": "get_weather", "parameters": {"city": "Paris"}}
    name, result = next(v for k, v, _ in events if k == "result")
    assert name == "get_weather" and json.loads(result)["sky"] == "sunny"
    _, answer, history = events[-1]
    assert answer == "The weather in Paris is sunny."
    assert [m["role"] for m in history] == ["system", "user", "assistant", "observation", "assistant"]
    assert history[3]["content"] == result and "tools" in history[0]


def test_terminal_shows_calls_and_results(scripted, tools_file):
    model, tok = scripted
    out = io.StringIO()
    chat = TerminalChat(model, tok, "tiny", tools=Toolbox.from_file(tools_file), temperature=0, out=out)
    assert chat.answer("What's the weather in Paris?")
    shown = out.getvalue()
    assert '[tool call] get_weather({"city": "Paris"})' in shown
    assert '[tool result] {"city": "Paris", "sky": "sunny", "unit": "c"}' in shown
    assert shown.rstrip().endswith("The weather in Paris is sunny.")
    assert shown.index("[tool call]") < shown.index("[tool result]") < shown.index("The weather")
    assert chat.answer("tell me a story") and "Once upon a time" in out.getvalue()


def test_web_turn_without_tools(scripted):
    model, tok = scripted
    steps = list(turn_messages(model, tok, "tell me a story", [], [], {"do_sample": False}))
    assert len(steps) > 5  # streamed
    messages, history = steps[-1]
    assert messages[-1]["content"].startswith("Once upon a time") and history[-1]["role"] == "assistant"


def test_web_turn_shows_tool_calls(scripted, tools_file):
    model, tok = scripted
    box = Toolbox.from_file(tools_file)
    steps = list(turn_messages(model, tok, "What's the weather in Paris?", [], [], {"do_sample": False}, box))
    messages, history = steps[-1]
    assert messages[0] == {"role": "user", "content": "What's the weather in Paris?"}
    tool = messages[1]
    assert tool["metadata"]["title"] == '🛠️ get_weather({"city": "Paris"})'
    assert json.loads(tool["content"])["sky"] == "sunny"
    assert messages[2] == {"role": "assistant", "content": "The weather in Paris is sunny."}
    assert history[-1]["content"] == "The weather in Paris is sunny."


@pytest.mark.slow
def test_tools_need_a_family_with_tool_calling(tmp_path, tools_file):
    from glmkit import load_model, load_tokenizer

    folder = build_tiny_chat_model(tmp_path / "c2", "chatglm2")
    model, tok = load_model(folder), load_tokenizer(folder)
    with pytest.raises(ToolError, match="no tool calling"):
        TerminalChat(model, tok, "c2", tools=Toolbox.from_file(tools_file))
    r = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(folder), "--tools", str(tools_file)],
                       input="hi\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "no tool calling" in r.stderr


@pytest.mark.slow
def test_cli_tools_option(tmp_path, tools_file):
    bad = tmp_path / "bad.py"
    bad.write_text("import does_not_exist\n")
    r = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--tools", str(bad)], input="", capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "--tools" in r.stderr and "ModuleNotFoundError" in r.stderr
    folder = build_tiny_glm4_model(tmp_path / "g4")
    r = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(folder), "--tools", str(tools_file),
                        "--temperature", "0", "--max-new-tokens", "8", "--stop", "zzz", "--presence-penalty", "0.5"],
                       input="hello\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "[tool" not in r.stdout  # the answer; tool lines (if any) go to stderr
    r = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(folder), "--presence-penalty", "5"],
                       input="", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "--presence-penalty" in r.stderr
