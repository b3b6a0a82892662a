"""The model calls evaluation makes, batched, in each family's own layout: generation after a prompt (greedy or beam
search), the answer letter of a chat model (C-Eval/MMLU style), and the word a LAMBADA-style task checks.
Log-likelihood scoring is glmkit.core.scoring (score_clozes); the harness (tasks, lm-evaluation-harness) sits on
these.

Generation prompts, per family (what GLM-130B's `build_generation_sample` builds, in each family's positions):

- the original GLM: `[CLS] text [blank] <|endoftext|> <|startofpiece|>`, Part B at the blank (block positions 1, 2, ...);
- ChatGLM-6B / glm-tiny (2D rotary): `text [blank] <sop>`, Part B at the blank, as `glmkit fill`;
- GLM-130B: `text [blank] sop` in the model's own 1-D positions (frozen at a [MASK], counting on after a [gMASK]);
- ChatGLM2/3, GLM-4 (causal): `tokenizer.encode(text before the first blank)` (`[gMASK] <sop>` in front).

`[blank]` is the text's own first [MASK]/[sMASK]/[gMASK], else the one appended (`[gMASK]` or `[MASK]`, the task's
use_task_mask). unidirectional (GLM-130B): the blank families put `[gMASK] <sop>` before the text, all of it causal.
A prompt longer than max_length - max_new_tokens is cut from the left, after the family's special prefix, as
GLM-130B cuts it. Blank families stop at `<eop>` (and eos), causal ones at the model's eos ids.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmkit.core.blank import BlankInfillingView, blank_rows, sep_mask
from glmkit.core.chat import build_chat_input, stop_token_ids
from glmkit.core.fill import BLANK_RE, _encode_piece
from glmkit.core.generate import beam_search, generate_stream
from glmkit.core.scoring import _blank_id, has_block_positions, is_blank_infilling


@dataclass
class PromptRow:
    ids: list[int]
    positions: list[list[int]] | None  # [positions, block positions] for the blank families; None: the model's own
    context_end: int | None  # blank families: where Part B (<sop>) starts


def generation_prompt(model, tokenizer, text: str, *, blank: str = "[gMASK]", unidirectional: bool = False,
                      max_prompt_tokens: int | None = None) -> PromptRow:
    """The prompt a family generates an answer to `text` from (see the module doc)."""
    if not is_blank_infilling(model):
        ids = list(tokenizer.encode(BLANK_RE.split(text)[0]))
        keep = len(tokenizer.encode(""))
        return PromptRow(_cut(ids, keep, max_prompt_tokens, None)[0], None, None)
    glm = model.config.family == "glm"
    two_d = has_block_positions(model)
    sop = tokenizer.sop_token_id
    if unidirectional:
        body = tokenizer.encode(text, add_special_tokens=False)
        head = ([tokenizer.cls_token_id] if glm else []) + [_blank_id(tokenizer, "[gMASK]")] + (
            [tokenizer.eos_token_id] if glm else [])
        if max_prompt_tokens is not None and len(head) + 1 + len(body) > max_prompt_tokens:
            body = body[len(head) + 1 + len(body) - max_prompt_tokens:]
        n = len(head)
        ids = head + [sop] + list(body)
        if not two_d:  # GLM-130B: [gMASK] sop text, the model's own 1-D positions
            return PromptRow(ids, None, None)
        mask_pos = n - 2 if glm else n - 1
        return PromptRow(ids, [list(range(n)) + [mask_pos] * (len(ids) - n), [0] * n + list(range(1, len(ids) - n + 1))],
                         n)
    if not BLANK_RE.search(text):
        text = text + blank
    if glm:
        part_a = list(tokenizer.encode(text))  # [CLS] ... <|endoftext|>
        mask_pos = next(i for i, t in enumerate(part_a) if t in set(tokenizer.mask_token_ids))
        keep = 1
    else:
        parts = BLANK_RE.split(text)
        part_a, mask_pos = [], None
        for j, seg in enumerate(parts[0::2]):
            part_a += _encode_piece(tokenizer, seg, first=j == 0)
            if j < len(parts) // 2:
                if mask_pos is None:
                    mask_pos = len(part_a)
                part_a.append(_blank_id(tokenizer, parts[2 * j + 1]))
        keep = 0
    limit = None if max_prompt_tokens is None else max_prompt_tokens - 1
    part_a, mask_pos = _cut(part_a, keep, limit, mask_pos)
    n = len(part_a)
    if not two_d:  # GLM-130B (build_generation_sample): text blank sop, the model's own 1-D positions
        return PromptRow(part_a + [sop], None, None)
    return PromptRow(part_a + [sop], [list(range(n)) + [mask_pos], [0] * n + [1]], n)


def _cut(ids: list[int], keep: int, limit: int | None, mask_pos: int | None) -> tuple[list[int], int | None]:
    if limit is None or len(ids) <= limit:
        return ids, mask_pos
    over = len(ids) - limit
    if len(ids) - over <= keep or (mask_pos is not None and mask_pos < keep + over):
        raise ValueError(f"the prompt cannot be cut to {limit} tokens without losing its blank or prefix")
    return ids[:keep] + ids[keep + over:], None if mask_pos is None else mask_pos - over


def min_length_processor(ends: Sequence[int], prompt_len: int, min_new_tokens: int):
    """Bans the end tokens until min_new_tokens are generated (GLM-130B's min_gen_length)."""
    def proc(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] - prompt_len < min_new_tokens:
            scores = scores.clone()
            scores[:, list(ends)] = float("-inf")
        return scores
    return proc


def no_repeat_ngram_processor(n: int, prompt_len: int):
    """Bans a token that would repeat an n-gram already generated (the n-1 tokens before the answer count as its
    prefix), as GLM-130B's beam search bans n-grams."""
    def proc(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        start = max(prompt_len - (n - 1), 0)
        if ids.shape[1] - start < n:
            return scores
        scores = scores.clone()
        for b, row in enumerate(ids[:, start:].tolist()):
            prefix = tuple(row[len(row) - (n - 1):]) if n > 1 else ()
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix}
            if banned:
                scores[b, list(banned)] = float("-inf")
        return scores
    return proc


@torch.inference_mode()
def generate_texts(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, blank: str = "[gMASK]",
                   unidirectional: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
                   no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, batch_size: int = 8,
                   max_length: int | None = None, stop: Sequence[str] = (), chat: bool = False) -> list[str]:
    """Greedy (num_beams=1, batched with left padding) or beam-search answers to `texts`, decoded, cut at the first
    of `stop` (strings). chat=True: each text is the query of the family's chat prompt (build_chat_input)."""
    max_length = max_length or model.config.max_seq_len
    if chat:
        rows = [letter_prompt(model, tokenizer, t, chat=True) for t in texts]
    else:
        rows = [generation_prompt(model, tokenizer, t, blank=blank, unidirectional=unidirectional,
                                  max_prompt_tokens=max_length - max_new_tokens) for t in texts]
    ends = stop_token_ids(model, tokenizer)
    outs: list[list[int]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    step = 1 if num_beams > 1 else batch_size
    for at in range(0, len(order), step):
        chunk = order[at:at + step]
        for i, toks in zip(chunk, _generate_chunk(model, [rows[i] for i in chunk], ends, max_new_tokens, num_beams,
                                                   length_penalty, no_repeat_ngram_size, min_new_tokens)):
            outs[i] = toks
    texts_out = []
    for toks in outs:
        cut = next((k for k, t in enumerate(toks) if t in ends), len(toks))
        text = tokenizer.decode(toks[:cut])
        for s in stop:
            if s and s in text:
                text = text[:text.index(s)]
        texts_out.append(text)
    return texts_out


def _generate_chunk(model, rows: list[PromptRow], ends, max_new_tokens, num_beams, length_penalty, ngram,
                    min_new):
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    blank = rows[0].positions is not None
    if blank:
        batch = blank_rows([(r.ids, r.positions, r.context_end) for r in rows], pad)
        target = BlankInfillingView(model, batch["position_ids"], batch["context_end"], batch["pad"])
    else:
        T = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, T - len(r.ids):] = torch.tensor(r.ids)
            mask[b, T - len(r.ids):] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        target = model
    T = batch["input_ids"].shape[1]
    processors = []
    if min_new:
        processors.append(min_length_processor(ends, T, min_new))
    if num_beams > 1:
        if ngram:
            processors.append(no_repeat_ngram_processor(ngram, T))
        out = beam_search(target, batch["input_ids"], batch["attention_mask"], num_beams=num_beams,
                          max_new_tokens=max_new_tokens, eos_token_id=ends, length_penalty=length_penalty,
                          logits_processors=processors)
        return [row.tolist() for row in out]
    steps = list(generate_stream(target, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                 eos_token_id=ends, logits_processors=processors))
    if not steps:
        return [[] for _ in rows]
    return torch.stack(steps, dim=1).cpu().tolist()


# ------------------------------------------------------------------------------------ LAMBADA-style last word
def _is_word_char(ch: str) -> bool:
    return not (ch.isspace() or ch in string.punctuation or unicodedata.category(ch).startswith("P"))


def first_word(text: str) -> str:
    """The first word of a generated text: leading whitespace dropped, cut at the next whitespace or punctuation
    (ASCII or any Unicode P* character, so "霜。" -> "霜", "Bob." -> "Bob")."""
    text = text.lstrip()
    end = 0
    while end < len(text) and _is_word_char(text[end]):
        end += 1
    return text[:end]


def last_word_correct(generated: str, target: str) -> bool:
    """LAMBADA-style: the whole target word must be produced, and nothing more of the word: a prefix ("Bo" for
    "Bob") or a longer word ("Bobby") is wrong."""
    return first_word(generated) == target.strip()


# ------------------------------------------------------------------------------------ answer letters (C-Eval)
def answer_letter_ids(tokenizer, letters: str) -> list[int]:
    """The token of each answer letter in this tokenizer, as the model emits it first in an answer:
    `tokenizer.encode(letter, add_special_tokens=False)`, minus a lone SentencePiece word-start piece. The ids differ
    between tokenizers (C-Eval's ChatGLM evaluator hard-codes ChatGLM-6B's 167/333/251/416; ChatGLM2's own script
    asks its tokenizer), so they are always read from the tokenizer. A letter that is not one token, or two letters
    sharing a token, is a ValueError."""
    ids = []
    for letter in letters:
        toks = list(tokenizer.encode(letter, add_special_tokens=False))
        if len(toks) == 2 and tokenizer.decode([toks[0]]).strip() == "":
            toks = toks[1:]
        if len(toks) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(toks)} tokens in this tokenizer ({toks}); letters must "
                             "be one token each")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer letters {letters!r} share tokens: {ids}")
    return ids


