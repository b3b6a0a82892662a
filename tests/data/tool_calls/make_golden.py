"""Regenerates tests/data/tool_calls/golden.json: what the ORIGINAL ChatGLM3 and GLM-4 code gives for chat prompts
with tools, tool calls and tool results, for OpenAI messages mapped by THUDM's own OpenAI servers, and for tool-call
parsing of model answers. Not run by pytest (tests/core/test_tools.py only reads golden.json).

The tokenizer folders beside this file are in the originals' layout (`build` writes them):
- chatglm3/: a small SentencePiece `tokenizer.model` (the one of tests/data/special_tokens/chatglm3) and THUDM/
  chatglm3-6b's tokenizer_config.json (name_or_path, remove_space, do_lower_case, tokenizer_class, auto_map).
- glm4/: a small tiktoken-ranks `tokenizer.model` (the one of tests/data/special_tokens/glm4) and a glm-4-9b-chat
  style tokenizer_config.json: added_tokens_decoder, additional special tokens, eos/pad, and the `chat_template` of
  THUDM/glm-4-9b-chat (glmkit/assets/glm4-chat-template.jinja, quoted from ShishirPatil/gorilla bfcl_eval/
  model_handler/local_inference/glm.py @6ea5797).

The original code (not kept in this repository; sha256 recorded in golden.json):
- chatglm3-6b `tokenization_chatglm.py` and `modeling_chatglm.py` at 456aa87 "fix piece id out of range"
  (github.com/czk1997/chatglm3-copy mirrors the hub history): `build_chat_input`, and `process_response` (chat()).
- THUDM/ChatGLM3 `openai_api_demo/utils.py` at 732294f: `process_chatglm_messages`, `process_response`.
- THUDM/GLM-4 `basic_demo/glm_server.py` at a3e59fb (the last revision before basic_demo was removed; the
  `openai_api_server.py` there starts it): `process_messages`, `process_response`.
- glm-4-9b-chat `tokenization_chatglm.py` (ChatGLM4Tokenizer; its tokenizing methods, the public copy used for
  tests/data/special_tokens) under transformers' own `apply_chat_template` (the class does not override it).
Functions are taken out of the files with `ast` and run as written (the ChatGLM3 parser `eval`s model output; the
cases below are harmless).

Library versions: ChatGLM3 with transformers 4.40.2 (its tokenizer predates `_pad(padding_side=...)`), GLM-4 with
transformers 4.46.3 (GLM-4's basic_demo requires >= 4.46.2), jinja2 3.1.6, torch 2.13.0 (CPU), Python 3.11.

    python3 -m venv /tmp/t440 && /tmp/t440/bin/pip install transformers==4.40.2 torch==2.13.0 sentencepiece
    python3 -m venv /tmp/t446 && /tmp/t446/bin/pip install transformers==4.46.3 torch==2.13.0 tiktoken jinja2 regex
    .venv/bin/python tests/data/tool_calls/make_golden.py build
    python3 tests/data/tool_calls/make_golden.py generate --py440 /tmp/t440/bin/python --py446 /tmp/t446/bin/python \\
        --src /tmp/g16/orig   # chatglm3_tokenization_chatglm.py chatglm3_modeling_chatglm.py chatglm3_openai_utils.py
                              # glm4_glm_server.py glm4_tokenization_chatglm.py
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

WEATHER = {"name": "get_weather", "description": "查询城市的天气 (weather for a city)",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"},
                                                           "days": {"type": "integer"}},
                          "required": ["city"]}}
SEARCH = {"name": "search_docs", "description": "Search <docs> & \"notes\"; keys stay in order",
          "parameters": {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "number"}}}}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": SEARCH}]
CHATGLM3_SYSTEM = {"role": "system", "content": "Answer the following questions as best as you can. You have access "
                   "to the following tools:", "tools": [WEATHER, SEARCH]}
CALL_CONTENT = "```python\ntool_call(city=\"北京\", days=3)\n```"

# ChatGLM3 build_chat_input(query, history, role)
CHATGLM3_PROMPTS = [
    {"name": "plain", "history": [], "query": "你好", "role": "user"},
    {"name": "system_and_turns", "history": [{"role": "system", "content": "You are terse."},
                                             {"role": "user", "content": "hello"},
                                             {"role": "assistant", "metadata": "", "content": "hi there"}],
     "query": "and now?", "role": "user"},
    {"name": "tools", "history": [CHATGLM3_SYSTEM], "query": "北京天气怎么样？", "role": "user"},
    {"name": "openai_tools_in_system", "history": [{"role": "system", "content": "You may call tools.",
                                                    "tools": OPENAI_TOOLS}], "query": "weather?", "role": "user"},
    {"name": "call_then_observation", "history": [CHATGLM3_SYSTEM, {"role": "user", "content": "北京天气？"},
                                                  {"role": "assistant", "metadata": "get_weather",
                                                   "content": CALL_CONTENT}],
     "query": "{\"temperature\": 22, \"weather\": \"晴\"}", "role": "observation"},
    {"name": "full_round", "history": [CHATGLM3_SYSTEM, {"role": "user", "content": "北京天气？"},
                                       {"role": "assistant", "metadata": "get_weather", "content": CALL_CONTENT},
                                       {"role": "observation", "content": "{\"temperature\": 22}"},
                                       {"role": "assistant", "metadata": "", "content": "北京今天 22 度。"}],
     "query": "谢谢", "role": "user"},
]

# GLM-4 tokenizer.apply_chat_template(messages, add_generation_prompt=...)
GLM4_SYSTEM = {"role": "system", "content": None, "tools": OPENAI_TOOLS}
GLM4_PROMPTS = [
    {"name": "plain", "messages": [{"role": "user", "content": "你好"}], "add_generation_prompt": True},
    {"name": "system_and_turns", "messages": [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "hello"},
                                              {"role": "assistant", "content": "hi there"},
                                              {"role": "user", "content": "and now?"}],
     "add_generation_prompt": True},
    {"name": "tools", "messages": [GLM4_SYSTEM, {"role": "user", "content": "北京天气怎么样？"}],
     "add_generation_prompt": True},
    {"name": "call_then_observation", "messages": [
        GLM4_SYSTEM, {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\", \"days\": 3}"},
        {"role": "observation", "content": "{\"temperature\": 22}"}], "add_generation_prompt": True},
    {"name": "full_round_no_generation_prompt", "messages": [
        GLM4_SYSTEM, {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"},
        {"role": "observation", "content": "{\"temperature\": 22}"},
        {"role": "assistant", "metadata": "", "content": "北京今天 22 度。"}], "add_generation_prompt": False},
    {"name": "builtin_tools", "messages": [
        {"role": "system", "content": "Also be nice.", "tools": [{"type": "python"}, {"type": "simple_browser"},
                                                               {"type": "cogview"},
                                                               {"type": "function", "function": WEATHER}]},
        {"role": "user", "content": "draw a cat"}], "add_generation_prompt": True},
    {"name": "empty_content_skipped", "messages": [{"role": "user", "content": "a"},
                                                   {"role": "assistant", "metadata": "get_weather", "content": ""},
                                                   {"role": "user", "content": "b"}], "add_generation_prompt": True},
]

# OpenAI messages through THUDM's servers' mapping, then the prompt (cases where glmkit maps the same way)
ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{\"city\": \"北京\", \"days\": 3}"}}]}
GLM4_MAPPINGS = [
    {"name": "tools_auto", "messages": [{"role": "user", "content": "北京天气？"}], "tools": OPENAI_TOOLS,
     "tool_choice": "auto"},
    {"name": "tools_default_choice", "messages": [{"role": "user", "content": "北京天气？"}], "tools": OPENAI_TOOLS,
     "tool_choice": None},
    {"name": "call_and_result", "messages": [{"role": "user", "content": "北京天气？"}, ASSISTANT_CALL,
                                             {"role": "tool", "tool_call_id": "call_1",
                                              "content": "{\"temperature\": 22}"}],
     "tools": OPENAI_TOOLS, "tool_choice": "auto"},
    {"name": "named_choice", "messages": [{"role": "user", "content": "北京天气？"}], "tools": OPENAI_TOOLS,
     "tool_choice": {"type": "function", "function": {"name": "search_docs"}}},
    {"name": "choice_none", "messages": [{"role": "user", "content": "北京天气？"}], "tools": OPENAI_TOOLS,
     "tool_choice": "none"},
    {"name": "no_tools", "messages": [{"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": "hi there"},
                                      {"role": "user", "content": "bye"}], "tools": None, "tool_choice": None},
]
CHATGLM3_MAPPINGS = [
    {"name": "tools", "messages": [{"role": "user", "content": "北京天气？"}], "tools": OPENAI_TOOLS},
    {"name": "function_result", "messages": [
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "get_weather\n" + CALL_CONTENT,
         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"北京\", \"days\": 3}"}},
        {"role": "function", "name": "get_weather", "content": "{\"temperature\": 22}"}], "tools": OPENAI_TOOLS},
    {"name": "no_tools", "messages": [{"role": "user", "content": "hello"},
                                      {"role": "assistant", "content": "hi there"},
                                      {"role": "user", "content": "bye"}], "tools": None},
]

CHATGLM3_OUTPUTS = [
    "\n你好，有什么可以帮你？",
    "get_weather\n```python\ntool_call(city='北京', days=3)\n```",
    "get_weather\n ```python\ntool_call(city=\"beijing\", days=2)\n```",
    "好的，我来查一下。<|assistant|>get_weather\n```python\ntool_call(city='Paris')\n```",
    "search_docs\n```python\ntool_call(zeta='x', alpha=0.5)\n```",
    "get_weather\n```python\ntool_call(city=('a', 'b'), days=None)\n```",
    "get_weather\n```python\ntool_call(city=)\n```",
    "get_weather\n```python\ntool_call('Paris')\n```",
    "get_weather\n```python\nlen('abc')\n```",
    "get_weather\ntool_call(city='no fence')",
    "hello without a newline",
]
GLM4_OUTPUTS = [
    ("\n你好，有什么可以帮你？", "tools"),
    ("get_weather\n{\"city\": \"北京\"}", "tools"),
    ("get_weather\n{\"city\": \"北京\",\n \"days\": 3}", "tools"),
    ("unknown_tool\n{\"a\": 1}", "tools"),
    ("get_weather\n{\"city\": }", "tools"),
    ("get_weather\n[1, 2]", "tools"),
    ("get_weather\n{\"city\": \"Paris\"} and more", "tools"),
    ("cogview\n{a watercolour cat}", "tools"),
    ("simple_browser\n{\"query\": \"GLM\", \"recency_days\": 3}", "tools"),
    ("Hello\n{\"a\": 1}", "tools"),
    ("get_weather\n{\"city\": \"Paris\"}", None),
    ("search_docs\n{\"zeta\": \"q\", \"alpha\": 1}", "tools"),
    ("get_weather\n\"just a string\"", "tools"),
]


# ------------------------------------------------------------------------------------------------ build
def build() -> None:
    src = REPO / "tests" / "data" / "special_tokens"
    c3 = HERE / "chatglm3"
    c3.mkdir(exist_ok=True)
    shutil.copyfile(src / "chatglm3" / "tokenizer.model", c3 / "tokenizer.model")
    (c3 / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer",
                                                                               None]}}, indent=2) + "\n")
    g4 = HERE / "glm4"
    g4.mkdir(exist_ok=True)
    shutil.copyfile(src / "glm4" / "tokenizer.model", g4 / "tokenizer.model")
    cfg = json.loads((src / "glm4" / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = (REPO / "glmkit" / "assets" / "glm4-chat-template.jinja").read_text(encoding="utf-8")
    cfg["model_max_length"] = 128000
    cfg["model_input_names"] = ["input_ids", "attention_mask", "position_ids"]
    (g4 / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------- workers (inside the venvs)
def _function(path: str, name: str, namespace: dict) -> object:
    """A function (or method, self unused) of a source file, taken out with ast and defined in `namespace`."""
    source = Path(path).read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            exec(textwrap.dedent(ast.get_source_segment(source, node)), namespace)
            return namespace[name]
    raise KeyError(f"{name} not in {path}")


class Obj:
    """A pydantic-like message for the servers' functions (attribute access, missing fields None)."""

    def __init__(self, data: dict) -> None:
        self._data = data

    def __getattr__(self, key):
        value = self._data.get(key)
        if isinstance(value, dict):
            return Obj(value)
        if isinstance(value, list):
            return [Obj(v) if isinstance(v, dict) else v for v in value]
        return value


