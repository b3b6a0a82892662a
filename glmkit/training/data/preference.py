"""Preference pairs and prompts for alignment (reward models, DPO, GRPO), in TRL's standard formats.

A preference row is a JSON object with a prompt, a chosen and a rejected answer (TRL's "standard" layout; the column
names are settable): either plain text

    {"prompt": "作者#王維*體裁#五言律詩*題目#…", "chosen": "巖壑轉微逕，…", "rejected": "行行覓路緣松嶠，…"}

or OpenAI-style message lists (TRL's "conversational" layout): the prompt a list of {"role", "content"} messages that
ends with the user's, each answer a list holding one assistant message

    {"prompt": [{"role": "user", "content": "…"}], "chosen": [{"role": "assistant", "content": "…"}], ...}

A prompt-only row (GRPO) needs only the prompt column.

Each answer becomes one training example laid out exactly as supervised fine-tuning lays out a prompt/answer pair for
the family (glmkit.training.data.finetune.train_example: ChatGLM-6B's `prompt [gMASK] <sop> answer <eop>`, ChatGLM2's
`[gMASK] sop prompt answer </s>`, ChatGLM3 / GLM-4's chat prompt + answer + eos, the original GLM's blank layout), so
the SFT stage and the preference stages see the same sequences. Message-list prompts are rendered with the family's
chat template (glmkit.core.chat_template.apply_chat_template). The label mask keeps only the answer tokens and the
answer's end token (TRL's completion mask): prompt tokens, and ChatGLM-6B's <sop> that SFT also learns, carry -100.

Rows are checked before anything is built: a missing column, an empty answer, a chosen answer equal to the rejected one,
or a prompt longer than --max_source_length raise a ValueError that names the file and row (1-based).
Answers longer than --max_target_length are cut, as fine-tuning cuts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glmkit.core.chat import build_chat_input
from glmkit.core.chat_template import apply_chat_template, chatglm2_prompt, chatglm_prompt
from glmkit.core.fill import BLANK_RE
from glmkit.training.data.finetune import (
    IGNORE_INDEX,
    Columns,
    Lengths,
    SpecialTokens,
    eval_example,
    tokenizer_family,
    train_example,
)

_PROMPT, _ANSWER = "prompt", "answer"  # the keys of the one-row dicts handed to the fine-tuning builders


@dataclass(frozen=True)
class PreferenceColumns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


# ------------------------------------------------------------------------------------------------------ checks
def _where(source: str, index: int) -> str:
    return f"{source} row {index + 1}"


def check_preference_rows(rows: Sequence[dict[str, Any]], columns: PreferenceColumns, source: str,
                          pairs: bool = True) -> None:
    """ValueError naming the row for a missing column or an empty/duplicated answer (pairs=False: prompts only)."""
    if not rows:
        raise ValueError(f"{source} holds no rows")
    wanted = [columns.prompt] + ([columns.chosen, columns.rejected] if pairs else [])
    flags = {columns.prompt: "--prompt_column", columns.chosen: "--chosen_column",
             columns.rejected: "--rejected_column"}
    for i, row in enumerate(rows):
        missing = [c for c in wanted if c not in row]
        if missing:
            raise ValueError(f"{_where(source, i)} has no column(s) {missing}; it has {sorted(row)}. Set "
                             f"{' / '.join(flags[c] for c in missing)} to your keys")
        if not _prompt_given(row[columns.prompt]):
            raise ValueError(f"{_where(source, i)}: the prompt ({columns.prompt!r}) is empty")
        if pairs:
            chosen, rejected = (answer_text(row[c], c, source, i) for c in (columns.chosen, columns.rejected))
            if chosen == rejected:
                raise ValueError(f"{_where(source, i)}: chosen and rejected are the same answer; a pair must differ")


def _prompt_given(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return isinstance(prompt, list) and len(prompt) > 0


def answer_text(value: Any, column: str, source: str, index: int) -> str:
    """An answer as text: a string, or a message list whose last message is the assistant's."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise ValueError(f"{_where(source, index)}: {column!r} as a message list must end with an assistant "
                             "message")
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise ValueError(f"{_where(source, index)}: {column!r} must be text or an assistant message list, "
                         f"got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{_where(source, index)}: the {column!r} answer is empty")
    return value


