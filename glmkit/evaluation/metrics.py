"""ROUGE-1/2/L and BLEU-4 exactly as ChatGLM-6B's ptuning/main.py `compute_metrics` computes them.

Per (prediction, label) pair:
- ROUGE: both strings are cut into words with jieba, joined with spaces, and scored by rouge-chinese
  `Rouge().get_scores(hyp, ref)[0][k]["f"] * 100`, rounded to 4 decimals.
- BLEU-4: nltk `sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3) * 100`
  on *characters*, rounded to 4 decimals.
Then every metric is the plain mean over pairs (`float(np.mean(...))`).

main.py crashes when a side has no words (rouge-chinese raises "Hypothesis is empty."), which an untuned model
hits easily (it may emit <eop> at once). Like THUDM's later fine-tuning demos, such a pair scores 0 for ROUGE; its
BLEU is what nltk returns (0 for an empty prediction).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from glmkit.core.extras import require_extra

METRIC_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_ZERO_ROUGE = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba prints "Building prefix dict..." at INFO on first use
    return jieba


def score_pair(pred: str, label: str) -> dict[str, float]:
    """Scores one prediction against one reference, each metric ×100 and rounded to 4 decimals as main.py does."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = " ".join(jieba.cut(pred))
    reference = " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        result = _ZERO_ROUGE
    else:
        result = Rouge().get_scores(hypothesis, reference)[0]
    scores = {k: round(result[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def compute_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 ×100 and BLEU-4 ×100 over prediction/label pairs (keys `rouge-1 … bleu-4`)."""
    if len(preds) != len(labels):
        raise ValueError(f"got {len(preds)} predictions but {len(labels)} labels; they must pair up")
    if not preds:
        raise ValueError("no predictions to score")
    require_extra("train", "jieba", "nltk", "rouge_chinese", what="ROUGE/BLEU scoring")
    per_pair = [score_pair(p, l) for p, l in zip(preds, labels)]
    return {k: float(np.mean([s[k] for s in per_pair])) for k in METRIC_KEYS}


# ------------------------------------------------------------------- GLM-130B's metrics (evaluation/metrics.py)
def normalize_answer(s: str) -> str:
    """GLM-130B's (SQuAD's) normalisation: lower case, no punctuation (string.punctuation), no articles a/an/the,
    whitespace collapsed."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-words F1 over normalised whitespace words."""
    from collections import Counter

    pred, truth = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(metric, prediction: str, ground_truths: Sequence[str]) -> float:
    return max((metric(prediction, t) for t in ground_truths), default=0.0)


def qa_metric(metric, predictions: Sequence[str], targets: Sequence[Sequence[str]]) -> float:
    """GLM-130B's qa_evaluate: 100 × mean over items of the best score against any target (0 for an item without
    targets)."""
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions but {len(targets)} target lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return 100.0 * sum(max_over_ground_truths(metric, p, t) for p, t in zip(predictions, targets)) / len(predictions)
