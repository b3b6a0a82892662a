"""Tool calling and the rest of the sampling surface through a live `glmkit serve` and the official `openai` client.

Two kinds of server, each a real process on a loopback port:
- `python -m glmkit serve` on tiny random GLM-4 checkpoints: what a random model can show (tool_choice "none" /
  "auto" / "required" / named, answers to unrelated questions, logprobs against a local forward pass, penalties and
  n against the library, bad tool schemas).
- the same library call (`glmkit.serving.openai_api.serve`) on a model whose answers are scripted below the engine
  (tests.helpers.chat_models.scripted_model), for what a random model cannot be made to say: a tool call round trip
  for GLM-4 and ChatGLM3, plain and streamed, and a stop string inside a known answer.
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import torch

from tests.helpers.chat_models import SEARCH_TOOL, STORY, WEATHER_TOOL, build_tiny_chat_model, build_tiny_glm4_model
from tests.helpers.common import REPO
from tests.helpers.processes import Server, ServerProcess

openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency (pip install openai)")
from openai.lib.streaming.chat import ChatCompletionStreamState  # noqa: E402

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]


class ScriptedServer(ServerProcess):
    """glmkit.serving.openai_api.serve on tests.helpers.chat_models.scripted_model(folder), in its own process."""

    def __init__(self, model) -> None:
        super().__init__(lambda port: [sys.executable, "-c", f"from tests.helpers.chat_models import serve_scripted; "
                                                             f"serve_scripted({str(model)!r}, {port})"],
                         model.parent, name="the scripted server")


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory):
    return build_tiny_glm4_model(tmp_path_factory.mktemp("tools") / "tiny-glm4")


@pytest.fixture(scope="module")
def chatglm3_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tools3") / "tiny-chatglm3", "chatglm3", max_seq_len=2048)


@pytest.fixture(scope="module")
def local(glm4_dir):
    from glmkit import load_model, load_tokenizer

    return load_model(glm4_dir, dtype="float32").eval(), load_tokenizer(glm4_dir)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def random_server(glm4_dir):
    srv = Server(glm4_dir)
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(random_server):
    return _client(random_server)


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def scripted(request, glm4_dir, chatglm3_dir):
    srv = ScriptedServer(glm4_dir if request.param == "glm4" else chatglm3_dir)
    yield request.param, _client(srv), srv
    assert srv.stop() == 0, srv.output()


def ask(client, content, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kwargs)


def accumulate(stream):
    """The official client's own stream accumulation (what `client.chat.completions.stream` builds on)."""
    state = ChatCompletionStreamState()
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        state.handle_chunk(chunk)
    return state.current_completion_snapshot, chunks


# ------------------------------------------------------------------------------------ round trip (scripted model)
@pytest.mark.slow
def test_tool_call_round_trip(scripted):
    family, client, _ = scripted
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    streamed, chunks = accumulate(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                                                 temperature=0, stream=True))
    (scall,) = streamed.choices[0].message.tool_calls
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert (scall.function.name, scall.function.arguments) == (call.function.name, call.function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # no call text leaked as content

    # the result goes back with role "tool" and the conversation continues
    messages += [choice.message,  # the client's own message object, as OpenAI's docs pass it back
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})}]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    assert second.choices[0].message.content == "The weather in Paris is sunny."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    streamed2, _ = accumulate(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                                             temperature=0, stream=True))
    assert streamed2.choices[0].message.content == "The weather in Paris is sunny."


