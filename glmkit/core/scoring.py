"""Cloze scoring: the log-likelihood of each answer to a question with a blank, for every GLM family. The building
block of evaluation (`glmkit.score_choices`; glmkit.evaluation batches it through `score_clozes`).

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

Batching (`score_clozes`): a request is a `Cloze` (token ids: the context, the choices, the blank's index and `<sop>`
for the blank-infilling families). Its choices are packed into one row as GLM-130B's `build_multiple_choice_sample`
packs them (glmkit.core.blank.pack_choices: the context once, then one segment per choice that sees the context and
itself; one-token choices share one row read), rows are left-padded into batches and each batch is one forward.
Causal families pack the same way (a segment is choice[:-1] at the positions that follow the prompt), so a prompt is
computed once for all its choices. The numbers equal those of scoring each choice alone, up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glmkit.core.blank import ChoicePack, pack_choices, segment_mask
from glmkit.core.fill import BLANK_RE, _encode_piece

# Logits of one batch are [B, T, vocab] float32; batches are cut so that this stays under the budget.
DEFAULT_LOGITS_BUDGET = 1 << 30


@dataclass
class Cloze:
    """One scoring request in token ids. sop_id None: a causal continuation (the choices follow `context`);
    otherwise blank infilling (the choices are Part B after `<sop>`, at `mask_position`). The first `keep` context
    tokens (the family's special prefix) survive truncation of a context that is too long."""

    context: list[int]
    choices: list[list[int]]
    sop_id: int | None = None
    mask_position: int | None = None
    keep: int = 0


@dataclass
class ChoiceScore:
    logprob: float  # sum of the choice's token log-probabilities (nats)
    greedy: bool  # every token of the choice is the argmax of its row (lm-eval's is_greedy)
    num_tokens: int
    token_logprobs: list[float] = field(default_factory=list, repr=False)


def is_blank_infilling(model) -> bool:
    """The original GLM and the prefix-LM (ChatGLM-6B layout) models fill blanks; the others are causal."""
    return model.config.family == "glm" or model.config.attention == "prefix_lm"


def has_block_positions(model) -> bool:
    """2-D positions (position, block position): the original GLM's tables and ChatGLM-6B's 2D rotary."""
    return model.config.position_embedding == "learned_2d" or model.config.rope == "2d"


def encode_choice_ids(tokenizer, choices: Sequence[str]) -> list[list[int]]:
    if isinstance(choices, str):
        raise TypeError("choices must be a list of strings, not one string")
    out = []
    for c in choices:
        ids = tokenizer.encode(c, add_special_tokens=False)
        if not ids:
            raise ValueError(f"choice {c!r} has no tokens")
        out.append(list(ids))
    return out


def encode_cloze(model, tokenizer, context_with_mask: str, choices: Sequence[str]) -> Cloze:
    """The Cloze `score_choices` scores for this text and these choices (the family conventions of the module doc)."""
    choice_ids = encode_choice_ids(tokenizer, choices)
    if model.config.family == "glm":
        return _encode_original_glm(tokenizer, context_with_mask, choice_ids)
    if is_blank_infilling(model):
        return _encode_blank(tokenizer, context_with_mask, choice_ids)
    prompt = list(tokenizer.encode(BLANK_RE.split(context_with_mask)[0]))
    return Cloze(prompt, choice_ids, keep=len(tokenizer.encode("")))


def cloze_from_ids(model, tokenizer, context_ids: Sequence[int], choices: Sequence[Sequence[int]],
                   blank: str = "[gMASK]") -> Cloze:
    """A Cloze from token ids (a text already tokenized with add_special_tokens=False): blank-infilling families get
    `blank` after the context ([CLS] ctx blank <|endoftext|> for the original GLM, ctx blank for ChatGLM-6B), causal
    ones the tokenizer's prefix before it. GLM-130B's language-model windows are built this way."""
    choices = [list(c) for c in choices]
    ctx = list(context_ids)
    if is_blank_infilling(model):
        blank_id = _blank_id(tokenizer, blank)
        if model.config.family == "glm":
            return Cloze([tokenizer.cls_token_id, *ctx, blank_id, tokenizer.eos_token_id], choices,
                         tokenizer.sop_token_id, len(ctx) + 1, keep=1)
        return Cloze([*ctx, blank_id], choices, tokenizer.sop_token_id, len(ctx))
    prefix = list(tokenizer.encode(""))
    return Cloze(prefix + ctx, choices, keep=len(prefix))


def _blank_id(tokenizer, blank: str) -> int:
    ids = {"[MASK]": tokenizer.mask_token_id, "[sMASK]": getattr(tokenizer, "smask_token_id", None),
           "[gMASK]": tokenizer.gmask_token_id}
    if blank not in ids:
        raise ValueError(f"blank must be one of {sorted(ids)}, got {blank!r}")
    if ids[blank] is None:
        raise ValueError(f"the tokenizer has no {blank} token")
    return ids[blank]


def _encode_original_glm(tokenizer, context: str, choice_ids: list[list[int]]) -> Cloze:
    if not hasattr(tokenizer, "mask_token_ids"):
        raise ValueError("the original GLM scores with its own tokenizer (glmkit.load_tokenizer of the same folder); "
                         f"got {type(tokenizer).__name__}")
    ids = tokenizer.encode(context)  # [CLS] ... <|endoftext|>
    blanks = [tokenizer.mask_token_id] + [i for i in (tokenizer.smask_token_id, tokenizer.gmask_token_id)
                                          if i is not None]
    mask_pos = next((ids.index(b) for b in blanks if b in ids), None)
    if mask_pos is None:
        raise ValueError("context_with_mask has no [MASK] (or [sMASK] / [gMASK]) blank for the choices to fill")
    return Cloze(list(ids), choice_ids, tokenizer.sop_token_id, mask_pos, keep=1)


def _encode_blank(tokenizer, context: str, choice_ids: list[list[int]]) -> Cloze:
    parts = BLANK_RE.split(context)
    if len(parts) == 1:
        parts = [context, "[gMASK]", ""]
    ids: list[int] = []
    mask_pos = None
    for j, seg in enumerate(parts[0::2]):
        ids += _encode_piece(tokenizer, seg, first=j == 0)
        if j < len(parts) // 2:
            blank_id = _blank_id(tokenizer, parts[2 * j + 1])
            if mask_pos is None:
                mask_pos = len(ids)
            ids.append(blank_id)
    return Cloze(ids, choice_ids, tokenizer.sop_token_id, mask_pos)


# ------------------------------------------------------------------------------------------------ batching
@dataclass
class _Row:
    request: int
    choices: list[int]  # indices into the request's choices
    pack: ChoicePack
    positions: list[int] | list[list[int]]  # [T] or [2, T]


def _rows_for(model, index: int, cloze: Cloze, max_length: int) -> list[_Row]:
    if not cloze.choices:
        return []
    blank = is_blank_infilling(model)
    if blank and (cloze.sop_id is None or cloze.mask_position is None):
        raise ValueError("a blank-infilling model needs a Cloze with sop_id and mask_position (encode_cloze builds "
                         "them)")
    groups = [list(range(len(cloze.choices)))]
    if len(_pack(cloze, cloze.choices, blank).tokens) > max_length and len(cloze.choices) > 1:
        groups = [[k] for k in range(len(cloze.choices))]  # too long packed: one row per choice
    rows = []
    for group in groups:
        c = _fit(cloze, [cloze.choices[k] for k in group], blank, max_length)
        pack = _pack(c, c.choices, blank)
        n = pack.division
        if blank and has_block_positions(model):
            pos = list(range(n)) + [c.mask_position] * (len(pack.tokens) - n)
            positions = [pos, list(pack.block)]
        elif blank:  # 1-D blank infilling (GLM-130B): frozen at a [MASK], counting on after the context for [gMASK]
            gmask = c.context[c.mask_position] == model.config.gmask_token_id
            positions = list(range(n)) + [n + b - 1 if gmask else c.mask_position for b in pack.block[n:]]
        else:
            positions = list(range(n)) + [n + b - 1 for b in pack.block[n:]]
        rows.append(_Row(index, group, pack, positions))
    return rows


def _pack(cloze: Cloze, choices: list[list[int]], blank: bool) -> ChoicePack:
    return pack_choices(cloze.context, choices, cloze.sop_id if blank else None)


def _fit(cloze: Cloze, choices: list[list[int]], blank: bool, max_length: int) -> Cloze:
    """The cloze with its context cut from the left (after the `keep` prefix) so that the row fits max_length."""
    over = len(_pack(cloze, choices, blank).tokens) - max_length
    if over <= 0:
        return Cloze(cloze.context, choices, cloze.sop_id, cloze.mask_position, cloze.keep)
    keep = cloze.keep
    if blank and cloze.mask_position is not None and cloze.mask_position < keep + over:
        raise ValueError(f"the request is {over} tokens longer than max_length={max_length} and cutting its context "
                         "from the left would remove the blank")
    if len(cloze.context) - over <= keep:
        raise ValueError(f"the choices alone are longer than max_length={max_length}")
    context = cloze.context[:keep] + cloze.context[keep + over:]
    mask_position = None if cloze.mask_position is None else cloze.mask_position - over
    return Cloze(context, choices, cloze.sop_id, mask_position, keep)


def _batches(rows: list[_Row], batch_size: int, vocab: int, budget: int):
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].pack.tokens), reverse=True)
    batch: list[int] = []
    for i in order:
        width = len(rows[batch[0]].pack.tokens) if batch else len(rows[i].pack.tokens)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width * vocab * 4 > budget):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def score_clozes(model, clozes: Sequence[Cloze], *, batch_size: int = 8, max_length: int | None = None,
                 logits_budget: int = DEFAULT_LOGITS_BUDGET) -> list[list[ChoiceScore]]:
    """Scores every choice of every request: rows packed per request (see the module doc), left-padded, sorted by
    length and cut into batches of at most `batch_size` rows whose float32 logits stay under `logits_budget` bytes;
    one forward per batch. max_length (default: the model's max_seq_len) bounds a row: a request too long packed is
    scored one choice per row, and a context still too long is cut from the left (GLM-130B's truncation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model.config.max_seq_len
    blank = is_blank_infilling(model)
    two_d = has_block_positions(model)
    rows = [r for i, c in enumerate(clozes) for r in _rows_for(model, i, c, max_length)]
    out: list[list[ChoiceScore | None]] = [[None] * len(c.choices) for c in clozes]
    device, vocab = model.device, model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for batch in _batches(rows, batch_size, vocab, logits_budget):
        T = max(len(rows[i].pack.tokens) for i in batch)
        B = len(batch)
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        segment = torch.full((B, T), -1, dtype=torch.long)
        position_ids = torch.zeros((B, 2, T) if two_d else (B, T), dtype=torch.long)
        for b, i in enumerate(batch):
            pack, p = rows[i].pack, T - len(rows[i].pack.tokens)
            input_ids[b, p:] = torch.tensor(pack.tokens)
            segment[b, p:] = torch.tensor(pack.segment)
            position_ids[b, ..., p:] = torch.tensor(rows[i].positions)
        mask = segment_mask(segment, bidirectional_context=blank)[:, None]  # (B, 1, T, T)
        logits = model(input_ids.to(device), position_ids.to(device), mask.to(device))  # (B, T, V)
        # every row that predicts a choice token, gathered, then one log-softmax
        where, targets = [], []
        for b, i in enumerate(batch):
            p = T - len(rows[i].pack.tokens)
            for k in rows[i].choices:
                choice = clozes[rows[i].request].choices[k]
                reads = rows[i].pack.reads[rows[i].choices.index(k)]
                where += [(b, p + r) for r in reads]
                targets += choice
        idx = torch.tensor(where, device=logits.device)
        picked = logits[idx[:, 0], idx[:, 1]].float()  # (N, V)
        logp = torch.log_softmax(picked, dim=-1)
        tgt = torch.tensor(targets, device=logits.device)
        token_lp = logp.gather(1, tgt[:, None])[:, 0].tolist()
        greedy = (picked.argmax(dim=-1) == tgt).tolist()
        at = 0
        for i in batch:
            for k in rows[i].choices:
                n = len(clozes[rows[i].request].choices[k])
                lps = token_lp[at:at + n]
                out[rows[i].request][k] = ChoiceScore(float(sum(lps)), all(greedy[at:at + n]), n, lps)
                at += n
    return out  # type: ignore[return-value]


def score_choices_batch(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 8,
                        max_length: int | None = None) -> list[list[ChoiceScore]]:
    """score_choices for many (context_with_mask, choices) requests at once, batched (see score_clozes)."""
    clozes = [encode_cloze(model, tokenizer, ctx, choices) for ctx, choices in requests]
    return score_clozes(model, clozes, batch_size=batch_size, max_length=max_length)


def score_choices(model, tokenizer, context_with_mask: str, choices: Sequence[str]) -> list[float]:
    """Per-choice log-likelihoods of `choices` filling the blank of `context_with_mask` (see the module doc)."""
    cloze = encode_cloze(model, tokenizer, context_with_mask, choices)
    if not cloze.choices:
        return []
    return [s.logprob for s in score_clozes(model, [cloze])[0]]
