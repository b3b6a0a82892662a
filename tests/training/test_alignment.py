"""Alignment's parts: preference data per family, each loss against values computed by hand from TRL's definitions,
reference log-probs from the policy's own weights equal to a frozen copy's, reward-model folders, the poem-form
reward."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import glmkit
from glmkit.adapters.lora import apply_lora, load_lora_adapter, save_lora_adapter
from glmkit.adapters.ptuning import attach_prefix, save_ptuning_checkpoint
from glmkit.training.alignment import (
    Reference,
    disable_dropout,
    group_advantages,
    grpo_loss,
    preference_loss,
    reward_loss,
    rpo_nll,
    sequence_logps,
    token_logps,
)
from glmkit.training.data.finetune import IGNORE_INDEX, Lengths, collate_train
from glmkit.training.data.preference import (
    PreferenceColumns,
    answer_example,
    build_pairs,
    build_prompts,
    completion_example,
    prompt_example,
)
from glmkit.training.reward import RewardModel, load_reward_model, save_reward_model, score
from glmkit.training.rewards import form_score, form_share, load_reward_function, poem_form
from tests.helpers.chat_models import build_tiny_chat_model, build_tiny_glm4_model
from tests.helpers.goldens import GLM_DATA

PROMPT = "作者#王維*體裁#五言絕句*題目#鹿柴"
POEM = "空山不見人，但聞人語響。返景入深林，復照青苔上。"
OTHER = "白日依山盡，黃河入海流。"
LENGTHS = Lengths(64, 64)


@pytest.fixture(scope="module")
def tiny():
    return glmkit.load_model("glm-tiny"), glmkit.load_tokenizer("glm-tiny")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """A tokenizer of every family glmkit fine-tunes: ChatGLM-6B (glm-tiny), ChatGLM2/3, GLM-4, the original GLM."""
    root = tmp_path_factory.mktemp("families")
    toks = {"chatglm": glmkit.load_tokenizer("glm-tiny"), "glm": glmkit.load_tokenizer(GLM_DATA / "chinese")}
    for fam in ("chatglm2", "chatglm3"):
        toks[fam] = glmkit.load_tokenizer(build_tiny_chat_model(root / fam, fam))
    toks["glm4"] = glmkit.load_tokenizer(build_tiny_glm4_model(root / "glm4"))
    return toks


# ------------------------------------------------------------------------------------------------------ data
def test_chatglm_pair_layout_token_by_token(tiny):
    _, tok = tiny
    pair = build_pairs(tok, [{"prompt": PROMPT, "chosen": POEM, "rejected": OTHER}], PreferenceColumns(), LENGTHS)[0]
    p = tok.encode(PROMPT, add_special_tokens=False) + [tok.gmask_token_id, tok.sop_token_id]
    for ex, answer in ((pair.chosen, POEM), (pair.rejected, OTHER)):
        b = tok.encode(answer, add_special_tokens=False) + [tok.eop_token_id]
        assert ex["input_ids"] == p + b
        assert ex["labels"] == [IGNORE_INDEX] * len(p) + b  # the answer and <eop> only, not <sop>


def test_message_list_prompts_render_with_the_chat_template(tiny):
    _, tok = tiny
    text = build_pairs(tok, [{"prompt": PROMPT, "chosen": POEM, "rejected": OTHER}], PreferenceColumns(), LENGTHS)[0]
    msgs = build_pairs(tok, [{"prompt": [{"role": "user", "content": PROMPT}],
                              "chosen": [{"role": "assistant", "content": POEM}],
                              "rejected": [{"role": "assistant", "content": OTHER}]}], PreferenceColumns(), LENGTHS)[0]
    assert msgs.chosen == text.chosen and msgs.rejected == text.rejected  # ChatGLM-6B's first turn: the bare query
    two_turns = [{"role": "user", "content": "春"}, {"role": "assistant", "content": "花"},
                 {"role": "user", "content": PROMPT}]
    ex = answer_example(tok, two_turns, POEM, LENGTHS)
    expected = tok.encode("[Round 0]\n问：春\n答：花\n[Round 1]\n问：" + PROMPT + "\n答：", add_special_tokens=False)
    assert ex["input_ids"][:len(expected)] == expected


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4", "glm"])
def test_every_family_masks_all_but_the_answer_and_agrees_with_grpo_rows(families, family):
    tok = families[family]
    answer = "春花秋月"
    prompt = "春花" if family != "glm" else "清华大学位于[MASK]。"
    ex = answer_example(tok, prompt, answer, LENGTHS)
    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    b = tok.encode(answer, add_special_tokens=False)
    assert learned[:-1] == b and len(learned) == len(b) + 1  # the answer, then its end token
    assert learned[-1] in (tok.eos_token_id, getattr(tok, "eop_token_id", None))
    start = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
    p = prompt_example(tok, prompt, LENGTHS)
    assert ex["input_ids"][:start] == p["input_ids"]  # the prompt SFT and generation see
    # a sampled completion after its generation prompt is the same training row
    row = completion_example(tok, p, learned)
    assert row["input_ids"] == ex["input_ids"] and row["labels"] == ex["labels"]
    if family == "glm":
        assert row["position_ids"] == ex["position_ids"] and row["context"] == ex["context"]


@pytest.mark.parametrize("row,message", [
    ({"prompt": PROMPT, "chosen": POEM}, "row 2 has no column(s) ['rejected']"),
    ({"prompt": PROMPT, "chosen": "  ", "rejected": OTHER}, "row 2: the 'chosen' answer is empty"),
    ({"prompt": PROMPT, "chosen": POEM, "rejected": POEM}, "row 2: chosen and rejected are the same"),
    ({"prompt": "", "chosen": POEM, "rejected": OTHER}, "row 2: the prompt ('prompt') is empty"),
    ({"prompt": PROMPT * 20, "chosen": POEM, "rejected": OTHER}, "row 2: the prompt is"),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "x"}], "rejected": OTHER}, "must end with an assistant"),
])
def test_bad_rows_name_the_row(tiny, row, message):
    _, tok = tiny
    good = {"prompt": PROMPT, "chosen": POEM, "rejected": OTHER}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        build_pairs(tok, [good, row], PreferenceColumns(), LENGTHS, source="pairs.json")


def test_renamed_columns_and_prompt_only_rows(tiny):
    _, tok = tiny
    cols = PreferenceColumns("q", "good", "bad")
    pairs = build_pairs(tok, [{"q": PROMPT, "good": POEM, "bad": OTHER}], cols, LENGTHS)
    assert len(pairs) == 1
    prompts = build_prompts(tok, [{"q": PROMPT}], cols, LENGTHS)
    assert prompts[0]["source"] == PROMPT and prompts[0]["input_ids"][-1] == tok.sop_token_id
    with pytest.raises(ValueError, match="--prompt_column"):
        build_prompts(tok, [{"prompt": PROMPT}], cols, LENGTHS)


def test_original_glm_rejects_message_prompts(families):
    with pytest.raises(ValueError, match="no chat template"):
        answer_example(families["glm"], [{"role": "user", "content": "x"}], "y", LENGTHS)


# ------------------------------------------------------------------------------------------------------ losses
def _t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_dpo_sigmoid_ipo_simpo_by_hand():
    one = _t(1.0)
    # sigmoid: Δ = (-1 - -2) - (-3 - -2) = 2, β = 0.5 -> -log σ(1)
    loss, rc, rr = preference_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), one, one, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((0.5, -0.5))
    # cDPO label smoothing 0.1: 0.9 · -log σ(1) + 0.1 · -log σ(-1)
    loss, _, _ = preference_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), one, one, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)), abs=1e-6)
    # ipo: per-token averages: chosen ratio 1 over 2 tokens, rejected -1 over 4 -> Δ' = 0.75; (0.75 - 1/(2·0.5))²
    loss, _, _ = preference_loss(_t(-1.0), _t(-3.0), _t(-2.0), _t(-2.0), _t(2), _t(4), loss_type="ipo", beta=0.5)
    assert loss.item() == pytest.approx(0.0625, abs=1e-6)
    # simpo: averages -1 and -2, β = 2, γ = 0.5 -> -log σ(2 · (1 - 0.25)); no reference needed
    loss, rc, rr = preference_loss(_t(-2.0), _t(-8.0), None, None, _t(2), _t(4), loss_type="simpo", beta=2.0,
                                   simpo_gamma=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert (rc.item(), rr.item()) == pytest.approx((-2.0, -4.0))
    with pytest.raises(ValueError, match="--pref_loss"):
        preference_loss(one, one, one, one, one, one, loss_type="kto")


def test_rpo_nll_by_hand():
    # chosen answers of 2 and 4 tokens with summed log-probs -2 and -8: NLL per token = 10 / 6
    assert rpo_nll(_t(-2.0, -8.0), _t(2, 4)).item() == pytest.approx(10 / 6)


def test_reward_loss_by_hand():
    loss = reward_loss(_t(2.0, 0.0), _t(0.0, 0.0))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert reward_loss(_t(2.0), _t(0.0), margin=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)


def test_group_advantages_by_hand():
    adv = group_advantages(_t(1, 0, 0, 0, 1, 1, 1, 1), 4)
    # group 1: mean 0.25, Bessel std sqrt((0.75² + 3 · 0.25²) / 3) = 0.5; group 2: all equal -> 0
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert group_advantages(_t(1, 0, 0, 0), 4, "none").tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(_t(1.0), 1)


def test_grpo_loss_aggregations_and_kl_by_hand():
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    ref = logps.detach() + math.log(2)  # k3 = e^{log 2} - log 2 - 1 on every token
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = _t(1.0, -1.0)
    k3 = 2 - math.log(2) - 1
    row1, row2 = -1 + 0.1 * k3, 1 + 0.1 * k3  # -A + β·KL per token (ratio 1)
    expect = {"dapo": (2 * row1 + row2) / 3, "bnpo": (2 * row1 + row2) / 3, "grpo": (row1 + row2) / 2,
              "dr_grpo": (2 * row1 + row2) / 6}
    for loss_type, value in expect.items():
        loss, metrics = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.1, loss_type=loss_type)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
        assert metrics["kl"] == pytest.approx(k3, abs=1e-6) and metrics["clip_ratio"] == 0.0
    loss, _ = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.1, loss_type="dapo", num_items=6)
    assert loss.item() == pytest.approx((2 * row1 + row2) / 6, abs=1e-6)  # the whole step's tokens


def test_grpo_clipping_stops_the_gradient_on_the_clipped_side():
    old = torch.zeros(1, 2)
    logps = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, metrics = grpo_loss(logps, old, None, _t(1.0), torch.ones(1, 2), beta=0.0, loss_type="bnpo")
    assert loss.item() == pytest.approx(-(1.2 + 1.1) / 2, abs=1e-6)  # ratio 1.5 clipped to 1 + ε = 1.2
    assert metrics["clip_ratio"] == 0.5
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == pytest.approx(-1.1 / 2)


def test_sequence_logps_sum_the_answer_tokens_only(tiny):
    model, tok = tiny
    pairs = build_pairs(tok, [{"prompt": PROMPT, "chosen": POEM, "rejected": OTHER}], PreferenceColumns(), LENGTHS)
    batch = collate_train([pairs[0].chosen, pairs[0].rejected], tok.pad_token_id)
    with torch.no_grad():
        total, count = sequence_logps(model, batch)
        full, _ = token_logps(model, batch["input_ids"], batch["labels"], select_positions=False)
        logits = model(batch["input_ids"]).float().log_softmax(-1)
    for r in range(2):
        labels = batch["labels"][r]
        want = sum(logits[r, t - 1, labels[t]].item() for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX)
        assert total[r].item() == pytest.approx(want, abs=1e-4)
        assert full[r].sum().item() == pytest.approx(want, abs=1e-4)
        assert count[r].item() == int((labels != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------------------ reference
def _logps(model, batch):
    with torch.no_grad():
        return sequence_logps(model, batch)[0]


@pytest.fixture(scope="module")
def pair_batch(tiny):
    _, tok = tiny
    pairs = build_pairs(tok, [{"prompt": PROMPT, "chosen": POEM, "rejected": OTHER}], PreferenceColumns(), LENGTHS)
    return collate_train([pairs[0].chosen, pairs[0].rejected], tok.pad_token_id)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_reference_of_a_new_adapter_is_the_base(pair_batch, method):
    base = glmkit.load_model("glm-tiny")
    policy = copy.deepcopy(base)
    apply_lora(policy, 4, 8, 0.1) if method == "lora" else attach_prefix(policy, 4)
    if method == "ptuning":
        for n, p in policy.named_parameters():
            p.requires_grad_(n.startswith("prefix_encoder."))
    disable_dropout(policy)
    ref = Reference(policy, method, adapter_loaded=False)
    _perturb(policy)  # "training" moved the adapter
    trained = _logps(policy, pair_batch)
    with ref() as m:
        assert torch.allclose(_logps(m, pair_batch), _logps(base, pair_batch), atol=1e-5)
    assert not torch.allclose(trained, _logps(base, pair_batch), atol=1e-4)
    assert torch.equal(_logps(policy, pair_batch), trained)  # switched back on
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n or "prefix_encoder" in n)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_reference_of_a_loaded_adapter_is_the_start(pair_batch, tmp_path, method):
    start = glmkit.load_model("glm-tiny")
    if method == "lora":
        apply_lora(start, 4, 8, 0.0)
        _perturb(start)
        save_lora_adapter(start, tmp_path, base_model_name_or_path="glm-tiny")
    else:
        attach_prefix(start, 4)
        save_ptuning_checkpoint(start, tmp_path)
    frozen = glmkit.load_model("glm-tiny", adapter=tmp_path)  # the starting policy, a separate copy
    policy = glmkit.load_model("glm-tiny")
    if method == "lora":
        load_lora_adapter(policy, tmp_path, trainable=True)
    else:
        glmkit.loading.loader.load_adapter(policy, tmp_path)
        for n, p in policy.named_parameters():
            p.requires_grad_(n.startswith("prefix_encoder."))
    disable_dropout(policy)
    disable_dropout(frozen)
    ref = Reference(policy, method, adapter_loaded=True)
    assert torch.allclose(_logps(policy, pair_batch), _logps(frozen, pair_batch), atol=1e-5)
    _perturb(policy)
    with ref() as m:
        assert torch.allclose(_logps(m, pair_batch), _logps(frozen, pair_batch), atol=1e-5)
    assert not torch.allclose(_logps(policy, pair_batch), _logps(frozen, pair_batch), atol=1e-4)


def test_reference_of_full_finetuning_is_a_frozen_copy(pair_batch):
    policy = glmkit.load_model("glm-tiny")
    before = _logps(policy, pair_batch)
    ref = Reference(policy, "full", adapter_loaded=False)
    _perturb(policy)
    with ref() as m:
        assert m is not policy and torch.equal(_logps(m, pair_batch), before)


# ------------------------------------------------------------------------------------------------------ reward model
def test_reward_model_folder_loads_back_and_scores(tmp_path):
    body = glmkit.load_model("glm-tiny")
    tok = glmkit.load_tokenizer("glm-tiny")
    apply_lora(body, 4, 8, 0.0)
    _perturb(body)
    rm = RewardModel(body)
    before = score(rm, tok, [PROMPT, PROMPT], [POEM, OTHER])
    save_reward_model(rm, tmp_path / "rm", "lora", "glm-tiny")
    loaded, tok2 = load_reward_model(tmp_path / "rm")
    assert score(loaded, tok2, [PROMPT, PROMPT], [POEM, OTHER]) == pytest.approx(before, abs=1e-5)
    assert before[0] != pytest.approx(before[1])
    assert json.loads((tmp_path / "rm" / "reward_config.json").read_text())["method"] == "lora"
    with pytest.raises(FileNotFoundError, match="reward-model folder"):
        load_reward_model(tmp_path)


# ------------------------------------------------------------------------------------------------------ poem form
def test_poem_form_reward():
    assert form_score(PROMPT, POEM) == 1.0
    assert form_score(PROMPT.replace("五言", "七言"), POEM) == pytest.approx(0.0)  # no 7-character half-line
    assert form_score(PROMPT, OTHER) == pytest.approx(0.5 * 1.0 * 2 / 4)  # right length, half the half-lines
    assert form_score(PROMPT, POEM.rstrip("。")) < 1.0  # must end with 。
    assert form_score("no form here", POEM) == 0.0
    lvshi = POEM + POEM
    assert form_score(PROMPT.replace("絕句", "律詩"), lvshi) == 1.0
    assert poem_form([PROMPT, PROMPT], [POEM, ""]) == [1.0, 0.0]
    assert form_share([PROMPT, PROMPT], [POEM, OTHER]) == 0.5


def test_reward_function_from_a_file(tmp_path):
    (tmp_path / "r.py").write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    fn = load_reward_function(f"{tmp_path / 'r.py'}:length")
    assert fn(["a"], ["abc"]) == [3]
    assert load_reward_function("poem_form") is poem_form
    with pytest.raises(ValueError, match="defines no function"):
        load_reward_function(f"{tmp_path / 'r.py'}:nope")
    with pytest.raises(FileNotFoundError):
        load_reward_function(f"{tmp_path / 'x.py'}:length")
    with pytest.raises(ValueError, match="FILE.py:NAME"):
        load_reward_function("nonsense")
