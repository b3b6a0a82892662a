"""Tool calling against the ORIGINAL code: ChatGLM3/GLM-4 prompts with tools, tool calls and results
(`apply_chat_template` vs build_chat_input / the jinja template under transformers), OpenAI messages mapped as THUDM's
servers map them, and `parse_tool_calls` vs the originals' response processing. The golden ids and results are in
tests/data/tool_calls/golden.json (make_golden.py there ran the original files); the rest are glmkit's own rules."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch

from glmkit.chat import parse_tool_calls as public_parse
from glmkit.core import chat as C
from glmkit.core.chat_template import apply_chat_template
from glmkit.core.tokenizer import load_tokenizer
from glmkit.core.tools import (
    CHATGLM3_TOOL_PROMPT,
    ForcedCall,
    ToolError,
    chatglm3_call_content,
    function_schema,
    parse_tool_calls,
    select_tools,
    to_native_messages,
    validate_tools,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "tool_calls"
GOLDEN = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok3():
    tok = load_tokenizer(DATA / "chatglm3")
    assert tok.family == "chatglm3"
    return tok


@pytest.fixture(scope="module")
def tok4():
    tok = load_tokenizer(DATA / "glm4")
    assert tok.family == "glm4" and "可用工具" in tok.chat_template
    return tok


# ------------------------------------------------------------------------------------- prompts vs the originals
@pytest.mark.parametrize("case", GOLDEN["chatglm3"]["prompts"], ids=lambda c: c["name"])
def test_chatglm3_prompt_ids_match_build_chat_input(tok3, case):
    messages = case["history"] + [{"role": case["role"], "content": case["query"]}]
    assert tok3.apply_chat_template(messages) == case["ids"]
    assert C.build_chat_input(tok3, case["query"], case["history"], role=case["role"]) == case["ids"]
    text = tok3.apply_chat_template(messages, tokenize=False)
    assert text.startswith("[gMASK]sop") and text.endswith("<|assistant|>")


@pytest.mark.parametrize("case", GOLDEN["glm4"]["prompts"], ids=lambda c: c["name"])
def test_glm4_prompt_matches_the_jinja_template_under_transformers(tok4, case):
    kw = {"add_generation_prompt": case["add_generation_prompt"]}
    assert tok4.apply_chat_template(case["messages"], tokenize=False, **kw) == case["text"]
    assert tok4.apply_chat_template(case["messages"], **kw) == case["ids"]


def test_chatglm3_folder_saved_by_transformers_is_chatglm3(tmp_path, tok3):
    """ChatGLM3's tokenizer saved by transformers (no model name anywhere) still reads as ChatGLM3: its class passes
    `encode_special_tokens`, which transformers writes into tokenizer_config.json (ChatGLM2's does not)."""
    (tmp_path / "tokenizer.model").write_bytes((DATA / "chatglm3" / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {}, "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "encode_special_tokens": False,
        "eos_token": "</s>", "pad_token": "<unk>", "padding_side": "left", "remove_space": False,
        "tokenizer_class": "ChatGLMTokenizer", "unk_token": "<unk>"}))
    tok = load_tokenizer(tmp_path)
    case = GOLDEN["chatglm3"]["prompts"][4]
    assert tok.family == "chatglm3"
    assert tok.apply_chat_template(case["history"] + [{"role": case["role"], "content": case["query"]}]) == case["ids"]
    messages = [{"role": "user", "content": "hi"}]
    ids = tok3.apply_chat_template(messages)
    assert tok3.apply_chat_template(messages, return_tensors="pt").tolist() == [ids]
    assert tok3.apply_chat_template(messages, return_dict=True) == {"input_ids": ids, "attention_mask": [1] * len(ids)}


def test_golden_covers_tools_calls_and_results():
    texts = [c["text"] for c in GOLDEN["glm4"]["prompts"]]
    assert any("# 可用工具" in t and "<|observation|>" in t and "<|assistant|>get_weather\n{" in t for t in texts)
    assert any("## simple_browser" in t and "## cogview" in t and "## python" in t for t in texts)
    # tojson as transformers overrides it: no HTML escaping, no key sorting, non-ASCII kept
    assert any('"description": "Search <docs> & \\"notes\\"; keys stay in order"' in t and
               t.index('"zeta"') < t.index('"alpha"') and "查询城市的天气" in t for t in texts)


