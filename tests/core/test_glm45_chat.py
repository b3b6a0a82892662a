"""GLM-4.5's tokenizer.json layout and chat template, and its reasoning / tool-call answers.

The reference is transformers: a PreTrainedTokenizerFast over a tokenizer.json that transformers' TikTokenConverter
builds from the test GLM-4 ranks, with GLM-4.5's added tokens, rendering the published chat template
(tests/data/chat_templates/glm_4_5.jinja, see SOURCES.txt) through its own apply_chat_template."""

import json
import shutil
from pathlib import Path

import pytest

from glmkit.core.chat_template import apply_chat_template
from glmkit.core.reasoning import AnswerStream, parse_answer
from glmkit.core.tokenizer import load_tokenizer
from glmkit.core.tokenizer.base import GLM4_PATTERN

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parents[1] / "data"
GLM45_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "/nothink", "<tool_response>", "</tool_response>"]


def write_glm45_tokenizer(out: Path) -> Path:
    """A GLM-4.5-style tokenizer folder (tokenizer.json + tokenizer_config.json with the published template) over
    the test GLM-4 ranks, as transformers' TikTokenConverter builds it; returns `out`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    src = DATA / "tool_calls" / "glm4"
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    decoder = cfg["added_tokens_decoder"]
    nxt = max(int(i) for i in decoder) + 1
    for j, t in enumerate(GLM45_TOKENS):  # GLM-4.5 adds its tags as non-special added tokens
        decoder[str(nxt + j)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": False}
    fast = TikTokenConverter(vocab_file=str(src / "tokenizer.model"), pattern=GLM4_PATTERN).converted()
    data = json.loads(fast.to_str())
    data["added_tokens"] = [{"id": int(i), "content": t["content"], "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": t["special"]}
                            for i, t in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=(DATA / "chat_templates" /
                                                                          "glm_4_5.jinja").read_text())
    cfg.pop("auto_map", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    assert not (out / "tokenizer.model").exists()
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(glmkit's tokenizer, transformers' tokenizer) over one GLM-4.5-style tokenizer.json folder."""
    out = write_glm45_tokenizer(tmp_path_factory.mktemp("glm45tok"))
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    return load_tokenizer(out), theirs, out


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def conversations():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": 2}}}
    return {
        "tools_and_reasoning": (
            [{"role": "system", "content": "You are helpful."},
             {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [call]},
             {"role": "tool", "content": '{"sunny": true}'}],
            TOOLS, {}),
        "thinking_off": ([{"role": "user", "content": "hello 你好"}], None, {"enable_thinking": False}),
        "history_reasoning_dropped": (
            [{"role": "user", "content": "one"},
             {"role": "assistant", "content": "<think>old thoughts</think>\nfirst"},
             {"role": "user", "content": "two"},
             {"role": "assistant", "content": "second", "reasoning_content": "new thoughts"}],
            None, {}),
    }


@pytest.mark.parametrize("name", list(conversations()))
def test_template_ids_match_transformers(folders, name):
    ours, theirs, _ = folders
    messages, tools, kwargs = conversations()[name]
    gen = messages[-1]["role"] != "assistant"
    expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=True,
                                          return_dict=False, **kwargs)
    # glmkit takes OpenAI's form: tool-call arguments as JSON text
    openai = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    got = apply_chat_template(ours, openai, tools=tools, add_generation_prompt=gen, template_kwargs=kwargs)
    assert got == list(expected)
    text = ours.decode(got)
    assert ("<tool_call>get_weather" in text) == (name == "tools_and_reasoning")
    if name == "thinking_off":
        assert text.endswith("/nothink<|assistant|>\n<think></think>")


def test_tokenizer_json_encodes_decodes_and_saves_like_transformers(folders, tmp_path):
    ours, theirs, folder = folders
    text = "<|user|>\nhello 你好 <think>x</think> 123 <tool_call>f\n<arg_key>a</arg_key>"
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    ours.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(text) == ours.encode(text)
    shutil.rmtree(tmp_path / "saved")


def test_parse_answer_reasoning_and_xml_calls():
    text = ("<think>The user wants weather.</think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n</tool_call>")
    parsed = parse_answer(text, TOOLS)
    assert parsed.reasoning == "The user wants weather." and parsed.content == "Let me check."
    args = [json.loads(c["function"]["arguments"]) for c in parsed.tool_calls]
    assert args == [{"city": "Paris", "days": 2}, {"city": "123"}]  # the schema says city is a string
    # GLM-4.7 / GLM-Z1: <think> in the prompt; a call without arguments; no reasoning at all
    assert parse_answer("plan</think>done", thinking_open=True).reasoning == "plan"
    assert json.loads(parse_answer("<tool_call>now</tool_call>").tool_calls[0]["function"]["arguments"]) == {}
    plain = parse_answer("just text")
    assert plain.reasoning is None and plain.content == "just text" and not plain.tool_calls


def test_streamed_pieces_add_up_to_the_parsed_answer():
    text = ("<think>Step one.\nStep two.</think>\nIt is <b>sunny</b>.\n<tool_call>get_weather\n<arg_key>city"
            "</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>")
    for step in (1, 2, 3, 7):
        stream = AnswerStream(TOOLS)
        reasoning, content, calls = "", "", []
        for end in list(range(step, len(text), step)) + [len(text)]:
            r, c, new = stream.feed(text[:end], final=end == len(text))
            reasoning, content, calls = reasoning + r, content + c, calls + new
            assert "<" not in r.replace("<b>", "").replace("</b>", "")  # tags never leak half-way
        parsed = parse_answer(text, TOOLS)
        assert (reasoning, content) == (parsed.reasoning, parsed.content)
        assert [c["function"] for c in calls] == [c["function"] for c in parsed.tool_calls]