def letter_prompt(model, tokenizer, query: str, chat: bool) -> PromptRow:
    """The prompt after which the answer letter is read: the family's chat prompt of `query` (chat=True; the model's
    own positions), else the text continued as the family generates (`generation_prompt`, a trailing [gMASK])."""
    if chat:
        if model.config.family == "glm":
            raise ValueError("the original GLM has no chat prompt; use prompt: plain")
        return PromptRow(list(build_chat_input(tokenizer, query)), None, None)
    return generation_prompt(model, tokenizer, query)


@torch.inference_mode()
def letter_logits(model, rows: Sequence[PromptRow], letter_ids: Sequence[int], *,
                  batch_size: int = 8) -> list[list[float]]:
    """The logits of `letter_ids` at the last position of each prompt (the answer's first token), one forward per
    batch, left-padded."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out: list[list[float]] = [[] for _ in rows]
    letters = torch.tensor(list(letter_ids))
    for own in (True, False):  # rows in the model's own positions, rows with explicit blank positions
        subset = [i for i, r in enumerate(rows) if (r.positions is None) == own]
        subset.sort(key=lambda i: len(rows[i].ids))
        for at in range(0, len(subset), batch_size):
            chunk = subset[at:at + batch_size]
            if own:
                T = max(len(rows[i].ids) for i in chunk)
                ids = torch.full((len(chunk), T), pad, dtype=torch.long)
                mask = torch.zeros(len(chunk), T, dtype=torch.long)
                for b, i in enumerate(chunk):
                    ids[b, T - len(rows[i].ids):] = torch.tensor(rows[i].ids)
                    mask[b, T - len(rows[i].ids):] = 1
                logits = model(ids.to(model.device), attention_mask=mask.to(model.device), last_logits_only=True)
            else:
                batch = blank_rows([(rows[i].ids, rows[i].positions, rows[i].context_end) for i in chunk], pad,
                                   model.device)
                T = batch["input_ids"].shape[1]
                logits = model(batch["input_ids"], batch["position_ids"],
                               sep_mask(batch["context_end"], T, batch["pad"]), last_logits_only=True)
            for b, i in enumerate(chunk):
                out[i] = logits[b, -1, letters.to(logits.device)].float().tolist()
    return out