@pytest.mark.parametrize("case", GOLDEN["glm4"]["mappings"], ids=lambda c: c["name"])
def test_glm4_openai_messages_map_as_glm4s_server(tok4, case):
    tools, forced = select_tools(case["tools"], case["tool_choice"])
    assert tok4.apply_chat_template(case["messages"], tools=tools or None) == case["ids"]


@pytest.mark.parametrize("case", GOLDEN["chatglm3"]["mappings"], ids=lambda c: c["name"])
def test_chatglm3_openai_messages_map_as_chatglm3s_server(tok3, case):
    assert tok3.apply_chat_template(case["messages"], tools=case["tools"]) == case["ids"]


# ---------------------------------------------------------------------------------------- parsing vs the originals
def _expected(original: dict) -> tuple[str, object]:
    """What glmkit should give for an original outcome: ("call", (name, args)) / ("none", None) / ("error", name)."""
    if "raises" in original:
        return "error", None
    result = original["result"]
    if isinstance(result, str):
        return "none", None
    args = result.get("parameters", result.get("arguments"))
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        return "error", result["name"]
    return "call", (result["name"], args)


@pytest.mark.parametrize("case", GOLDEN["chatglm3"]["chat_parse"], ids=lambda c: repr(c["text"][:30]))
def test_chatglm3_parsing_matches_chat_process_response(case):
    calls = parse_tool_calls("chatglm3", case["text"])
    kind, want = _expected(case)
    if kind == "none":
        assert calls == []
    elif kind == "call":
        assert calls == [{"name": want[0], "arguments": want[1]}]
    else:  # the original raised or returned a non-object: a clear error entry, no exception
        assert len(calls) == 1 and "error" in calls[0] and "arguments" not in calls[0]
        assert calls[0]["error"].startswith(calls[0]["name"])
    # the server demo parses what it can parse the same way
    server_kind, server_want = _expected(GOLDEN["chatglm3"]["server_parse"][GOLDEN["chatglm3"]["chat_parse"]
                                                                            .index(case)])
    if server_kind == "call":
        assert calls == [{"name": server_want[0], "arguments": server_want[1]}]


@pytest.mark.parametrize("case", GOLDEN["glm4"]["server_parse"], ids=lambda c: repr(c["text"][:30]))
def test_glm4_parsing_matches_the_servers_process_response(case):
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "search_docs")] \
        if case["tools"] else None
    calls = parse_tool_calls("glm4", case["text"], tools)
    kind, want = _expected(case)
    if kind == "call":
        assert calls == [{"name": want[0], "arguments": want[1]}]
        return
    # the original answered with text: glmkit has no call either, or (an offered tool whose arguments do not
    # parse as a JSON object) an error entry instead of silently turning a broken call into text
    assert all("arguments" not in c for c in calls)
    for c in calls:
        assert c["name"] in [t["function"]["name"] for t in tools or []] and c["error"] and c["text"]


def test_glm4_parallel_calls_and_public_path():
    tools = [{"type": "function", "function": {"name": "a"}}, {"name": "b"}]
    text = 'a\n{"x": 1}<|assistant|>b\n{"y": [2]}'
    assert public_parse("glm4", text, tools) == [{"name": "a", "arguments": {"x": 1}},
                                                 {"name": "b", "arguments": {"y": [2]}}]
    assert public_parse("chatglm", "anything") == [] and public_parse("chatglm2", "f\n{}") == []
    with pytest.raises(ValueError, match="unknown family"):
        public_parse("gpt", "x")


def test_parsing_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = ["\n", "{", "}", "(", ")", "=", "'", '"', "```", "python", "tool_call", "get_weather", "<|assistant|>",
                ",", ":", "1", "x", " ", "**", "[", "]", "\\", "é", "\x00"]
    tools = [{"name": "get_weather"}]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for family in ("chatglm3", "glm4"):
            for call in parse_tool_calls(family, text, tools):
                assert set(call) in ({"name", "arguments"}, {"name", "error", "text"})
                if "arguments" in call:
                    json.dumps(call["arguments"])