@pytest.mark.slow
def test_the_prompt_holds_the_call_and_its_result(scripted, glm4_dir, chatglm3_dir):
    """usage.prompt_tokens is the family's native prompt of the mapped conversation (apply_chat_template)."""
    from glmkit import load_tokenizer

    family, client, _ = scripted
    tok = load_tokenizer(glm4_dir if family == "glm4" else chatglm3_dir)
    call = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [{"role": "user", "content": "weather in Rome?"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "rainy"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0)
    native = tok.apply_chat_template(messages, tools=TOOLS)
    assert r.usage.prompt_tokens == len(native)
    assert tok.get_command("<|observation|>") in native and native[-1] == tok.get_command("<|assistant|>")
    assert r.choices[0].message.content == "The weather in Paris is sunny."  # the script answers any result


@pytest.mark.slow
def test_unrelated_question_with_tools_streams_a_normal_answer(scripted):
    """GLM-4#330: with tools present, a plain answer still arrives, and streamed as it is generated."""
    _, client, _ = scripted
    plain = ask(client, "tell me a story", tools=TOOLS, temperature=0)
    assert plain.choices[0].message.content == STORY and plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.tool_calls is None
    streamed, chunks = accumulate(ask(client, "tell me a story", tools=TOOLS, temperature=0, stream=True))
    assert streamed.choices[0].message.content == STORY
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 10


@pytest.mark.slow
def test_stop_string_across_tokens(scripted):
    _, client, _ = scripted
    r = ask(client, "tell me a story", temperature=0, stop=["tched the", "never"])
    assert r.choices[0].message.content == STORY[: STORY.index("tched the")]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, "tell me a story", temperature=0,
                                                                     stop="tched the", stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


@pytest.mark.slow
def test_legacy_functions(scripted):
    _, client, _ = scripted
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather in Paris?"}],
                                       functions=[WEATHER_TOOL["function"]], temperature=0)
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    assert json.loads(r.choices[0].message.function_call.arguments) == {"city": "Paris"}
    assert not r.choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather?"}],
                                                 functions=[WEATHER_TOOL["function"]], temperature=0, stream=True))
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert calls[0].name == "get_weather" and "".join(c.arguments for c in calls) == \
        r.choices[0].message.function_call.arguments
    assert chunks[-1].choices[0].finish_reason == "function_call"


