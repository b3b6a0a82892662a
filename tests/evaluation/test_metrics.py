"""glmkit.evaluation.metrics against hand-computed ROUGE (jieba words) and BLEU-4 (characters, smoothing method 3)."""

from __future__ import annotations

import math

import pytest

from glmkit.evaluation.metrics import compute_metrics, score_pair


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def test_identical_strings_score_100():
    assert score_pair("床前明月光", "床前明月光") == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                                   "bleu-4": 100.0}


def test_hand_computed_pair():
    # jieba: "明月光照床前" -> 明月 / 光照 / 床前 ; "床前明月光" -> 床前 / 明月光
    pred, label = "明月光照床前", "床前明月光"
    # ROUGE-1: one shared word (床前): P = 1/3, R = 1/2; ROUGE-2: no shared bigram; ROUGE-L: LCS = 1 word.
    expected_rouge1 = round(f1(1 / 3, 1 / 2) * 100, 4)  # 40.0
    # BLEU-4 on characters. pred 6 chars, label 5 chars (no brevity penalty since 6 > 5).
    # 1-grams: 明 月 光 照 床 前 -> 5 of 6 in the label (照 is not)
    # 2-grams: 明月 月光 光照 照床 床前 -> 3 of 5 (明月, 月光, 床前)
    # 3-grams: 明月光 月光照 光照床 照床前 -> 1 of 4
    # 4-grams: none of 3 match -> method3 replaces 0/3 by 1/(2·3)
    p = [5 / 6, 3 / 5, 1 / 4, 1 / (2 * 3)]
    expected_bleu = round(math.exp(sum(0.25 * math.log(x) for x in p)) * 100, 4)
    got = score_pair(pred, label)
    assert got == {"rouge-1": expected_rouge1, "rouge-2": 0.0, "rouge-l": expected_rouge1, "bleu-4": expected_bleu}
    assert expected_bleu == pytest.approx(37.9918, abs=1e-4)


def test_short_prediction_gets_brevity_penalty():
    # pred 明月 (2 chars) vs 床前明月光 (5): p1 = 2/2, p2 = 1/1, p3 and p4 have no n-grams (denominator 1):
    # method3 gives 1/2 and 1/4; brevity penalty exp(1 - 5/2).
    expected = math.exp(1 - 5 / 2) * (1 * 1 * 0.5 * 0.25) ** 0.25 * 100
    got = score_pair("明月", "床前明月光")
    assert got["bleu-4"] == round(expected, 4)
    # jieba keeps 明月 and splits the label into 床前 / 明月光: no shared word
    assert got["rouge-1"] == got["rouge-l"] == 0.0


def test_mean_over_pairs_as_main_py():
    preds, labels = ["床前明月光", "明月光照床前"], ["床前明月光", "床前明月光"]
    one, two = score_pair(preds[0], labels[0]), score_pair(preds[1], labels[1])
    got = compute_metrics(preds, labels)
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert got[k] == pytest.approx((one[k] + two[k]) / 2, abs=1e-12)
    assert got["rouge-1"] == pytest.approx((100 + 40) / 2)


def test_empty_prediction_scores_zero_instead_of_crashing():
    got = score_pair("", "床前明月光")
    assert got == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert compute_metrics(["", "床前明月光"], ["床前明月光", "床前明月光"])["rouge-l"] == 50.0


def test_bad_input():
    with pytest.raises(ValueError, match="pair up"):
        compute_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics([], [])