def test_parsing_survives_hostile_answers():
    deep = "[" * 100_000 + "]" * 100_000
    for family, text in (("chatglm3", f"get_weather\n```python\ntool_call(a={deep})\n```"),
                         ("chatglm3", "get_weather\n```python\ntool_call(a='\x00')\n```"),
                         ("chatglm3", "get_weather\n```python\ntool_call(a=" + "(" * 5000 + ")" * 5000 + ")\n```"),
                         ("chatglm3", "get_weather\n```python\ntool_call(a={1, 2})\n```"),
                         ("chatglm3", "get_weather\n```python\ntool_call(**{'a': 1})\n```"),
                         ("glm4", "get_weather\n{\"a\": " + deep + "}")):
        (call,) = parse_tool_calls(family, text, [{"name": "get_weather"}])
        assert call["name"] == "get_weather" and "error" in call, (family, text[:60])


def test_stop_tokens_by_family(tok3, tok4):
    from tests.helpers.chat_models import tiny_model

    g = tok4.get_command
    assert C.stop_token_ids(tiny_model(tok4), tok4, "glm4")[:3] == [tok4.eos_token_id, g("<|user|>"),
                                                                   g("<|observation|>")]
    assert tok4.convert_ids_to_tokens(C.stop_token_ids(tiny_model(tok4), tok4, "glm4")[:3]) == [
        "<|endoftext|>", "<|user|>", "<|observation|>"]
    g3 = tok3.get_command
    assert C.stop_token_ids(tiny_model(tok3), tok3, "chatglm3")[:3] == [tok3.eos_token_id, g3("<|user|>"),
                                                                       g3("<|observation|>")]


def test_chatglm3_call_content_round_trips():
    args = {"city": "北京 \"quoted\"\n", "days": 3, "ok": True, "none": None, "ratio": 0.25, "tags": ["a", {"b": 1}]}
    content = chatglm3_call_content(args)
    assert content.startswith("```python\ntool_call(city=") and content.endswith(")\n```")
    assert parse_tool_calls("chatglm3", f"get_weather\n{content}") == [{"name": "get_weather", "arguments": args}]
    with pytest.raises(ToolError, match="identifier"):
        chatglm3_call_content({"not-an-identifier": 1})


# ------------------------------------------------------------------------------------------- glmkit's own rules
def test_mapping_keeps_what_the_servers_drop(tok4, tok3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "line one\nline two"}, {"role": "user", "content": "again"}]
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    native = to_native_messages("glm4", messages, tools)
    assert native[0] == {"role": "system", "content": None, "tools": [{"type": "function", "function": tools[0]}]}
    assert native[1] == {"role": "system", "content": "Be brief."}  # kept (GLM-4's server drops it)
    assert sum(m["role"] == "system" for m in native) == 2  # and not repeated
    text = tok4.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "<|assistant|>\nline one\nline two<|user|>" in text  # one message, not one per line
    native3 = to_native_messages("chatglm3", messages, tools)
    assert native3[0] == {"role": "system", "content": CHATGLM3_TOOL_PROMPT, "tools": tools}
    assert tok3.apply_chat_template(messages, tools=tools)[:3] == [tok3.get_command("[gMASK]"),
                                                                    tok3.get_command("sop"),
                                                                    tok3.get_command("<|system|>")]


def test_assistant_text_and_calls_and_tool_call_ids():
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_9", "content": "42"}]
    assert to_native_messages("glm4", msgs)[1:] == [
        {"role": "assistant", "metadata": "", "content": "Let me look."},
        {"role": "assistant", "metadata": "f", "content": '{"a": 1}'},
        {"role": "observation", "content": "42"}]
    assert to_native_messages("chatglm3", msgs)[2] == {"role": "assistant", "metadata": "f",
                                                       "content": "```python\ntool_call(a=1)\n```"}
    with pytest.raises(ToolError, match="call_7"):
        to_native_messages("glm4", msgs[:2] + [{"role": "tool", "tool_call_id": "call_7", "content": "x"}])
    with pytest.raises(ToolError, match="no tool calling"):
        to_native_messages("chatglm2", msgs)
    with pytest.raises(ToolError, match="twice"):
        to_native_messages("glm4", [{"role": "system", "content": None, "tools": [{"name": "f"}]}], [{"name": "f"}])


def test_families_without_tools_say_so(tmp_path):
    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "special_tokens" / "chatglm2")
    with pytest.raises(ValueError, match="no tool calling"):
        tok.apply_chat_template([{"role": "user", "content": "q"}], tools=[{"name": "f"}])
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "q"}]
    assert tok.apply_chat_template(messages, tokenize=False) == C.chatglm2_prompt("q", [("a", "b")])
    assert tok.apply_chat_template(messages) == C.build_chat_input(tok, "q", [("a", "b")])


