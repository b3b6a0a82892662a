"""Batched scoring (glmkit.core.scoring.score_clozes) equals log-likelihoods computed by hand, one choice at a time
with the model's plain forward, for every family: causal families read prompt + choice[:-1]; ChatGLM-6B's layout
Part A + <sop> + choice[:-1] at the blank's position (its own prefix-LM mask); the original GLM the same with its
`sep` mask. Several requests of different lengths share a batch (left padding), choices share a packed row."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit.core.scoring import Cloze, cloze_from_ids, encode_cloze, score_choices_batch, score_clozes
from tests.helpers.chat_models import build_tiny_chat_model, build_tiny_glm4_model, tiny_chatglm_with_tokenizer
from tests.helpers.goldens import GLM_DATA


def _sum_rows(logits: torch.Tensor, start: int, choice: list[int]) -> tuple[float, bool]:
    logp = torch.log_softmax(logits[start:start + len(choice)].float(), dim=-1)
    picked = logp[torch.arange(len(choice)), torch.tensor(choice)]
    greedy = bool((logits[start:start + len(choice)].argmax(-1) == torch.tensor(choice)).all())
    return float(picked.sum()), greedy


@torch.inference_mode()
def hand_causal(model, prompt: list[int], choice: list[int]) -> tuple[float, bool]:
    logits = model(torch.tensor([prompt + choice[:-1]]))[0]
    return _sum_rows(logits, len(prompt) - 1, choice)


@torch.inference_mode()
def hand_blank(model, part_a: list[int], mask_pos: int, sop: int, choice: list[int]) -> tuple[float, bool]:
    n, m = len(part_a), len(choice)
    ids = torch.tensor([part_a + [sop] + choice[:-1]])
    positions = torch.tensor([[list(range(n)) + [mask_pos] * m, [0] * n + list(range(1, m + 1))]])
    if model.config.family == "glm":
        logits = model(ids, positions, torch.tensor([n]))[0]  # GLM's sep: Part A bidirectional, the rest causal
    else:
        logits = model(ids, positions)[0]  # ChatGLM-6B's own prefix-LM mask (context = before <sop>)
    return _sum_rows(logits, n, choice)


def _check(model, clozes: list[Cloze], hand, batch_size: int) -> None:
    got = score_clozes(model, clozes, batch_size=batch_size)
    for cloze, row in zip(clozes, got):
        assert len(row) == len(cloze.choices)
        for choice, score in zip(cloze.choices, row):
            lp, greedy = hand(cloze, choice)
            assert score.logprob == pytest.approx(lp, abs=2e-4)
            assert score.greedy == greedy and score.num_tokens == len(choice)
            assert sum(score.token_logprobs) == pytest.approx(score.logprob, abs=1e-5)


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_causal_families(tmp_path, family):
    folder = build_tiny_chat_model(tmp_path / family, family=family)
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    texts = ["the cat runs", "hello world , the model answer question river stone light", "a"]
    choices = [[" fast", " slow river", " dog"], [" the", " 你好 世界"], [" cat runs fast ."]]
    clozes = [encode_cloze(model, tok, t, c) for t, c in zip(texts, choices)]
    for t, cl in zip(texts, clozes):
        assert cl.context == tok.encode(t)  # [gMASK] sop + the text
    for bs in (1, 2, 8):
        _check(model, clozes, lambda cl, c: hand_causal(model, cl.context, c), bs)
    # a greedy continuation is flagged greedy
    prompt = tok.encode("the cat")
    nxt = int(model(torch.tensor([prompt]))[0, -1].argmax())
    (score,), = score_clozes(model, [Cloze(prompt, [[nxt]])])
    assert score.greedy


def test_glm4(tmp_path):
    folder = build_tiny_glm4_model(tmp_path / "glm4", max_seq_len=256)
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    clozes = [encode_cloze(model, tok, "What is the weather", [" in Paris", "?"]),
              encode_cloze(model, tok, "Hi", [" there, how are you", " all"])]
    _check(model, clozes, lambda cl, c: hand_causal(model, cl.context, c), 8)


def test_chatglm_6b_layout(tmp_path):
    model, tok, _ = tiny_chatglm_with_tokenizer(tmp_path, std=0.3, seed=3)
    first = tok.encode("床前明月", add_special_tokens=False)
    part_a = first + [tok.mask_token_id] + tok.sp_encode("，疑是地上霜。", add_dummy_prefix=False)
    cl = encode_cloze(model, tok, "床前明月[MASK]，疑是地上霜。", ["光", "明月光", "白日"])
    assert cl.context == part_a and cl.mask_position == len(first) and cl.sop_id == tok.sop_token_id
    clozes = [cl, encode_cloze(model, tok, "白日依山盡，", ["黃河入海流。", "春"]),  # no blank: [gMASK] appended
              encode_cloze(model, tok, "舉頭望明月，低頭思[MASK]", ["故鄉", "鄉", "月"])]
    assert clozes[1].context[-1] == tok.gmask_token_id
    for bs in (1, 3):
        _check(model, clozes, lambda c, ch: hand_blank(model, c.context, c.mask_position, c.sop_id, ch), bs)
    # the argmax after <sop> is flagged greedy
    with torch.inference_mode():
        ids = torch.tensor([part_a + [tok.sop_token_id]])
        pos = torch.tensor([[list(range(len(part_a))) + [len(first)], [0] * len(part_a) + [1]]])
        best = int(model(ids, pos)[0, -1].argmax())
    (score,), = score_clozes(model, [Cloze(part_a, [[best]], tok.sop_token_id, len(first))])
    assert score.greedy


@pytest.mark.parametrize("fixture", ["gpt2", "chinese"])
def test_original_glm(fixture):
    model, tok = glmkit.load_model(GLM_DATA / fixture), glmkit.load_tokenizer(GLM_DATA / fixture)
    texts = (["The capital of France is [MASK].", "It is [MASK] today, and tomorrow too"] if fixture == "gpt2" else
             ["北京是中国的[MASK]。", "天气[MASK]"])
    choices = [[" Paris", " London town"], [" sunny", " cold"]] if fixture == "gpt2" else [["首都", "城市"], ["好", "很好"]]
    clozes = [encode_cloze(model, tok, t, c) for t, c in zip(texts, choices)]
    for t, cl in zip(texts, clozes):
        ids = tok.encode(t)
        assert cl.context == ids and cl.mask_position == ids.index(tok.mask_token_id)
    _check(model, clozes, lambda c, ch: hand_blank(model, c.context, c.mask_position, c.sop_id, ch), 2)


def test_text_level_batch_equals_one_at_a_time(tmp_path):
    folder = build_tiny_chat_model(tmp_path / "c3", family="chatglm3")
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    requests = [("the cat [MASK] fast", [" runs", " dog"]), ("hello", [" world", " world ,"]), ("", [" a"])]
    batched = score_choices_batch(model, tok, requests, batch_size=2)
    for (ctx, choices), row in zip(requests, batched):
        assert [s.logprob for s in row] == pytest.approx(glmkit.score_choices(model, tok, ctx, choices), abs=1e-4)


def test_long_context_is_cut_from_the_left_after_the_prefix(tmp_path):
    folder = build_tiny_chat_model(tmp_path / "c2", family="chatglm2")
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    body = tok.encode("the cat runs fast and the dog runs slow , hello world", add_special_tokens=False)
    cl = cloze_from_ids(model, tok, body, [[body[0], body[1]], [body[2]]])
    prefix = tok.encode("")
    assert cl.context == prefix + body and cl.keep == len(prefix)
    limit = len(prefix) + 5
    got = score_clozes(model, [cl], max_length=limit)[0]
    # packed: 2 + 5 context tokens + 1 segment token > limit -> one row per choice, each cut to `limit`
    for choice, score in zip(cl.choices, got):
        keep_body = body[len(body) - (limit - len(prefix) - (len(choice) - 1)):]
        assert score.logprob == pytest.approx(hand_causal(model, prefix + keep_body, choice)[0], abs=2e-4)
    with pytest.raises(ValueError, match="longer than max_length"):
        score_clozes(model, [cloze_from_ids(model, tok, body[:2], [body * 2])], max_length=limit)
    model2, tok2 = glmkit.load_model(GLM_DATA / "gpt2"), glmkit.load_tokenizer(GLM_DATA / "gpt2")
    with pytest.raises(ValueError, match="remove the blank"):
        score_clozes(model2, [encode_cloze(model2, tok2, "[MASK] is a long sentence with words", [" x"])],
                     max_length=6)


@pytest.fixture(scope="module")
def glm130b(tmp_path_factory):
    """A tiny random GLM-130B SAT checkpoint (tests/conftest.py) with glm-tiny's ice_text.model as its icetk text
    model."""
    import shutil

    from tests.helpers.common import REPO
    from tests.helpers.goldens import glm130b_sat_state_dict, write_sat_checkpoint

    folder = write_sat_checkpoint(tmp_path_factory.mktemp("glm130b") / "sat", [glm130b_sat_state_dict()])
    shutil.copy(REPO / "glmkit" / "assets" / "glm-tiny" / "ice_text.model", folder / "ice_text.model")
    return glmkit.load_model(folder, dtype="float32").eval(), glmkit.load_tokenizer(folder)


def test_glm130b_scores_equal_its_multiple_choice_layout(glm130b):
    """GLM-130B's own build_multiple_choice_sample output (golden, from the original code) fed to the model as
    explicit positions and mask, log-probs read at its choice_target_ids, against batched score_clozes."""
    import json

    from tests.helpers.common import REPO

    model, _ = glm130b
    golden = json.loads((REPO / "tests" / "data" / "glm130b_eval" / "golden.json").read_text())
    cmd = golden["commands"]
    cases = [c for c in golden["mul"] if not c.get("unified_multitask_encoding")]
    clozes, expected = [], []
    for c in cases:
        s = c["sample"]
        blank = cmd["[gMASK]"] if c.get("use_task_mask") else cmd["[MASK]"]
        context = list(c["text"]) if blank in c["text"] else list(c["text"]) + [blank]
        clozes.append(Cloze(context, [list(x) for x in c["choices"]], cmd["sop"], context.index(blank)))
        tokens = torch.tensor([[int(t) for t in s["token"]]])
        with torch.inference_mode():
            logits = model(tokens, torch.tensor([s["position_id"]]), torch.tensor(s["attention_mask"]).bool()[None, None])
        logp = torch.log_softmax(logits[0].float(), -1)
        targets = [s["choice_target_ids"]] * len(c["choices"]) if c.get("is_single_token") else s["choice_target_ids"]
        expected.append([float(logp[torch.tensor(rows), torch.tensor(ch)].sum()) for rows, ch in zip(targets, c["choices"])])
    for bs in (1, 4):
        got = score_clozes(model, clozes, batch_size=bs)
        for row, exp in zip(got, expected):
            assert [s.logprob for s in row] == pytest.approx(exp, abs=2e-4)


def test_glm130b_text_prompts(glm130b):
    """Text-level: the blank appended as GLM-130B's evaluation appends it; generation from text [blank] sop equals
    model.generate on the tokenizer's own prompt (generate.py's framing)."""
    from glmkit.evaluation.predict import generate_texts

    model, tok = glm130b
    cl = encode_cloze(model, tok, "Tsinghua University is located in", [" Beijing", " Paris"])
    body = tok.encode("Tsinghua University is located in", add_special_tokens=False)
    assert cl.context == body + [tok.gmask_token_id] and cl.sop_id == tok.sop_token_id
    texts = ["Tsinghua University is located in", "It is [MASK] today."]
    got = generate_texts(model, tok, texts, max_new_tokens=5, batch_size=2)
    for text, out in zip(texts, got):
        ids = tok.encode(text)  # ... [gMASK] sop, or ... [MASK] eos sop
        if "[MASK]" in text:
            ids = [i for i in ids if i != tok.eos_token_id]  # evaluation's build_generation_sample adds no eos
        new = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                             eos_token_id=[tok.eop_token_id, tok.eos_token_id])[0].tolist()
        cut = next((k for k, t in enumerate(new) if t in (tok.eop_token_id, tok.eos_token_id)), len(new))
        assert out == tok.decode(new[:cut])
