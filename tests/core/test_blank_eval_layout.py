"""GLM-130B's multiple-choice layout (glmkit.core.blank.build_multiple_choice_sample / pack_choices) against what the
original `MultiChoiceTaskDataset.build_multiple_choice_sample` built for the same worked examples
(tests/data/glm130b_eval/make_golden.py ran the original file)."""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.core.blank import build_multiple_choice_sample, pack_choices, segment_mask
from tests.helpers.common import REPO

GOLDEN = json.loads((REPO / "tests" / "data" / "glm130b_eval" / "golden.json").read_text(encoding="utf-8"))
IDS = {"mask_id": GOLDEN["commands"]["[MASK]"], "gmask_id": GOLDEN["commands"]["[gMASK]"],
       "sop_id": GOLDEN["commands"]["sop"]}


@pytest.mark.parametrize("case", GOLDEN["mul"], ids=[c["name"] for c in GOLDEN["mul"]])
def test_matches_glm130b_build_multiple_choice_sample(case):
    kwargs = {k: case[k] for k in ("is_single_token", "unified_multitask_encoding", "use_task_mask") if k in case}
    ours = build_multiple_choice_sample(case["text"], case["choices"], **IDS, **kwargs)
    theirs = case["sample"]
    assert ours["token"] == [int(t) for t in theirs["token"]]  # (the original's arrays turn float past an empty slice)
    assert ours["position_id"] == theirs["position_id"]
    assert ours["attention_mask"] == theirs["attention_mask"]
    assert ours["choice_target_ids"] == theirs["choice_target_ids"]
    assert ours["choices"] == theirs["choices"]


def test_worked_example_by_hand():
    """text [11 12], choices [21 22] and [31]: [MASK] appended at 2, each choice <sop> + choice[:-1] at the mask."""
    s = build_multiple_choice_sample([11, 12], [[21, 22], [31]], **IDS)
    M, S = IDS["mask_id"], IDS["sop_id"]
    assert s["token"] == [11, 12, M, S, 21, S]
    assert s["position_id"] == [0, 1, 2, 2, 2, 2]
    assert s["choice_target_ids"] == [[3, 4], [5]]
    assert s["attention_mask"] == [[1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 1, 1, 1, 0, 0],
                                   [1, 1, 1, 1, 1, 0],
                                   [1, 1, 1, 0, 0, 1]]


def test_causal_packing_reads_the_first_token_at_the_prompt_end():
    pack = pack_choices([1, 2, 3], [[7, 8, 9], [5]], None)
    assert pack.tokens == [1, 2, 3, 7, 8]  # choice[:-1] segments only
    assert pack.segment == [0, 0, 0, 1, 1]
    assert pack.reads == [[2, 3, 4], [2]]
    mask = segment_mask(torch.tensor(pack.segment), bidirectional_context=False)
    assert mask[1].tolist() == [True, True, False, False, False]  # the prompt stays causal
    assert mask[4].tolist() == [True, True, True, True, True]
    single = pack_choices([1, 2], [[7], [5]], 99)
    assert single.tokens == [1, 2, 99] and single.reads == [[2], [2]]  # one <sop> serves one-token choices


def test_padding_is_never_seen_and_bad_input_is_refused():
    mask = segment_mask(torch.tensor([-1, -1, 0, 0, 1]), bidirectional_context=True)
    assert not mask[:, :2].any()
    with pytest.raises(ValueError, match="at least one token"):
        pack_choices([1], [[]], 5)
    with pytest.raises(ValueError, match="no tokens"):
        pack_choices([], [[1]], 5)
    with pytest.raises(ValueError, match="one-token"):
        pack_choices([1], [[1, 2]], 5, single_token=True)