def test_tool_schema_validation():
    good = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert validate_tools(good) == good
    bad = [([], "non-empty"), ([{"type": "function"}], "name"), ([{"type": "retrieval", "function": {"name": "f"}}],
                                                                  "type"),
           ([{"name": "has space"}], "name"), ([{"name": "f", "parameters": []}], "parameters"),
           ([{"name": "f", "parameters": {"type": "array"}}], "parameters.type"), ([{"name": "f"}, {"name": "f"}],
                                                                                 "twice"), (["f"], "object")]
    for tools, message in bad:
        with pytest.raises(ToolError, match=message):
            validate_tools(tools)
    # the library (chat, apply_chat_template) also takes names OpenAI would not, as ChatGLM3's own demo has them
    demo = [{"name": "/text-to-speech", "description": "将文本转换为语音", "parameters": {"type": "object"}}]
    assert validate_tools(demo, strict=False) == demo
    with pytest.raises(ToolError, match="name"):
        validate_tools(demo)
    with pytest.raises(ToolError, match="one-line"):
        validate_tools([{"name": "a\nb"}], strict=False)


def test_select_tools():
    tools = [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]
    assert select_tools(tools, None) == (tools, None) == select_tools(tools, "auto")
    assert select_tools(tools, "none") == ([], None)
    assert select_tools(tools, "required") == (tools, ["a", "b"])
    assert select_tools(tools, {"type": "function", "function": {"name": "b"}}) == ([tools[1]], ["b"])
    for choice, message in (({"type": "function", "function": {"name": "c"}}, "not one of"), ("sometimes", "must be"),
                            ({"function": "a"}, "must be")):
        with pytest.raises(ToolError, match=message):
            select_tools(tools, choice)
    with pytest.raises(ToolError, match="no tools"):
        select_tools([], "required")


def test_function_schema_from_signature_and_docstring():
    def get_weather(city: str, days: int = 1, unit: Literal["c", "f"] = "c",
                    tags: list[str] | None = None, note: Annotated[str, "free text"] = "") -> str:
        """Weather for a city.

        Args:
            city: the city's name
            days (int): how many days
                ahead, at most 7
        """
        return city

    schema = function_schema(get_weather)
    assert schema == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "the city's name"},
            "days": {"type": "integer", "description": "how many days ahead, at most 7"},
            "unit": {"enum": ["c", "f"]}, "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"type": "string", "description": "free text"}}}}}
    validate_tools([schema])

    def splat(*args): ...

    with pytest.raises(ToolError, match=r"\*args"):
        function_schema(splat)


def test_forced_call_keeps_the_answer_on_a_tool_name(tok3, tok4):
    for tok in (tok3, tok4):
        gen = torch.Generator().manual_seed(0)
        for names in (["get_weather"], ["get_weather", "search_docs"]):
            constraint = ForcedCall(tok, names)
            out: list[int] = []
            for _ in range(40):
                scores = torch.randn(tok.vocab_size, generator=gen)
                pick = int(constraint(out, scores).argmax())
                out.append(pick)
                if constraint.done:
                    break
            text = tok.decode(out)
            assert any(text.startswith(f"{n}\n") for n in names), (tok.family, text)
            assert torch.equal(constraint(out, scores), scores)  # free once the line is written


def test_chat_with_tools_glm4_and_chatglm3(tok3, tok4):
    """chat() with tools: the tool system message goes first, a scripted call comes back as {"name",
    "parameters"}, and the observation round continues the same history."""
    from tests.helpers.chat_models import Script, tiny_model

    for tok in (tok4, tok3):
        model = tiny_model(tok)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        body = '{"city": "Paris"}' if tok.family == "glm4" else chatglm3_call_content({"city": "Paris"})
        encode = (lambda s: tok.sp_encode(s)) if tok.family == "glm4" else tok.sp_encode
        script = encode("get_weather\n" + body) + [tok.get_command("<|observation|>")]
        response, history = C.chat(model, tok, "weather?", history=[], tools=tools, do_sample=False,
                                   logits_processor=[Script(script)], max_length=2000)
        assert response == {"name": "get_weather", "parameters": {"city": "Paris"}}
        assert history[0]["role"] == "system" and "tools" in history[0]
        # GLM-4's template needs OpenAI tools; ChatGLM3's tool demo gives the model bare function dicts
        assert history[0]["tools"] == (tools if tok.family == "glm4" else [tools[0]["function"]])
        prompt = tok.apply_chat_template(history[:-1])
        assert prompt == C.build_chat_input(tok, "weather?", [], tools=tools)
        script2 = encode("\nSunny.") + [tok.eos_token_id]
        answer, history2 = C.chat(model, tok, '{"sky": "clear"}', history=history, role="observation", tools=tools,
                                  do_sample=False, logits_processor=[Script(script2)], max_length=2000)
        assert answer == "Sunny." and history2[:len(history)] == history
        assert history2[len(history)] == {"role": "observation", "content": '{"sky": "clear"}'}
        assert sum("tools" in m for m in history2) == 1


