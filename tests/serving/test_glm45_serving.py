"""GLM-4.5's reasoning and XML tool calls through model.chat / stream_chat and a live `glmkit serve` (the official
`openai` client), and GLM-Z1's reasoning.

A random model never writes `<think>` or `<tool_call>`, so the checkpoint here is a real tiny glm4_moe (written by
transformers' save_pretrained, dense layer then MoE layers, router and shared expert included) whose weights are
set so that greedy decoding follows a successor table: every attention and MLP output projection is zero (each
block adds nothing to the residual), token embeddings are orthonormal and lm_head row b points at the embedding of
the token that precedes b in the script. The answer to a prompt ending in `<|assistant|>` is then SCRIPT below,
token by token, through the whole model (routing, the paged KV cache, the server's sampling and parsing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import ServerProcess
from tests.core.test_glm45_chat import write_glm45_tokenizer

transformers = pytest.importorskip("transformers")

TOOLS = [{"type": "function", "function": {
    "name": "find", "description": "Search",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "k": {"type": "integer"}},
                   "required": ["q"]}}}]
REASONING, REPLY = "Plan", "Hi"
CALL = "<tool_call>find\n<arg_key>k</arg_key><arg_value>3</arg_value></tool_call>"  # each tag once: one argument
SCRIPT = f"<think>{REASONING}</think>{REPLY}{CALL}"  # then <|observation|>: GLM-4.5 stops there after a call


def successor_model(out: Path, tok_dir: Path, chains: list[list[str]]) -> Path:
    """A glm4_moe checkpoint in `out` (tokenizer from tok_dir) whose greedy next token after token a is the one that
    follows a in `chains` (texts, each encoded and joined). Raises if a token would need two successors."""
    from glmkit import load_tokenizer

    tok = load_tokenizer(tok_dir)
    succ: dict[int, int] = {}
    for chain in chains:
        ids = [i for part in chain for i in tok.encode(part, add_special_tokens=False)]
        for a, b in zip(ids, ids[1:]):
            if succ.setdefault(a, b) != b:
                raise ValueError(f"token {tok.decode([a])!r} would need two successors")
    stops = [tok.get_command(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    hidden = 64
    cfg = transformers.Glm4MoeConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, use_qk_norm=True,
        max_position_embeddings=512, num_nextn_predict_layers=0, eos_token_id=stops, pad_token_id=stops[0],
        bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    tokens = sorted(set(succ) | set(succ.values()))
    assert len(tokens) <= hidden, "more scripted tokens than embedding dimensions"
    basis = torch.linalg.qr(torch.randn(hidden, hidden))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()  # every block adds nothing: the last hidden state is the token's embedding
            elif "layernorm" in name or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.2)  # q/k/v, gates, experts, router: real work whose result is not added
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.normal_(0, 0.02)
        head.zero_()
        for j, t in enumerate(tokens):
            emb[t] = basis[j]
        for a, b in succ.items():
            head[b] += 5.0 * basis[tokens.index(a)]
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def glm45_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm45")
    tok_dir = write_glm45_tokenizer(root / "tok")
    # thinking on: <|assistant|> -> the script; thinking off: the prompt ends in </think>, which the script continues
    return successor_model(root / "model", tok_dir, [["<|assistant|>", SCRIPT, "<|observation|>"]])


@pytest.fixture(scope="module")
def local(glm45_dir):
    import glmkit

    return glmkit.load_model(glm45_dir), glmkit.load_tokenizer(glm45_dir)


def test_chat_returns_reasoning_and_xml_calls(local):
    model, tok = local
    response, history = model.chat(tok, "Search Rome", history=[], tools=TOOLS, do_sample=False)
    assert response == {"name": "find", "parameters": {"k": 3}}
    last = history[-1]
    assert last["reasoning_content"] == REASONING and last["content"] == REPLY
    assert [json.loads(c["function"]["arguments"]) for c in last["tool_calls"]] == [{"k": 3}]
    # the result goes back as a tool message: the next prompt is what transformers renders from the same turns
    from glmkit.core.chat import build_chat_input

    ids = build_chat_input(tok, '{"hits": 1}', history, role="observation", tools=TOOLS)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir_of(tok)))
    turns = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in history]
    expected = theirs.apply_chat_template(turns + [{"role": "tool", "content": '{"hits": 1}'}], tools=TOOLS,
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == list(expected)
    assert "<arg_value>3</arg_value>" in tok.decode(ids) and "<tool_response>" in tok.decode(ids)


def model_dir_of(tok) -> Path:
    return Path(tok.vocab_file).parent


def test_stream_chat_streams_reasoning_before_the_reply(local):
    model, tok = local
    states = list(model.stream_chat(tok, "Search Rome", history=[], tools=TOOLS, do_sample=False))
    reasonings = [s[1][-1].get("reasoning_content") for s in states]
    replies = [s[0] for s in states]
    assert states[0][0] == "" and reasonings[0]  # reasoning shows before any reply
    assert all("<" not in (r or "") for r in reasonings)  # no half tags
    assert all(isinstance(r, dict) or "<" not in r for r in replies)
    assert states[-1][0] == {"name": "find", "parameters": {"k": 3}}
    assert states[-1] == model.chat(tok, "Search Rome", history=[], tools=TOOLS, do_sample=False)


def test_thinking_off_and_no_tools(local):
    model, tok = local
    response, history = model.chat(tok, "Search Rome", history=[], tools=TOOLS, do_sample=False,
                                   enable_thinking=False)
    assert "reasoning_content" not in history[-1] and history[-1]["content"] == REPLY
    assert response["name"] == "find"
    from glmkit.core.chat import build_chat_input

    assert tok.decode(build_chat_input(tok, "x", [], enable_thinking=False)).endswith(
        "x/nothink<|assistant|>\n<think></think>")
    # no tools offered: a call is not parsed, the reply keeps its text (as vLLM without a tool parser)
    response, history = model.chat(tok, "Search Rome", history=[], do_sample=False)
    assert response == REPLY + CALL and history[-1]["reasoning_content"] == REASONING


def test_glm_z1_reasoning_with_think_open_in_the_prompt(tmp_path):
    """GLM-Z1's template ends the generation prompt with `<think>` (mandatory thinking, zai-org/GLM-4 #770): the
    answer is reasoning up to `</think>`, then the reply."""
    import glmkit

    tok_dir = write_glm45_tokenizer(tmp_path / "tok")
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    source = (Path(glmkit.__file__).parent / "assets" / "glm4-chat-template.jinja").read_text()
    assert source.endswith("{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg["chat_template"] = source.replace("<|assistant|>{% endif %}", "<|assistant|>\n<think>{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    folder = successor_model(tmp_path / "z1", tok_dir, [["<think>", f"{REASONING}</think>\n{REPLY}", "<|user|>"]])
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    response, history = model.chat(tok, "hi", history=[], do_sample=False)
    assert response == REPLY and history[-1]["reasoning_content"] == REASONING


# ------------------------------------------------------------------------------------------- the OpenAI server
class Serve(ServerProcess):
    def __init__(self, model: Path) -> None:
        import sys

        super().__init__(lambda port: [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--model",
                                       str(model), "--log-level", "warning"], model.parent, name="glmkit serve")


@pytest.mark.slow
def test_openai_client_gets_reasoning_and_tool_calls(glm45_dir):
    openai = pytest.importorskip("openai")
    server = Serve(glm45_dir)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Search Rome"}]
        done = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.reasoning_content == REASONING and choice.message.content == REPLY
        call = choice.message.tool_calls[0]
        assert call.function.name == "find" and json.loads(call.function.arguments) == {"k": 3}

        # streamed: reasoning deltas, then content, then the call; they add up to the same answer
        reasoning, content, calls, reasons = "", "", {}, []
        for chunk in client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0,
                                                    stream=True):
            delta = chunk.choices[0].delta
            assert not (getattr(delta, "reasoning_content", None) and content)  # reasoning comes first
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            reasons.append(chunk.choices[0].finish_reason)
        assert (reasoning, content) == (REASONING, REPLY) and reasons[-1] == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("find", {"k": 3})]

        # thinking off per request (vLLM's chat_template_kwargs), and no tools: the call text stays in the reply
        off = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert getattr(off.choices[0].message, "reasoning_content", None) is None
        assert off.choices[0].message.content == REPLY and off.choices[0].message.tool_calls
        plain = client.chat.completions.create(model="m", messages=messages, temperature=0)
        assert plain.choices[0].message.content == REPLY + CALL and plain.choices[0].finish_reason == "stop"
        # a forced call is GLM-4's name-line format: refused clearly for XML calls
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="required")
    finally:
        server.stop()


def test_terminal_shows_reasoning_then_the_answer(glm45_dir, tmp_path):
    """`glmkit chat` through a pipe: the answer on stdout, the reasoning (and the call, without a toolbox shown as
    the model's call) apart on stderr; with --tools the call runs and its result goes back as a tool message."""
    import subprocess
    import sys

    from tests.helpers.common import REPO

    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "glmkit", "chat", "--model", str(glm45_dir), "--temperature", "0", *extra],
        input="hello\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    done = run()
    assert done.returncode == 0, done.stderr
    assert f"[thinking] {REASONING}\n" in done.stderr and done.stdout == REPLY + CALL + "\n"
    tools = tmp_path / "tools.py"
    tools.write_text("def find(k: int) -> str:\n    \"\"\"Search.\"\"\"\n    return f'found {k}'\n")
    done = run("--tools", str(tools), "--no-thinking")
    assert done.returncode == 0, done.stderr
    assert "[thinking]" not in done.stderr
    assert '[tool call] find({"k": 3})' in done.stderr and "[tool result] found 3" in done.stderr