def _outcome(fn, *args):
    try:
        return {"result": fn(*args)}
    except Exception as err:  # the original raised: record which error
        return {"raises": type(err).__name__}


def worker_chatglm3(spec: dict) -> dict:
    import copy
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    out: dict = {"prompts": [], "mappings": [], "chat_parse": [], "server_parse": []}
    for case in CHATGLM3_PROMPTS:
        ids = tok.build_chat_input(case["query"], history=copy.deepcopy(case["history"]), role=case["role"])
        out["prompts"].append({**case, "ids": ids["input_ids"][0].tolist()})
    ns = {"json": json, "copy": copy, "deepcopy": copy.deepcopy}
    mapper = _function(spec["utils"], "process_chatglm_messages", ns)
    for case in CHATGLM3_MAPPINGS:
        native = mapper([Obj(m) for m in case["messages"]], tools=case["tools"])
        query, role = native[-1]["content"], native[-1]["role"]
        ids = tok.build_chat_input(query, history=native[:-1], role=role)
        out["mappings"].append({**case, "native": native, "ids": ids["input_ids"][0].tolist()})
    chat_parse = _function(spec["modeling"], "process_response", ns)
    server_parse = _function(spec["utils"], "process_response", dict(ns))
    history = [CHATGLM3_SYSTEM, {"role": "user", "content": "q"}]
    for text in CHATGLM3_OUTPUTS:
        got = _outcome(lambda t: chat_parse(None, t, history)[0], text)
        out["chat_parse"].append({"text": text, **got})
        out["server_parse"].append({"text": text, **_outcome(lambda t: server_parse(t, use_tool=True), text)})
    return out


