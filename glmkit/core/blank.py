"""The original GLM's blank-infilling layout: Part A (the text with its blanks, bidirectional) then Part B (each blank's
tokens, `<|startofpiece|>` first, causal), with 2-D positions (position, block position).

    Part A   [CLS] x1 x2 [MASK] x4 <|endoftext|>        positions 0 1 2 3 4 5      block 0 0 0 0 0 0
    Part B   <|startofpiece|> y1 y2                      positions 3 3 3 (the mask's) block 1 2 3

Every Part A token sees all of Part A and nothing of Part B; every Part B token sees Part A and the Part B tokens up
to itself. That is THUDM's `sep` mask (tril + every row sees the first `sep` columns) and what the hub code's
`build_inputs_for_generation` builds for generation and for seq2seq training (with the target as Part B).

`blank_rows` turns token rows into that layout, left-padded into a batch; `BlankInfillingView` is the model as
glmkit.core.generate sees it while it fills blanks (the generation loop asks the model for its positions and mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def sep_mask(context_end: torch.Tensor, T: int, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, 1, T, T], True = may attend: row i sees columns <= i and every column < context_end[b] (Part A),
    never a left-padding column (< pad[b])."""
    cols = torch.arange(T, device=context_end.device)
    allowed = (cols[None, None, :] <= cols[None, :, None]) | (cols[None, None, :] < context_end[:, None, None])
    if pad is not None:
        allowed &= cols[None, None, :] >= pad[:, None, None]
    return allowed[:, None]


def blank_positions(context_len: int, mask_position: int, part_b_len: int) -> list[list[int]]:
    """[positions, block positions] of Part A (0..context_len-1, block 0) and one blank's Part B of part_b_len tokens
    (all at mask_position, blocks 1..part_b_len)."""
    return [list(range(context_len)) + [mask_position] * part_b_len,
            [0] * context_len + list(range(1, part_b_len + 1))]


def blank_rows(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], int]], pad_id: int,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-pads rows of (ids, [positions, block positions], context length) into a batch:
    input_ids [B, T], attention_mask [B, T] (1 = token), position_ids [B, 2, T] (0 under the padding),
    context_end [B] (the column where each row's Part B starts) and pad [B] (each row's padding length)."""
    T = max(len(ids) for ids, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, 2, T, dtype=torch.long)
    context_end = torch.zeros(B, dtype=torch.long)
    pad = torch.zeros(B, dtype=torch.long)
    for b, (ids, positions, ctx) in enumerate(rows):
        n = len(ids)
        if len(positions) != 2 or len(positions[0]) != n or len(positions[1]) != n:
            raise ValueError(f"row {b}: positions must be [2, {n}] for {n} tokens")
        p = T - n
        input_ids[b, p:] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[b, p:] = 1
        position_ids[b, :, p:] = torch.tensor([list(positions[0]), list(positions[1])], dtype=torch.long)
        context_end[b] = p + ctx
        pad[b] = p
    return {k: v.to(device) for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask),
                                         ("position_ids", position_ids), ("context_end", context_end),
                                         ("pad", pad))}


class BlankInfillingView:
    """The model as glmkit.core.generate sees it while the original GLM fills blanks: for the prompt (Part A + the
    Part B so far) the positions and `sep` mask given here; longer sequences continue the last blank (same
    position, block position + 1), causally, which is also what generate.py's decode steps do."""

    def __init__(self, model, position_ids: torch.Tensor, context_end: torch.Tensor,
                 pad: torch.Tensor | None = None) -> None:
        self._model = model
        self._positions = position_ids  # [B, 2, T0]
        self._context_end = context_end  # [B]
        self._pad = pad if pad is not None else torch.zeros_like(context_end)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def default_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        T0 = self._positions.shape[-1]
        B, T = input_ids.shape
        pos = self._positions.to(input_ids.device)
        if pos.shape[0] != B:  # one layout for every row (beams of one prompt)
            pos = pos.expand(B, -1, -1)
        if T <= T0:
            return pos[..., :T]
        extra = torch.arange(1, T - T0 + 1, device=input_ids.device)
        last = pos[..., -1:]  # (B, 2, 1)
        more = torch.stack((last[:, 0].expand(-1, T - T0), last[:, 1] + extra), dim=1)
        return torch.cat((pos, more), dim=-1)

    def default_attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        B, T = input_ids.shape
        context_end, pad = self._context_end.to(input_ids.device), self._pad.to(input_ids.device)
        if context_end.shape[0] != B:
            context_end, pad = context_end.expand(B), pad.expand(B)
        return sep_mask(context_end, T, pad)


