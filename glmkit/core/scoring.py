"""Cloze scoring: the log-likelihood of each answer to a question with a blank, for every GLM family. The building
block of multiple-choice evaluation (`glmkit.score_choices`).

Contract (what callers, e.g. an evaluation harness, may rely on):

    score_choices(model, tokenizer, context_with_mask, choices) -> list[float]

- One float per choice, in the order given: the sum over the choice's tokens of log p(token | context, the choice's
  earlier tokens), natural log, from float32 log-softmax over the whole vocabulary. Not length-normalised: divide by
  `len(tokenizer.encode(choice, add_special_tokens=False))` for a per-token score.
- Each choice is tokenized on its own, `tokenizer.encode(choice, add_special_tokens=False)`, as GLM's multiple-choice
  code and every family's fine-tuning data tokenize answers (so " Beijing" and "Beijing" differ for GPT-2 BPE).
  A choice with no tokens, or a context without the blank a family needs, is a ValueError.
- The model runs as it is (glmkit.load_model returns it in eval mode), under torch.inference_mode, without its KV
  cache; choices never see each other.

What "the blank" means per family (the blank = the first `[MASK]` / `[sMASK]` / `[gMASK]` of the text):

- The original GLM (glm-large-chinese, glm-2b, glm-10b, glm-10b-chinese): as the hub code's
  `build_inputs_for_multiple_choice` + `GLMForMultipleChoice`. Part A = `tokenizer(context)` = `[CLS] ... <|endoftext|>`;
  each choice is scored as Part B `<|startofpiece|> + choice[:-1]` at the blank's position (block positions 1, 2, ...),
  seeing Part A and itself only, all choices packed into one forward. The hub takes the first `[MASK]` and fails
  without one; glmkit takes the first `[MASK]`, else the first `[sMASK]` / `[gMASK]`.
- ChatGLM-6B (and glmkit's 2D-rotary models such as glm-tiny): the same blank convention as `glmkit fill`: the text
  with its blanks as tokens, then `<sop>`, the choice as Part B at the first blank's position; a text without a blank
  is continued as with a trailing `[gMASK]`.
- ChatGLM2/3 and GLM-4 (causal): continuation. The prompt is the tokenizer's encoding of the text before the first
  blank (the whole text when there is none; `[gMASK]<sop>` in front, as `encode` adds it) and the choice follows it;
  the text after the blank is not used, since a causal model cannot condition on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmkit.core.fill import BLANK_RE, _BlankView, _encode_piece


@torch.inference_mode()
def score_choices(model, tokenizer, context_with_mask: str, choices: Sequence[str]) -> list[float]:
    """Per-choice log-likelihoods of `choices` filling the blank of `context_with_mask` (see the module doc)."""
    if isinstance(choices, str):
        raise TypeError("choices must be a list of strings, not one string")
    choice_ids = []
    for c in choices:
        ids = tokenizer.encode(c, add_special_tokens=False)
        if not ids:
            raise ValueError(f"choice {c!r} has no tokens")
        choice_ids.append(list(ids))
    if not choice_ids:
        return []
    family = model.config.family
    if family == "glm":
        return _score_original_glm(model, tokenizer, context_with_mask, choice_ids)
    if model.config.rope == "2d":
        return _score_blank_2d(model, tokenizer, context_with_mask, choice_ids)
    return _score_continuation(model, tokenizer, context_with_mask, choice_ids)


def _choice_logprob(logits: torch.Tensor, start: int, choice: list[int]) -> float:
    """Sum of log p(choice[j]) read at rows start + j of logits [T, V]."""
    logp = torch.log_softmax(logits[start:start + len(choice)].float(), dim=-1)
    index = torch.tensor(choice, device=logp.device)
    return float(logp.gather(1, index[:, None]).sum())


def _score_original_glm(model, tokenizer, context: str, choice_ids: list[list[int]]) -> list[float]:
    if not hasattr(tokenizer, "mask_token_ids"):
        raise ValueError("the original GLM scores with its own tokenizer (glmkit.load_tokenizer of the same folder); "
                         f"got {type(tokenizer).__name__}")
    ids = tokenizer.encode(context)  # [CLS] ... <|endoftext|>
    blanks = [tokenizer.mask_token_id] + [i for i in (tokenizer.smask_token_id, tokenizer.gmask_token_id)
                                          if i is not None]
    mask_pos = next((ids.index(b) for b in blanks if b in ids), None)
    if mask_pos is None:
        raise ValueError("context_with_mask has no [MASK] (or [sMASK] / [gMASK]) blank for the choices to fill")
    n = len(ids)
    tokens, pos, block, starts = list(ids), list(range(n)), [0] * n, []
    for c in choice_ids:  # Part B per choice: <|startofpiece|> + choice[:-1], at the blank's position
        starts.append(len(tokens))
        tokens += [tokenizer.sop_token_id] + c[:-1]
        pos += [mask_pos] * len(c)
        block += list(range(1, len(c) + 1))
    T = len(tokens)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[:, :n] = True  # everything sees Part A; Part A sees nothing else
    for s, c in zip(starts, choice_ids):
        allowed[s:s + len(c), s:s + len(c)] = torch.ones(len(c), len(c), dtype=torch.bool).tril()
    device = model.ln_f.weight.device  # (the embedding may be quantized)
    logits = model(torch.tensor([tokens], device=device), torch.tensor([[pos, block]], device=device),
                   allowed[None, None].to(device))[0]
    return [_choice_logprob(logits, s, c) for s, c in zip(starts, choice_ids)]


def _score_blank_2d(model, tokenizer, context: str, choice_ids: list[list[int]]) -> list[float]:
    parts = BLANK_RE.split(context)
    if len(parts) == 1:
        parts = [context, "[gMASK]", ""]
    ids_of = {"[MASK]": tokenizer.mask_token_id, "[sMASK]": tokenizer.smask_token_id,
              "[gMASK]": tokenizer.gmask_token_id}
    ids: list[int] = []
    mask_pos = None
    for j, seg in enumerate(parts[0::2]):
        ids += _encode_piece(tokenizer, seg, first=j == 0)
        if j < len(parts) // 2:
            blank = parts[2 * j + 1]
            if ids_of[blank] is None:
                raise ValueError(f"the tokenizer has no {blank} token")
            if mask_pos is None:
                mask_pos = len(ids)
            ids.append(ids_of[blank])
    ids.append(tokenizer.sop_token_id)
    view = _BlankView(model, mask_pos)
    device = model.ln_f.weight.device  # (the embedding may be quantized)
    scores = []
    for c in choice_ids:
        input_ids = torch.tensor([ids + c[:-1]], device=device)
        logits = model(input_ids, view.default_position_ids(input_ids))[0]  # prefix-LM mask from <sop>
        scores.append(_choice_logprob(logits, len(ids) - 1, c))
    return scores


def _score_continuation(model, tokenizer, context: str, choice_ids: list[list[int]]) -> list[float]:
    prompt = list(tokenizer.encode(BLANK_RE.split(context)[0]))
    device = model.ln_f.weight.device  # (the embedding may be quantized)
    scores = []
    for c in choice_ids:
        logits = model(torch.tensor([prompt + c[:-1]], device=device))[0]
        scores.append(_choice_logprob(logits, len(prompt) - 1, c))
    return scores