def worker_glm4(spec: dict) -> dict:
    import copy
    import re
    from typing import List, Union

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["folder"], trust_remote_code=True)
    out: dict = {"prompts": [], "mappings": [], "server_parse": []}
    for case in GLM4_PROMPTS:
        messages = copy.deepcopy(case["messages"])
        ids = tok.apply_chat_template(messages, add_generation_prompt=case["add_generation_prompt"], tokenize=True)
        text = tok.apply_chat_template(messages, add_generation_prompt=case["add_generation_prompt"], tokenize=False)
        out["prompts"].append({**case, "ids": list(ids), "text": text})
    ns = {"json": json, "re": re, "List": List, "Union": Union}
    mapper = _function(spec["server"], "process_messages", ns)
    for case in GLM4_MAPPINGS:
        native = mapper([Obj(m) for m in case["messages"]], tools=copy.deepcopy(case["tools"]),
                        tool_choice=case["tool_choice"])
        ids = tok.apply_chat_template(native, add_generation_prompt=True, tokenize=True)
        out["mappings"].append({**case, "native": native, "ids": list(ids)})
    parse = _function(spec["server"], "process_response", ns)
    for text, tools in GLM4_OUTPUTS:
        offered = OPENAI_TOOLS if tools == "tools" else None
        out["server_parse"].append({"text": text, "tools": tools, **_outcome(
            lambda t: parse(t, copy.deepcopy(offered), use_tool=True), text)})
    return out