# ------------------------------------------------------------------------------------ multiple choice, packed
@dataclass
class ChoicePack:
    """A context and every answer to it in one row, as GLM-130B's `build_multiple_choice_sample` packs them: the
    context (Part A) first, then one segment per choice (`<sop>` + choice[:-1] for blank infilling; choice[:-1]
    alone for a causal continuation). Each segment sees the context and itself causally, never another segment."""

    tokens: list[int]
    segment: list[int]  # 0 = context, k = choice k-1's segment
    block: list[int]  # 0 in the context, 1, 2, ... within a segment (block positions)
    reads: list[list[int]]  # per choice: the rows whose logits predict its tokens, in order
    division: int  # context length


def pack_choices(context: Sequence[int], choices: Sequence[Sequence[int]], sop_id: int | None,
                 single_token: bool | None = None) -> ChoicePack:
    """Packs `choices` after `context`. sop_id=None is a causal continuation: a choice's first token is read at the
    context's last row and the segment holds choice[:-1]. With single-token choices (single_token None = detect)
    one segment serves them all (GLM-130B's `is_single_token`: one `<sop>`, one row read for every choice)."""
    if any(len(c) == 0 for c in choices):
        raise ValueError("every choice needs at least one token")
    tokens, division = list(context), len(context)
    if division == 0:
        raise ValueError("the context has no tokens")
    segment, block = [0] * division, [0] * division
    if single_token is None:
        single_token = all(len(c) == 1 for c in choices)
    elif single_token and any(len(c) != 1 for c in choices):
        raise ValueError("single_token=True needs one-token choices")
    reads: list[list[int]] = []
    for k, choice in enumerate(choices):
        start = len(tokens)
        if single_token and k > 0:
            reads.append(list(reads[0]))
            continue
        seg = ([sop_id] if sop_id is not None else []) + list(choice[:-1])
        tokens += seg
        segment += [k + 1] * len(seg)
        block += list(range(1, len(seg) + 1))
        if sop_id is not None:
            reads.append(list(range(start, start + len(choice))))
        else:
            reads.append([division - 1] + list(range(start, start + len(choice) - 1)))
    return ChoicePack(tokens, segment, block, reads, division)


def segment_mask(segment: torch.Tensor, bidirectional_context: bool) -> torch.Tensor:
    """Bool [..., T, T], True = may attend, from segment ids [..., T] (0 = context, k > 0 = a choice's segment,
    -1 = padding): the context sees itself (bidirectionally, or causally), a segment sees the context and itself
    causally, nothing sees padding."""
    T = segment.shape[-1]
    cols = torch.arange(T, device=segment.device)
    causal = cols[None, :] <= cols[:, None]  # [T, T]
    seg_i, seg_j = segment[..., :, None], segment[..., None, :]
    context_col = seg_j == 0
    if not bidirectional_context:
        context_col = context_col & causal
    return context_col | ((seg_i == seg_j) & (seg_j > 0) & causal)


def build_multiple_choice_sample(text: Sequence[int], choices: Sequence[Sequence[int]], *, mask_id: int,
                                 gmask_id: int, sop_id: int, is_single_token: bool = False,
                                 unified_multitask_encoding: bool = False, use_task_mask: bool = False) -> dict:
    """GLM-130B's `MultiChoiceTaskDataset.build_multiple_choice_sample` (evaluation/dataset.py), with 1-D positions:
    the blank is [gMASK] with use_task_mask, else [MASK]; it is appended to `text` when `text` lacks it. Part B
    positions stay at the blank ([MASK]; or count up from it under unified_multitask_encoding without a blank in
    the text), or continue after the context ([gMASK]). Returns token, position_id, attention_mask (0/1 rows),
    choices and choice_target_ids (the first choice's rows only when is_single_token), as the original does."""
    blank = gmask_id if use_task_mask else mask_id
    text = list(text)
    blank_filling = blank in text
    if blank_filling:
        mask_position = text.index(blank)
    else:
        mask_position = len(text)
        text.append(blank)
    pack = pack_choices(text, choices, sop_id, single_token=is_single_token)
    division = pack.division
    positions = list(range(division))
    for b in pack.block[division:]:
        if use_task_mask:
            positions.append(division + b - 1)
        elif blank_filling or not unified_multitask_encoding:
            positions.append(mask_position)
        else:
            positions.append(mask_position + b - 1)
    mask = segment_mask(torch.tensor(pack.segment), bidirectional_context=True)
    targets = pack.reads[0] if is_single_token else pack.reads
    out_choices = [c[0] for c in choices] if is_single_token else [list(c) for c in choices]
    return {"token": pack.tokens, "position_id": positions, "attention_mask": mask.long().tolist(),
            "choices": out_choices, "choice_target_ids": targets}