# ---------------------------------------------------------------------------------- tool_choice (random model)
@pytest.mark.slow
def test_tool_choice_variants(client, local):
    model, tok = local
    messages = [{"role": "user", "content": "hello there"}]
    none = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert none.usage.prompt_tokens == len(tok.apply_chat_template(messages))  # no tools in the prompt
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None
    auto = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="auto",
                                          temperature=0, max_tokens=8)
    assert auto.usage.prompt_tokens == len(tok.apply_chat_template(messages, tools=TOOLS))

    required = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                              temperature=0, max_tokens=24)
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "search_docs") and required.choices[0].finish_reason in (
        "tool_calls", "length")
    named = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=24,
        tool_choice={"type": "function", "function": {"name": "search_docs"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["search_docs"]
    assert named.usage.prompt_tokens == len(tok.apply_chat_template(messages, tools=[SEARCH_TOOL]))
    # a random model's arguments are whatever it wrote: returned as written, streamed the same way
    streamed, _ = accumulate(client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=24, stream=True,
        tool_choice={"type": "function", "function": {"name": "search_docs"}}))
    scall = streamed.choices[0].message.tool_calls[0]
    assert (scall.function.name, scall.function.arguments) == ("search_docs",
                                                               named.choices[0].message.tool_calls[0].function.arguments)


@pytest.mark.slow
def test_random_answer_with_tools_is_text(client):
    """A random model does not write a tool's name line: the answer comes back as text, streamed or not."""
    plain = ask(client, "hello", tools=TOOLS, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].message.tool_calls is None
    streamed, _ = accumulate(ask(client, "hello", tools=TOOLS, temperature=0, max_tokens=16, stream=True))
    assert streamed.choices[0].message.content == text


# ------------------------------------------------------------------------------------------- sampling surface
@pytest.mark.slow
def test_logprobs_are_the_models(client, local):
    model, tok = local
    messages = [{"role": "user", "content": "the river"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    ids = tok.apply_chat_template(messages)
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the top
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    with torch.no_grad():
        gen = []
        for entry in entries:
            logits = model(torch.tensor([ids + gen]))[0, -1].float()
            want = logits.log_softmax(-1)
            top = int(want.argmax())
            assert bytes(entry.bytes) == tok.token_bytes(top)
            assert abs(entry.logprob - float(want[top])) < 1e-4
            gen.append(top)
    streamed = [c for c in ask(client, "the river", temperature=0, max_tokens=6, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs]
    got = [e.logprob for c in streamed for e in c.choices[0].logprobs.content]
    assert got == [e.logprob for e in entries]


@pytest.mark.slow
def test_n_choices(client):
    greedy = ask(client, "cat", temperature=0, max_tokens=6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    one = ask(client, "cat", temperature=0, max_tokens=6)
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = ask(client, "cat", temperature=1.0, top_p=1.0, seed=7, max_tokens=8, n=2)
    assert [c.message.content for c in sampled.choices] == [
        ask(client, "cat", temperature=1.0, top_p=1.0, seed=s, max_tokens=8).choices[0].message.content
        for s in (7, 8)]
    streamed, _ = accumulate(ask(client, "cat", temperature=1.0, top_p=1.0, seed=7, max_tokens=8, n=2, stream=True))
    assert [c.message.content for c in streamed.choices] == [c.message.content for c in sampled.choices]


@pytest.mark.slow
def test_penalties_match_the_library(client, local):
    from glmkit.core.chat import stop_token_ids
    from glmkit.core.generate import generate
    from glmkit.serving.protocol import ChatFormat

    model, tok = local
    ids = tok.apply_chat_template([{"role": "user", "content": "stone light"}])
    stops = stop_token_ids(model, tok, "glm4")
    for kwargs in ({"presence_penalty": 1.5}, {"frequency_penalty": 2.0}, {"presence_penalty": -1.0,
                                                                           "frequency_penalty": 0.5}):
        r = ask(client, "stone light", temperature=0, max_tokens=20, **kwargs)
        out = generate(model, torch.tensor([ids]), max_new_tokens=20, eos_token_id=stops, **kwargs)[0].tolist()
        out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
        assert r.choices[0].message.content == ChatFormat(tok, 2048).text(out)
        assert r.usage.completion_tokens == len(out)
    plain = ask(client, "stone light", temperature=0, max_tokens=20).choices[0].message.content
    assert plain != ask(client, "stone light", temperature=0, max_tokens=20,
                        frequency_penalty=2.0).choices[0].message.content


# -------------------------------------------------------------------------------------------------- bad input
BAD = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools"),
    ("tool name", {"tools": [{"type": "function", "function": {"name": "no spaces allowed"}}]}, "tools"),
    ("tool type", {"tools": [{"type": "code_interpreter"}]}, "tools"),
    ("parameters not an object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools"),
    ("parameters type", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools"),
    ("duplicate names", {"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
    ("unknown named tool", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("bad tool_choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("tools and functions", {"tools": TOOLS, "functions": [WEATHER_TOOL["function"]]}, "functions"),
    ("tool result for no call", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "x"}]}, "messages"),
    ("malformed tool_calls", {"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "tool_calls": [{"id": "c"}]},
                                           {"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages"),
    ("tool without content", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool"}]},
     "messages.1.content"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs range", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("presence range", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency type", {"frequency_penalty": "a lot"}, "frequency_penalty"),
    ("n zero", {"n": 0}, "n"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_malformed_tool_requests_get_json_4xx(random_server, name, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(random_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert httpx.get(random_server.url + "/health").json()["status"] == "ok"


@pytest.mark.slow
def test_client_sees_bad_tools_as_bad_request_and_server_stays_healthy(client, random_server):
    with pytest.raises(openai.BadRequestError, match="name"):
        ask(client, "hi", tools=[{"type": "function", "function": {"name": ""}}])
    assert ask(client, "hi", tools=TOOLS, temperature=0, max_tokens=3).choices[0].message.role == "assistant"
    assert httpx.get(random_server.url + "/health").json()["status"] == "ok"


def test_families_without_tools_refuse_them(tmp_path):
    from glmkit import load_tokenizer
    from glmkit.serving.protocol import APIError, ChatFormat, parse_chat_request

    tok = load_tokenizer(REPO / "tests" / "data" / "special_tokens" / "chatglm2")
    fmt = ChatFormat(tok, 4096)
    with pytest.raises(APIError) as err:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}, fmt)
    assert err.value.status == 400 and err.value.code == "tools_not_supported"
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                              "tool_choice": "none"}, ChatFormat(load_tokenizer(REPO / "tests" / "data" / "tool_calls"
                                                                                / "glm4"), 4096))
    assert req.tools is None and req.params.forced_tools is None
