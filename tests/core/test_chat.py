"""Chat templates to the character, post-processing, and chat/stream_chat end to end on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

import glmkit.core.generate
from glmkit.core import chat as C
from glmkit.core.tokenizer import load_tokenizer, write_tiktoken_ranks
from glmkit.core.tokenizer.base import GLM4_SPECIAL_TOKENS
from glmkit.training.tokenizer import train_tokenizer
from tests.helpers.chat_models import Script, tiny_model

LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "你好，我是一个语言模型。今天天气很好，我们去公园散步吧！",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "Hello world! English, 中文 and mixed text: 模型 model 123.",
    "[Round 0]\n问：你好\n答：你好！有什么可以帮你？",
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-toks")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(LINES * 30), encoding="utf-8")
    out = {}
    for family, size in (("chatglm", 650), ("chatglm2", 560), ("chatglm3", 560)):
        train_tokenizer([corpus], size, family, root / family)
        out[family] = load_tokenizer(root / family)
    # GLM-4: 256 byte ranks plus a few merges, special tokens after them
    ranks = {bytes([b]): b for b in range(256)}
    for word in ["你", "好", "Hello", " world", "\n"]:
        raw = word.encode()
        for end in range(2, len(raw) + 1):
            ranks.setdefault(raw[:end], len(ranks))
    glm4 = root / "glm4"
    glm4.mkdir()
    write_tiktoken_ranks(ranks, glm4 / "tokenizer.model")
    cfg = {"added_tokens_decoder": {str(len(ranks) + i): {"content": t} for i, t in enumerate(GLM4_SPECIAL_TOKENS)},
           "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (glm4 / "tokenizer_config.json").write_text(json.dumps(cfg))
    out["glm4"] = load_tokenizer(glm4)
    return out


# ---------------------------------------------------------------------------------------------- templates
def test_chatglm_template_to_the_character(toks):
    assert C.chatglm_prompt("你好", []) == "你好"
    assert C.chatglm_prompt("第三问", [("你好", "你好！"), ("Q2", "A2")]) == (
        "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：Q2\n答：A2\n[Round 2]\n问：第三问\n答：")
    tok = toks["chatglm"]
    assert C.build_chat_input(tok, "你好") == tok.encode("你好")
    assert C.build_chat_input(tok, "q", [("a", "b")]) == tok.encode("[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答：")
    assert C.build_chat_input(tok, "q")[-2:] == [tok.gmask_token_id, tok.sop_token_id]


def test_chatglm2_template_to_the_character(toks):
    assert C.chatglm2_prompt("你好", []) == "[Round 1]\n\n问：你好\n\n答："
    assert C.chatglm2_prompt("q", [("a", "b")]) == "[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：q\n\n答："
    tok = toks["chatglm2"]
    ids = C.build_chat_input(tok, "q", [("a", "b")])
    assert ids[:2] == [tok.gmask_token_id, tok.sop_token_id]
    assert ids[2:] == tok.sp.encode("[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：q\n\n答：")


def test_chatglm3_template_ids(toks):
    tok = toks["chatglm3"]
    sp = tok.sp
    g = tok.get_command
    expected = ([g("[gMASK]"), g("sop"), g("<|system|>")] + sp.encode("\n") + sp.encode("be brief")
                + [g("<|user|>")] + sp.encode("\n") + sp.encode("a")
                + [g("<|assistant|>")] + sp.encode("\n") + sp.encode("b")
                + [g("<|user|>")] + sp.encode("\n") + sp.encode("q") + [g("<|assistant|>")])
    assert C.build_chat_input(tok, "q", [("a", "b")], system="be brief") == expected
    as_dicts = [{"role": "user", "content": "a"}, {"role": "assistant", "metadata": "", "content": "b"}]
    assert C.build_chat_input(tok, "q", as_dicts, system="be brief") == expected
    tool = [{"role": "assistant", "metadata": "weather", "content": "x"}]
    ids = C.build_chat_input(tok, "q", tool)
    assert ids[3:3 + len(sp.encode("weather\n"))] == sp.encode("weather\n")


def test_glm4_template_to_the_character(toks):
    tok = toks["glm4"]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": ""}, {"role": "assistant", "metadata": "m", "content": "b"},
                {"role": "user", "content": "你好"}]
    assert C.glm4_prompt(tok, messages) == "[gMASK]<sop><|system|>\nS<|user|>\na<|assistant|>m\nb<|user|>\n你好<|assistant|>"
    ids = C.build_chat_input(tok, "你好", [("a", "b")], system="S")
    g = tok.get_command
    assert ids == ([g("[gMASK]"), g("<sop>"), g("<|system|>")] + tok.sp_encode("\nS") + [g("<|user|>")]
                   + tok.sp_encode("\na") + [g("<|assistant|>")] + tok.sp_encode("\nb") + [g("<|user|>")]
                   + tok.sp_encode("\n你好") + [g("<|assistant|>")])


def test_system_prompt_only_where_the_family_has_one(toks):
    for family in ("chatglm", "chatglm2"):
        with pytest.raises(ValueError, match="no system prompt"):
            C.build_chat_input(toks[family], "q", system="be brief")


# ---------------------------------------------------------------------------------------------- post-processing
def test_chatglm_response_processing():
    assert C.process_chatglm_response("  你好,世界!你:好;吗?  ") == "你好，世界！你：好；吗？"
    assert C.process_chatglm_response("Hello, world! a:b; ok?") == "Hello, world! a:b; ok?"
    assert C.process_chatglm_response("现在是[[训练时间]]") == "现在是2023年"
    assert C.process_chatglm_response("好,ok") == "好，ok" and C.process_chatglm_response("ok,好") == "ok，好"
    assert C.process_chatglm2_response("  你好,世界 [[训练时间]] ") == "你好,世界 2023年"


def test_chatglm3_response_processing():
    history = [{"role": "user", "content": "q"}]
    content, new = C.process_chatglm3_response("\n 你好 ", history)
    assert content == "你好" and new[-1] == {"role": "assistant", "metadata": "", "content": "你好"}
    assert history == [{"role": "user", "content": "q"}]  # not mutated
    tools = [{"role": "system", "content": "", "tools": [{"name": "weather"}]}]
    content, _ = C.process_chatglm3_response("weather\n```python\ntool_call(city='北京', days=3)\n```", tools)
    assert content == {"name": "weather", "parameters": {"city": "北京", "days": 3}}
    content, _ = C.process_chatglm3_response("weather\n__import__('os')", tools)  # never evaluated
    assert content["name"] == "weather" and "content" in content


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4"])
def test_stream_chat_ends_in_chat_result(toks, family):
    tok = toks[family]
    model = tiny_model(tok)
    history = [("你好", "你好！"), ("Hello", "world")]
    response, new_history = model.chat(tok, "今天天气怎么样", history=history, do_sample=False, max_length=70)
    assert isinstance(response, str)
    assert new_history == history + [("今天天气怎么样", response)]  # tuples in, tuples out
    assert history == [("你好", "你好！"), ("Hello", "world")]
    streamed = list(model.stream_chat(tok, "今天天气怎么样", history=history, do_sample=False, max_length=70))
    assert streamed and streamed[-1] == (response, new_history)
    assert all(not r.endswith("\ufffd") for r, _ in streamed[:-1])
    # sampling with a seed is reproducible
    a = model.chat(tok, "你好", history=[], do_sample=True, seed=3, max_length=30)
    b = model.chat(tok, "你好", history=[], do_sample=True, seed=3, max_length=30)
    assert a == b


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_role_dict_history_as_the_original(toks, family):
    tok = toks[family]
    model = tiny_model(tok, seed=1)
    response, history = model.chat(tok, "你好", history=[], do_sample=False, max_length=40, system="be brief")
    assert history[0] == {"role": "system", "content": "be brief"}
    assert history[1] == {"role": "user", "content": "你好"}
    assert history[-1]["role"] == "assistant" and history[-1]["content"] == response
    response2, history2 = model.chat(tok, "再见", history=history, do_sample=False, max_length=70)
    assert history2[:len(history)] == history and history2[len(history)] == {"role": "user", "content": "再见"}


def test_scripted_answer_stop_tokens_and_postprocessing(toks):
    tok = toks["chatglm"]
    model = tiny_model(tok)
    answer = tok.encode("你好,世界!", add_special_tokens=False)
    script = answer + [tok.eos_token_id, tok.gmask_token_id]
    response, history = C.chat(model, tok, "hi", history=[], do_sample=False, logits_processor=[Script(script)])
    assert response == "你好，世界！" and history == [("hi", "你好，世界！")]


def test_stream_holds_back_incomplete_utf8(toks):
    tok = toks["chatglm2"]
    model = tiny_model(tok)
    emoji = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "😀".encode()]
    script = tok.sp_encode("ok") + emoji + [tok.eos_token_id]
    steps = list(C.stream_chat(model, tok, "q", do_sample=False, logits_processor=[Script(script)]))
    texts = [r for r, _ in steps]
    assert texts[-1] == "ok😀" and all("ok😀".startswith(t) for t in texts)  # never a half character
    assert len(steps) <= len(script) - 3  # the three incomplete emoji bytes were held back


def test_chatglm3_stops_on_role_tokens(toks):
    tok = toks["chatglm3"]
    model = tiny_model(tok)
    script = tok.sp_encode("\n答案") + [tok.get_command("<|user|>")] + tok.sp_encode("never")
    response, history = C.chat(model, tok, "q", history=[], do_sample=False, logits_processor=[Script(script)])
    assert response == "答案" and history[-1] == {"role": "assistant", "metadata": "", "content": "答案"}


def test_max_length_counts_prompt_and_answer(toks, monkeypatch):
    tok = toks["chatglm"]
    model = tiny_model(tok)
    steps = []
    real = glmkit.core.generate.generate_stream

    def counting(*args, **kwargs):
        for step in real(*args, **kwargs):
            steps.append(int(step[0]))
            yield step

    monkeypatch.setattr(glmkit.core.chat, "generate_stream", counting)
    script = tok.sp_encode("长长长长长长长长长长长长长长长长长长长长长长长长长长长长长长")
    prompt = C.build_chat_input(tok, "你好")
    C.chat(model, tok, "你好", do_sample=False, max_length=len(prompt) + 7, logits_processor=[Script(script)])
    assert len(steps) == 7


def test_family_defaults_reach_the_sampler(toks, monkeypatch):
    seen = {}
    real = glmkit.core.generate.generate_stream

    def spy(model, input_ids, **kwargs):
        seen.update(kwargs)
        return real(model, input_ids, **kwargs)

    monkeypatch.setattr(glmkit.core.chat, "generate_stream", spy)
    expected = {"chatglm": (2048, 0.7, 0.95), "chatglm2": (8192, 0.8, 0.8), "chatglm3": (8192, 0.8, 0.8)}
    for family, (max_length, top_p, temperature) in expected.items():
        tok = toks[family]
        model = tiny_model(tok, max_seq_len=10_000)
        C.chat(model, tok, "你好", max_new_tokens=2)
        assert (seen["max_length"], seen["top_p"], seen["temperature"], seen["do_sample"], seen["top_k"]) == (
            max_length, top_p, temperature, True, 50)
    assert seen["eos_token_id"] == [toks["chatglm3"].eos_token_id, toks["chatglm3"].get_command("<|user|>"),
                                    toks["chatglm3"].get_command("<|observation|>")]
    tok = toks["chatglm"]
    C.chat(tiny_model(tok, max_seq_len=64), tok, "你好", max_new_tokens=1)
    assert seen["max_length"] == 64  # clamped to the model's context


def test_invalid_scores_pick_token_5(toks):
    tok = toks["chatglm2"]
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    prompt = C.build_chat_input(tok, "q")
    response, _ = C.chat(model, tok, "q", do_sample=True, max_length=len(prompt) + 4)
    assert response == C.process_chatglm2_response(tok.decode([5] * 4))


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_history_that_does_not_fit_is_dropped_oldest_first(toks, family):
    tok = toks[family]
    history = [(f"问题{i}" * 5, f"回答{i}" * 5) for i in range(12)]
    ids, kept = C.fit_history(tok, "最后的问题", history, limit=120)
    assert len(ids) < 120 and 0 < len(kept) < len(history)
    assert kept == history[len(history) - len(kept):]  # a suffix: the oldest turns went first
    model = tiny_model(tok, max_seq_len=120)
    response, new_history = model.chat(tok, "最后的问题", history=history, do_sample=False)
    assert new_history == history + [("最后的问题", response)]  # the caller still gets every turn
    with pytest.raises(ValueError, match="no room"):
        C.fit_history(tok, "很长" * 200, [], limit=50)


def test_dict_history_truncation_keeps_the_system_message(toks):
    tok = toks["chatglm3"]
    history = [{"role": "system", "content": "S"}]
    for i in range(10):
        history += [{"role": "user", "content": f"问题{i}" * 4}, {"role": "assistant", "content": f"回答{i}" * 4}]
    _, kept = C.fit_history(tok, "q", history, limit=90)
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user" and len(kept) < len(history)
    assert kept[1:] == history[len(history) - len(kept) + 1:]


def test_clear_errors(toks):
    tok = toks["chatglm"]
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="num_beams"):
        model.chat(tok, "q", num_beams=0)
    with pytest.raises(ValueError, match="no system prompt"):
        model.chat(tok, "q", system="S")
    with pytest.raises(ValueError, match="pair"):
        model.chat(tok, "q", history=[("only one",)])
    with pytest.raises(TypeError, match="string"):
        model.chat(tok, 42)


def test_transformers_tokenizer_is_read_through_its_files(toks):
    transformers = pytest.importorskip("transformers")
    tok = toks["chatglm2"]
    hf = transformers.LlamaTokenizer(vocab_file=tok.vocab_file)  # any transformers tokenizer over the same file
    assert C.as_glmkit_tokenizer(hf).family == "chatglm2"
    assert C.build_chat_input(hf, "你好", [("a", "b")]) == C.build_chat_input(tok, "你好", [("a", "b")])
    with pytest.raises(ValueError, match="not a GLM tokenizer"):
        C.as_glmkit_tokenizer(object())


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_greedy_chat_equals_a_plain_forward_loop(toks, family):
    """chat(do_sample=False) against the original recipe spelled out: template -> full forward per step ->
    argmax until the model's eos or max_length -> decode (eos included) -> the family's post-processing."""
    tok = toks[family]
    model = tiny_model(tok, seed=2)
    history = [("你好", "你好！"), ("Hello", "world")]
    prompt = (C.chatglm_prompt if family == "chatglm" else C.chatglm2_prompt)("今天天气怎么样", history)
    ids = tok.encode(prompt)
    max_length = len(ids) + 12
    out: list[int] = []
    with torch.no_grad():
        while len(ids) + len(out) < max_length:
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt in model.config.eos_token_ids:
                break
    text = tok.decode(out)
    expected = C.process_chatglm_response(text) if family == "chatglm" else C.process_chatglm2_response(text)
    assert model.chat(tok, "今天天气怎么样", history=history, do_sample=False, max_length=max_length) == (
        expected, history + [("今天天气怎么样", expected)])


def test_beam_search_chat_is_deterministic_and_matches_one_beam_greedy(toks):
    tok = toks["chatglm"]
    model = tiny_model(tok)
    a = model.chat(tok, "你好", num_beams=3, max_length=40)
    assert a == model.chat(tok, "你好", num_beams=3, max_length=40)
    assert model.chat(tok, "你好", num_beams=1, do_sample=False, max_length=40)[0] == \
        list(model.stream_chat(tok, "你好", num_beams=1, do_sample=False, max_length=40))[-1][0]