# ------------------------------------------------------------------------------------------------ generate
def generate(args: argparse.Namespace) -> None:
    src = Path(args.src)
    files = {"chatglm3_tokenizer": "chatglm3_tokenization_chatglm.py",
             "chatglm3_modeling": "chatglm3_modeling_chatglm.py", "chatglm3_openai_utils": "chatglm3_openai_utils.py",
             "glm4_server": "glm4_glm_server.py", "glm4_tokenizer": "glm4_tokenization_chatglm.py"}
    golden: dict = {"sources": {k: {"file": v, "sha256": hashlib.sha256((src / v).read_bytes()).hexdigest()}
                                for k, v in files.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for family, py, tok_file, spec_extra in (
                ("chatglm3", args.py440, files["chatglm3_tokenizer"],
                 {"modeling": str(src / files["chatglm3_modeling"]),
                  "utils": str(src / files["chatglm3_openai_utils"])}),
                ("glm4", args.py446, files["glm4_tokenizer"], {"server": str(src / files["glm4_server"])})):
            folder = Path(tmp) / family
            shutil.copytree(HERE / family, folder)
            shutil.copyfile(src / tok_file, folder / "tokenization_chatglm.py")
            cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            cfg["tokenizer_class"] = "ChatGLM4Tokenizer" if family == "glm4" else "ChatGLMTokenizer"
            cfg["auto_map"] = {"AutoTokenizer": [f"tokenization_chatglm.{cfg['tokenizer_class']}", None]}
            (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
            spec = {"folder": str(folder), **spec_extra}
            version = subprocess.run([py, "-c", "import transformers, jinja2; print(transformers.__version__, "
                                      "jinja2.__version__)"], capture_output=True, text=True, check=True).stdout.split()
            result = subprocess.run([py, __file__, f"_worker_{family}", json.dumps(spec)], capture_output=True,
                                    text=True, cwd=tmp)
            if result.returncode:
                sys.exit(f"{family} worker failed:\n{result.stderr}")
            golden[family] = {"transformers": version[0], "jinja2": version[1], **json.loads(result.stdout)}
    text = json.dumps(golden, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]",  # id lists on one line each
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    (HERE / "golden.json").write_text(text + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'golden.json'}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1].startswith("_worker_"):
        worker = {"_worker_chatglm3": worker_chatglm3, "_worker_glm4": worker_glm4}[sys.argv[1]]
        print(json.dumps(worker(json.loads(sys.argv[2])), ensure_ascii=False))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="write the tokenizer folders")
    g = sub.add_parser("generate", help="run the original code and write golden.json")
    g.add_argument("--py440", required=True, help="python of a venv with transformers 4.40.2 (ChatGLM3)")
    g.add_argument("--py446", required=True, help="python of a venv with transformers 4.46.3 (GLM-4)")
    g.add_argument("--src", required=True, help="folder holding the original files (see the module docstring)")
    args = parser.parse_args()
    build() if args.cmd == "build" else generate(args)


if __name__ == "__main__":
    main()
