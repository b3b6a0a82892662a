"""glmkit.score_choices: the original GLM against its hub code's build_inputs_for_multiple_choice +
GLMForMultipleChoice; the other families against their own blank / continuation conventions, recomputed through the
generation loop (KV cache, teacher-forced by a logits processor) instead of scoring's one forward."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit.core.blank import BlankInfillingView, blank_positions
from glmkit.core.generate import generate_stream
from glmkit.fill import fill
from tests.helpers.chat_models import build_tiny_chat_model, tiny_chatglm_with_tokenizer
from tests.helpers.goldens import GLM_DATA, glm_golden


def _forcing(choice: list[int], record: list[float]):
    """A logits processor that records log p(choice[t]) at step t and then forces that token."""
    def proc(_ids, scores):
        target = choice[len(record)]
        record.append(float(torch.log_softmax(scores.float(), dim=-1)[0, target]))
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced

    return proc


@pytest.mark.parametrize("fixture", ["chinese", "gpt2"])
def test_original_glm_matches_the_hub_multiple_choice(fixture):
    model, tok = glmkit.load_model(GLM_DATA / fixture), glmkit.load_tokenizer(GLM_DATA / fixture)
    for case in glm_golden()["fixtures"][fixture]["cloze"]:
        scores = glmkit.score_choices(model, tok, case["context"], case["choices"])
        assert len(scores) == len(case["choices"]) and all(isinstance(s, float) for s in scores)
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(case["scores"]), atol=3e-4, rtol=0)
        # the same numbers through blank filling's generation path (Part B one token at a time, KV cache)
        for choice, score in zip(case["choices"], scores):
            ids, record = tok.encode(choice, add_special_tokens=False), []
            fill(model, tok, case["context"], max_new_tokens=len(ids), logits_processors=[_forcing(ids, record)])
            assert abs(sum(record) - score) < 1e-3


def test_original_glm_blank_rules():
    model, tok = glmkit.load_model(GLM_DATA / "gpt2"), glmkit.load_tokenizer(GLM_DATA / "gpt2")
    # [MASK] wins over an earlier [sMASK] (the hub looks for mask_token_id only); without [MASK], the first blank
    context, choice = "[sMASK] is in [MASK].", tok.encode(" Beijing", add_special_tokens=False)
    ids = tok.encode(context)
    at = {}
    for blank in (tok.mask_token_id, tok.smask_token_id):
        view = BlankInfillingView(model, torch.tensor([blank_positions(len(ids), ids.index(blank), 1)]),
                                  torch.tensor([len(ids)]))
        record = []
        for _ in generate_stream(view, torch.tensor([ids + [tok.sop_token_id]]), max_new_tokens=len(choice),
                                 eos_token_id=[], logits_processors=[_forcing(choice, record)]):
            pass
        at[blank] = sum(record)
    score = glmkit.score_choices(model, tok, context, [" Beijing"])[0]
    assert abs(score - at[tok.mask_token_id]) < 1e-3 and abs(score - at[tok.smask_token_id]) > 1e-2
    assert glmkit.score_choices(model, tok, "It is in [gMASK]", [" Beijing"])[0] < 0
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        glmkit.score_choices(model, tok, "no blank here", [" a"])
    with pytest.raises(ValueError, match="has no tokens"):
        glmkit.score_choices(model, tok, "It is [MASK].", ["", " a"])
    with pytest.raises(TypeError):
        glmkit.score_choices(model, tok, "It is [MASK].", " a")
    assert glmkit.score_choices(model, tok, "It is [MASK].", []) == []


def test_chatglm_6b_blank_convention(tmp_path):
    model, tok, _ = tiny_chatglm_with_tokenizer(tmp_path, std=0.3, seed=1)
    context, choices = "床前明月[MASK]，疑是地上霜。", ["光", "明月光", "白日"]
    scores = glmkit.score_choices(model, tok, context, choices)
    for choice, score in zip(choices, scores):
        ids, record = tok.encode(choice, add_special_tokens=False), []
        fill(model, tok, context, max_new_tokens=len(ids), logits_processors=[_forcing(ids, record)])
        assert abs(sum(record) - score) < 1e-3


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_causal_families_score_the_continuation(tmp_path, family):
    folder = build_tiny_chat_model(tmp_path / family, family=family)
    model, tok = glmkit.load_model(folder), glmkit.load_tokenizer(folder)
    context, choices = "the cat runs [MASK] and the dog", [" fast", " slow river"]
    scores = glmkit.score_choices(model, tok, context, choices)
    assert scores == glmkit.score_choices(model, tok, "the cat runs ", choices)  # the text after the blank is unseen
    prompt = tok.encode("the cat runs ")
    for choice, score in zip(choices, scores):
        ids, record = tok.encode(choice, add_special_tokens=False), []
        for _ in generate_stream(model, torch.tensor([prompt]), max_new_tokens=len(ids), eos_token_id=[],
                                 logits_processors=[_forcing(ids, record)]):
            pass
        assert abs(sum(record) - score) < 1e-3