# ------------------------------------------------------------------------------------------------------ prompts
def prompt_ids(tok, prompt: str | list[dict[str, Any]], lengths: Lengths) -> list[int]:
    """The untruncated prompt ids the family's fine-tuning layout puts before the answer (specials included)."""
    family = tokenizer_family(tok)
    special = SpecialTokens.from_tokenizer(tok)
    if isinstance(prompt, list):
        if family == "glm":
            raise ValueError("the original GLM has no chat template: give its prompts as text")
        return list(apply_chat_template(tok, prompt))
    text = lengths.source_prefix + prompt
    if family == "glm":  # as finetune._original_glm_source, uncut
        text = text if BLANK_RE.search(text) else text + "[gMASK]"
        return [tok.cls_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    if family == "chatglm":
        return tok.encode(chatglm_prompt(text, []), add_special_tokens=False) + \
            [special.gmask, special.sop]
    if family == "chatglm2":
        return [special.gmask, special.sop] + tok.encode(chatglm2_prompt(text, []), add_special_tokens=False)
    ids = build_chat_input(tok, text, [])
    return list(ids)


def _check_prompt_length(tok, prompt, lengths: Lengths, source: str, index: int) -> list[int]:
    ids = prompt_ids(tok, prompt, lengths)
    if len(ids) > lengths.max_source_length:
        raise ValueError(f"{_where(source, index)}: the prompt is {len(ids)} tokens, more than --max_source_length "
                         f"{lengths.max_source_length}; shorten it or raise --max_source_length")
    return ids


# ------------------------------------------------------------------------------------------------------ examples
def answer_example(tok, prompt, answer: str, lengths: Lengths, ids: list[int] | None = None) -> dict[str, Any]:
    """One {input_ids, labels[, position_ids, context]} example: the prompt in the family's fine-tuning layout, then
    the answer and its end token; labels are -100 everywhere but on the answer and its end token (kept even where
    the end token is also the pad token, as in GLM-4: rows hold no padding before the collator pads them)."""
    if isinstance(prompt, str):
        ex = train_example(tok, {_PROMPT: prompt, _ANSWER: answer}, Columns(_PROMPT, _ANSWER), lengths)
        if ex is None:
            raise ValueError("empty prompt or answer")
        start = len(prompt_example(tok, prompt, lengths)["input_ids"])
    else:
        special = SpecialTokens.from_tokenizer(tok)
        p = ids if ids is not None else prompt_ids(tok, prompt, lengths)
        cut = lengths.max_target_length - (2 if tokenizer_family(tok) == "chatglm" else 0)
        ex = {"input_ids": p + tok.encode(answer, add_special_tokens=False)[:cut] + [special.eos]}
        start = len(p)
    # TRL's completion mask: every token after the prompt, none before (SFT's labels differ: ChatGLM-6B's learn
    # <sop>, and pad-valued labels, such as GLM-4's eos, are dropped there)
    ex["labels"] = [IGNORE_INDEX] * start + ex["input_ids"][start:]
    return ex


@dataclass
class PairExample:
    chosen: dict[str, Any]
    rejected: dict[str, Any]


def build_pairs(tok, rows: Sequence[dict[str, Any]], columns: PreferenceColumns, lengths: Lengths,
                source: str = "data") -> list[PairExample]:
    """Checked rows -> chosen/rejected examples (see the module docstring)."""
    check_preference_rows(rows, columns, source)
    out = []
    for i, row in enumerate(rows):
        prompt = row[columns.prompt]
        ids = _check_prompt_length(tok, prompt, lengths, source, i)
        chosen = answer_text(row[columns.chosen], columns.chosen, source, i)
        rejected = answer_text(row[columns.rejected], columns.rejected, source, i)
        out.append(PairExample(answer_example(tok, prompt, chosen, lengths, ids),
                               answer_example(tok, prompt, rejected, lengths, ids)))
    return out


def prompt_example(tok, prompt, lengths: Lengths) -> dict[str, Any]:
    """A generation prompt {input_ids[, position_ids, context]} in the family's fine-tuning layout."""
    if isinstance(prompt, str):
        ex = eval_example(tok, {_PROMPT: prompt, _ANSWER: "-"}, Columns(_PROMPT, _ANSWER), lengths)
        return {k: v for k, v in ex.items() if k in ("input_ids", "position_ids", "context")}
    return {"input_ids": prompt_ids(tok, prompt, lengths)}


def build_prompts(tok, rows: Sequence[dict[str, Any]], columns: PreferenceColumns, lengths: Lengths,
                  source: str = "data") -> list[dict[str, Any]]:
    """Checked prompt-only rows -> generation prompts, each with its row's prompt under "source"."""
    check_preference_rows(rows, columns, source, pairs=False)
    out = []
    for i, row in enumerate(rows):
        prompt = row[columns.prompt]
        _check_prompt_length(tok, prompt, lengths, source, i)
        ex = prompt_example(tok, prompt, lengths)
        ex["source"] = prompt  # what reward functions and reward models are given
        out.append(ex)
    return out


def completion_example(tok, prompt: dict[str, Any], completion: Sequence[int]) -> dict[str, Any]:
    """A generated completion (its ids, with the end token if it ended) after its prompt, as a training example
    whose labels are the completion tokens only. The original GLM's Part B positions extend over the completion."""
    ids = list(prompt["input_ids"])
    comp = [int(t) for t in completion]
    ex: dict[str, Any] = {"input_ids": ids + comp, "labels": [IGNORE_INDEX] * len(ids) + comp}
    if "position_ids" in prompt:  # GLM: Part A, then <sop> and the completion all at the blank's position
        context = prompt["context"]
        mask_pos = prompt["position_ids"][0][-1]
        ex["position_ids"] = [list(range(context)) + [mask_pos] * (len(ids) - context + len(comp)),
                              [0] * context + list(range(1, len(ids) - context + len(comp) + 1))]
        ex["context"] = context
    return ex
