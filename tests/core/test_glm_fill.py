"""Blank filling with the original GLM, against the hub code's build_inputs_for_generation + generate (greedy; the
golden checkpoints' <|endofpiece|> row is set so that some fills stop early and others run to the limit)."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit.core.blank import BlankInfillingView, blank_positions, blank_rows, sep_mask
from glmkit.core.generate import generate
from glmkit.fill import fill
from tests.helpers.goldens import GLM_DATA, glm_golden

FIXTURES = ("chinese", "gpt2")
GEN_LEN = 6  # make_golden.GEN_LEN


@pytest.fixture(scope="module")
def loaded():
    return {n: (glmkit.load_model(GLM_DATA / n), glmkit.load_tokenizer(GLM_DATA / n)) for n in FIXTURES}


@pytest.mark.parametrize("fixture", FIXTURES)
def test_first_blank_as_the_hub_fills_it(loaded, fixture):
    model, tok = loaded[fixture]
    rows = glm_golden()["fixtures"][fixture]["fill"]
    stops = [len(r["answer_ids"]) for r in rows]
    assert any(0 < n < GEN_LEN for n in stops) and GEN_LEN in stops, "goldens must show stopped and unstopped fills"
    for row in rows:
        assert tok.encode(row["text"]) + [tok.sop_token_id] == row["input_ids"]
        result = fill(model, tok, row["text"], max_new_tokens=GEN_LEN, gmask_max_new_tokens=GEN_LEN)
        assert result.answers[0] == row["answer"]
        # token level: the hub's new tokens up to and including <|endofpiece|>
        ids = torch.tensor([row["input_ids"]])
        n = len(tok.encode(row["text"]))
        mask_pos = min(i for i, t in enumerate(row["input_ids"]) if t in tok.mask_token_ids)
        view = BlankInfillingView(model, torch.tensor([blank_positions(n, mask_pos, 1)]), torch.tensor([n]))
        new = generate(view, ids, max_new_tokens=GEN_LEN, eos_token_id=tok.eop_token_id).tolist()[0]
        assert new[: len(row["new_tokens"])] == row["new_tokens"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_a_left_padded_batch_fills_each_row_as_alone(loaded, fixture):
    """The hub pads its batch on the right, glmkit on the left (core.blank.blank_rows): same answers per row."""
    model, tok = loaded[fixture]
    golden = glm_golden()["fixtures"][fixture]
    rows = []
    for r in golden["fill"][:2]:
        n = len(r["input_ids"]) - 1
        mask_pos = min(i for i, t in enumerate(r["input_ids"]) if t in tok.mask_token_ids)
        rows.append((r["input_ids"], blank_positions(n, mask_pos, 1), n))
    batch = blank_rows(rows, tok.pad_token_id)
    view = BlankInfillingView(model, batch["position_ids"], batch["context_end"], batch["pad"])
    new = generate(view, batch["input_ids"], batch["attention_mask"], max_new_tokens=GEN_LEN,
                   eos_token_id=tok.eop_token_id, pad_token_id=tok.eop_token_id).tolist()
    for got, want in zip(new, golden["fill_batch"]):
        assert got[: len(want)] == want


def test_later_blanks_see_the_earlier_answers(loaded):
    """Blank k's Part B follows the earlier blanks' (THUDM/GLM generate_samples.py): the second answer is the greedy
    continuation of one layout holding Part A, the first blank's <|startofpiece|> + answer, then the second's."""
    model, tok = loaded["gpt2"]
    text = "Machine [MASK] models learn [MASK] from data."
    golden = glm_golden()["fixtures"]["gpt2"]["fill"][5]
    result = fill(model, tok, text, max_new_tokens=GEN_LEN)
    assert len(result.answers) == 2 and result.answers[0] == golden["answer"]
    ids = tok.encode(text)
    first, second = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
    a1, n = golden["answer_ids"], len(ids)
    seq = ids + [tok.sop_token_id] + a1 + [tok.sop_token_id]
    pos = [list(range(n)) + [first] * (len(a1) + 1) + [second], [0] * n + list(range(1, len(a1) + 2)) + [1]]
    answer = []
    with torch.no_grad():
        for _ in range(GEN_LEN):  # full recompute, no cache
            logits = model(torch.tensor([seq]), torch.tensor([pos]), sep_mask(torch.tensor([n]), len(seq)))
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eop_token_id:
                break
            answer.append(nxt)
            seq.append(nxt)
            pos = [pos[0] + [second], pos[1] + [pos[1][-1] + 1]]
    assert result.answers[1] == tok.decode(answer)
    assert result.text == "Machine " + result.answers[0].lstrip() + " models learn " + result.answers[1].lstrip() \
        + " from data."


def test_without_blank_the_text_is_continued_and_cache_changes_nothing(loaded):
    model, tok = loaded["chinese"]
    plain = fill(model, tok, "白日依山尽，", gmask_max_new_tokens=GEN_LEN)
    assert plain.answers == fill(model, tok, "白日依山尽，[gMASK]", gmask_max_new_tokens=GEN_LEN).answers
    assert plain.answers == fill(model, tok, "白日依山尽，", gmask_max_new_tokens=GEN_LEN, use_cache=False).answers
    sampled = [fill(model, tok, "清华大学位于[MASK]。", do_sample=True, top_k=20, seed=3).answers for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_fill_command_on_a_glm_checkpoint(capsys):
    from glmkit.commands.fill import cli_main

    row = glm_golden()["fixtures"]["chinese"]["fill"][0]
    assert cli_main([row["text"], "--model", str(GLM_DATA / "chinese"), "--max-new-tokens", str(GEN_LEN),
                     "--show-blanks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [row["text"].replace("[MASK]", row["answer"]), f"[1] {row['answer']}"]


def test_max_new_tokens_caps_a_gmask_blank_of_the_original_glm(loaded):
    """The hub's generate(max_length=len(ids) + N) writes at most N tokens for [gMASK] too."""
    model, tok = loaded["chinese"]
    n = len(tok.encode("白日依山尽，[gMASK]"))
    capped = fill(model, tok, "白日依山尽，", max_new_tokens=2).answers
    longer = fill(model, tok, "白日依山尽，", gmask_max_new_tokens=GEN_LEN).answers
    ids = torch.tensor([tok.encode("白日依山尽，[gMASK]") + [tok.sop_token_id]])
    view = BlankInfillingView(model, torch.tensor([blank_positions(n, n - 2, 1)]), torch.tensor([n]))
    new = [t for t in generate(view, ids, max_new_tokens=2, eos_token_id=tok.eop_token_id).tolist()[0]
           if t != tok.eop_token_id]
    assert capped == [tok.decode(new)] and len(new) <= 2
    assert longer[0].startswith(capped[0])