def test_chat_stop_strings(tok4):
    from tests.helpers.chat_models import Script, tiny_model

    model = tiny_model(tok4)
    script = tok4.sp_encode("\nHello world, and more") + [tok4.eos_token_id]
    steps = list(C.stream_chat(model, tok4, "hi", do_sample=False, logits_processor=[Script(script)],
                               stop=[" wor", "zzz"], max_length=200))
    assert steps[-1][0] == "Hello" and steps[-1][1][-1]["content"] == "Hello"
    assert all("Hello".startswith(r) for r, _ in steps)
    full, _ = C.chat(model, tok4, "hi", do_sample=False, logits_processor=[Script(script)], max_length=200)
    assert full == "Hello world, and more"


def test_apply_chat_template_glm4_without_a_shipped_template(tmp_path, tok4):
    """A GLM-4 folder without chat_template renders the published one (bundled); a template that reads `tools`
    itself gets them instead of a system message."""
    cfg = dict(tok4.init_kwargs)
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (tmp_path / "tokenizer.model").write_bytes((DATA / "glm4" / "tokenizer.model").read_bytes())
    bare = load_tokenizer(tmp_path)
    case = GOLDEN["glm4"]["prompts"][3]
    assert bare.apply_chat_template(case["messages"]) == case["ids"]
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ tools | tojson }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    own = load_tokenizer(tmp_path)
    assert apply_chat_template(own, [{"role": "user", "content": "q"}], tools=[{"name": "f"}], tokenize=False) == \
        'q|[{"name": "f"}]'


def test_chatglm3_tool_calls_come_back_as_the_model_wrote_them(tok3):
    """An OpenAI `tool_calls` entry is written back with Python literals (`repr`), the form ChatGLM3 writes and THUDM's
    openai_api_demo sends back (its raw-output path): the same ids either way."""
    args = '{"city": "Beijing", "days": 3, "ok": true, "none": null, "ratio": 0.5, "tags": ["a", {"b": "it\'s"}]}'
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    written = "```python\ntool_call(city='Beijing', days=3, ok=True, none=None, ratio=0.5, tags=['a', {'b': \"it's\"}])\n```"
    openai = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert to_native_messages("chatglm3", openai)[1] == {"role": "assistant", "metadata": "get_weather",
                                                         "content": written}
    raw = [openai[0], {"role": "assistant", "content": "get_weather\n" + written,
                       "function_call": {"name": "get_weather", "arguments": args}},
           {"role": "function", "name": "get_weather", "content": "sunny"}]
    assert tok3.apply_chat_template(openai) == tok3.apply_chat_template(raw)
    assert "tool_call(city='Beijing'" in tok3.apply_chat_template(openai, tokenize=False)


def test_glm4_plain_assistant_reply_is_stripped(tok4):
    """GLM-4's server strips a plain assistant reply (process_messages: sub_content.strip()); other roles keep theirs."""
    messages = [{"role": "user", "content": " Weather? "}, {"role": "assistant", "content": " It is sunny today.\n"},
                {"role": "user", "content": "And tomorrow?"}]
    text = tok4.apply_chat_template(messages, tokenize=False)
    assert "<|user|>\n Weather? <|assistant|>\nIt is sunny today.<|user|>\nAnd tomorrow?<|assistant|>" in text
    stripped = [messages[0], {"role": "assistant", "metadata": "", "content": "It is sunny today."}, messages[2]]
    assert tok4.apply_chat_template(messages) == tok4.apply_chat_template(stripped)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert to_native_messages("glm4", [{"role": "assistant", "content": " Let me look. ", "tool_calls": [call]}])[0] \
        == {"role": "assistant", "metadata": "", "content": "Let me look."}
