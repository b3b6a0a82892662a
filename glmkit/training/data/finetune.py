"""Fine-tuning examples built exactly as ChatGLM's ptuning/main.py builds them, per tokenizer family.

Rows are JSON Lines objects with a prompt column, a response column and optionally a history column
(a list of [query, response] pairs). Rows whose prompt or response is empty are skipped, as in main.py.

ChatGLM-6B (`family == "chatglm"`, THUDM/ChatGLM-6B ptuning/main.py):
  prompt   = query, or with --history_column: "[Round i]\\n问：{q}\\n答：{r}\\n" per earlier turn (i from 0)
             + "[Round n]\\n问：{query}\\n答：". Training uses the template whenever --history_column is given;
             evaluation only when the row's history is non-empty (main.py's two preprocess functions differ so).
  train    a = encode(source_prefix + prompt)[: max_source_length - 1]; b = encode(answer)[: max_target_length - 2]
           input_ids = a + [gMASK, <sop>] + b + [<eop>]   (tokenizer.build_inputs_with_special_tokens(a, b))
           labels    = [-100] * index(<sop>) + input_ids[index(<sop>):]
  eval     input_ids = encode(prompt)[: max_source_length - 2] + [gMASK, <sop>], left-padded in a batch;
           label     = decode(encode(answer)[: max_target_length - 2]).
ChatGLM2-6B (`family == "chatglm2"`, THUDM/ChatGLM2-6B ptuning/main.py, tokenizer.build_prompt):
  prompt   = "[Round i]\\n\\n问：{q}\\n\\n答：{r}\\n\\n" per earlier turn (i from 1) + "[Round n]\\n\\n问：{query}\\n\\n答："
  train    a = [gMASK, sop] + encode(prompt)[: max_source_length - 2]; b = encode(answer)[: max_target_length]
           input_ids = a + b + [eos]; labels = [pad] * len(a) + b + [eos]
  eval     input_ids = [gMASK, sop] + encode(prompt)[: max_source_length - 2]; label = decode(answer[: max_tgt - 2])
Other families (ChatGLM3, GLM-4: role tokens) use glmkit.core.chat.build_chat_input for the prompt ids, keep its
last max_source_length tokens (after the [gMASK]<sop> prefix), and learn answer[: max_target_length] + [eos].
The original GLM (`family == "glm"`: glm-large-chinese, glm-2b, glm-10b, glm-10b-chinese), as its hub code's
build_inputs_for_generation(targets=...) lays out seq2seq fine-tuning (THUDM/GLM's tasks/seq2seq):
  source   = source_prefix + prompt, with "[gMASK]" appended when it holds no [MASK]/[sMASK]/[gMASK] blank
  train    a = [CLS] + encode(source)[-(max_source_length - 2):] + [<|endoftext|>]  (cut on the left, as the hub
           tokenizer's truncation_side); b = encode(answer)[: max_target_length - 1] + [<|endofpiece|>]
           input_ids = a + [<|startofpiece|>] + b; labels = [-100] * (len(a) + 1) + b (the blank part only)
           position_ids = [0 .. len(a)-1, then the first blank's index for all of Part B], block positions
           [0] * len(a) + [1, 2, ...]; context = len(a): Part A is bidirectional, Part B causal (core.blank)
  eval     input_ids = a + [<|startofpiece|>] with those positions; generation stops at <|endofpiece|>.

With ignore_pad_token_for_loss (main.py's default) every label equal to the pad id becomes -100. Training rows
are padded on the right by the collator to the longest row of the batch (main.py pads every row to
max_source_length + max_target_length; the extra pads come after all learned tokens and carry label -100, so
the loss is the same and the work smaller).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmkit.core.blank import blank_positions, sep_mask
from glmkit.core.chat import build_chat_input
from glmkit.core.chat_template import chatglm2_prompt, chatglm_prompt
from glmkit.core.fill import BLANK_RE
from glmkit.loading.corpus import read_json_records

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Columns:
    prompt: str = "content"
    response: str = "summary"
    history: str | None = None


@dataclass(frozen=True)
class Lengths:
    max_source_length: int = 64
    max_target_length: int = 128
    source_prefix: str = ""
    ignore_pad_token_for_loss: bool = True

    def __post_init__(self) -> None:
        if self.max_source_length < 3:
            raise ValueError(f"--max_source_length must be at least 3 (room for [gMASK] <sop>), "
                             f"got {self.max_source_length}")
        if self.max_target_length < 3:
            raise ValueError(f"--max_target_length must be at least 3, got {self.max_target_length}")


@dataclass(frozen=True)
class SpecialTokens:
    gmask: int | None
    sop: int | None
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialTokens:
        def first(*names):
            for n in names:
                v = getattr(tok, n, None)
                if v is not None:
                    return int(v)
            return None

        eos = (first("eop_token_id", "eos_token_id") if tokenizer_family(tok) in ("chatglm", "glm")
               else first("eos_token_id"))
        pad = first("pad_token_id")
        if eos is None or pad is None:
            raise ValueError("the tokenizer lacks an eos or pad token id; fine-tuning needs both")
        return cls(gmask=first("gmask_token_id"), sop=first("sop_token_id", "bos_token_id"), eos=eos, pad=pad)


# ------------------------------------------------------------------------------------------------------ reading
def read_rows(path: str | Path, max_samples: int | None = None) -> list[dict[str, Any]]:
    """JSON Lines (one object per line, as ChatGLM's AdvertiseGen files), or one JSON array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    rows = read_json_records(path)
    return rows[:max_samples] if max_samples is not None else rows


def check_columns(rows: Sequence[dict[str, Any]], columns: Columns, source: str) -> None:
    if not rows:
        raise ValueError(f"{source} holds no rows")
    wanted = [c for c in (columns.prompt, columns.response, columns.history) if c]
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise ValueError(f"{source}: rows have no column(s) {missing}; they have {sorted(rows[0])}. "
                         "Set --prompt_column / --response_column / --history_column to your keys")


# ------------------------------------------------------------------------------------------------------ prompts
def tokenizer_family(tok) -> str:
    return str(getattr(tok, "family", "chatglm"))


def _usable(row: dict[str, Any], columns: Columns) -> bool:
    return bool(row.get(columns.prompt)) and bool(row.get(columns.response))


def _history(row: dict[str, Any], columns: Columns) -> list:
    if columns.history is None:
        return []
    h = row.get(columns.history) or []
    if not isinstance(h, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in h):
        raise ValueError(f"column {columns.history!r} must hold a list of [query, response] pairs, got {h!r:.80}")
    return h


def _chat_prompt_ids(tok, query: str, history: list, max_len: int) -> list[int]:
    ids = build_chat_input(tok, query, history)
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if ids and isinstance(ids[0], list):  # [[...]] batch of one
        ids = ids[0]
    if len(ids) > max_len:  # keep the [gMASK]<sop> prefix and the newest turns
        ids = ids[:2] + ids[len(ids) - (max_len - 2):]
    return ids


# ------------------------------------------------------------------------------------------------------ examples
def _row_fields(tok, row: dict[str, Any], columns: Columns, lengths: Lengths):
    """What both example builders read from a row (None for a row main.py skips)."""
    if not _usable(row, columns):
        return None
    return (SpecialTokens.from_tokenizer(tok), tokenizer_family(tok), row[columns.prompt], row[columns.response],
            _history(row, columns), lengths.max_source_length, lengths.max_target_length)


def _original_glm_source(tok, query: str, history: list, lengths: Lengths, src: int) -> tuple[list[int], int]:
    """The original GLM's Part A ([CLS] source <|endoftext|>) and the index of its first blank."""
    if history:
        raise ValueError("the original GLM has no chat format: fine-tune it without --history_column")
    source = lengths.source_prefix + query
    if not BLANK_RE.search(source):
        source += "[gMASK]"
    ids = tok.encode(source, add_special_tokens=False)[-(src - 2):]
    a = [tok.cls_token_id] + ids + [tok.eos_token_id]
    blanks = [i for i, t in enumerate(a) if t in set(tok.mask_token_ids)]
    if not blanks:
        raise ValueError(f"the source {source[:60]!r}... lost its blank when cut to --max_source_length {src}: "
                         "raise it, or put the blank nearer the end")
    return a, blanks[0]


def train_example(tok, row: dict[str, Any], columns: Columns, lengths: Lengths) -> dict[str, list[int]] | None:
    """One training example {input_ids, labels} (unpadded; the original GLM's also carry position_ids and
    context, its Part A length), or None for a row main.py skips."""
    fields = _row_fields(tok, row, columns, lengths)
    if fields is None:
        return None
    special, family, query, answer, history, src, tgt = fields
    if family == "glm":
        a, mask_pos = _original_glm_source(tok, query, history, lengths, src)
        b = tok.encode(answer, add_special_tokens=False)[: tgt - 1] + [tok.eop_token_id]
        input_ids = a + [tok.sop_token_id] + b
        labels = [IGNORE_INDEX] * (len(a) + 1) + b
        if lengths.ignore_pad_token_for_loss:
            labels = labels[:len(a) + 1] + [IGNORE_INDEX if t == special.pad else t for t in labels[len(a) + 1:]]
        return {"input_ids": input_ids, "labels": labels, "context": len(a),
                "position_ids": blank_positions(len(a), mask_pos, len(b) + 1)}
    if family == "chatglm":
        prompt = lengths.source_prefix + chatglm_prompt(query, history, always_rounds=columns.history is not None)
        a = tok.encode(prompt, add_special_tokens=False)[: src - 1]
        b = tok.encode(answer, add_special_tokens=False)[: tgt - 2]
        input_ids = a + [special.gmask, special.sop] + b + [special.eos]
        context = input_ids.index(special.sop)
        labels = [IGNORE_INDEX] * context + input_ids[context:]
    elif family == "chatglm2":
        prompt = lengths.source_prefix + chatglm2_prompt(query, history)
        a = [special.gmask, special.sop] + tok.encode(prompt, add_special_tokens=False)[: src - 2]
        b = tok.encode(answer, add_special_tokens=False)[:tgt]
        input_ids = a + b + [special.eos]
        labels = [special.pad] * len(a) + b + [special.eos]
    else:
        a = _chat_prompt_ids(tok, lengths.source_prefix + query, history, src)
        b = tok.encode(answer, add_special_tokens=False)[:tgt]
        input_ids = a + b + [special.eos]
        labels = [IGNORE_INDEX] * len(a) + b + [special.eos]
    if lengths.ignore_pad_token_for_loss:
        labels = [IGNORE_INDEX if t == special.pad else t for t in labels]
    return {"input_ids": input_ids, "labels": labels}


def eval_example(tok, row: dict[str, Any], columns: Columns, lengths: Lengths) -> dict[str, Any] | None:
    """One generation example {input_ids (prompt, unpadded), label_ids, label (text)}, or None if skipped."""
    fields = _row_fields(tok, row, columns, lengths)
    if fields is None:
        return None
    special, family, query, answer, history, src, tgt = fields
    if family == "glm":
        a, mask_pos = _original_glm_source(tok, query, history, lengths, src)
        label_ids = tok.encode(answer, add_special_tokens=False)[: tgt - 1]
        return {"input_ids": a + [tok.sop_token_id], "label_ids": label_ids, "label": decode_text(tok, label_ids),
                "context": len(a), "position_ids": blank_positions(len(a), mask_pos, 1)}
    if family == "chatglm":
        prompt = lengths.source_prefix + chatglm_prompt(query, history)
        input_ids = tok.encode(prompt, add_special_tokens=False)[: src - 2] + [special.gmask, special.sop]
    elif family == "chatglm2":
        prompt = lengths.source_prefix + chatglm2_prompt(query, history)
        input_ids = [special.gmask, special.sop] + tok.encode(prompt, add_special_tokens=False)[: src - 2]
    else:
        input_ids = _chat_prompt_ids(tok, lengths.source_prefix + query, history, src)
    label_ids = tok.encode(answer, add_special_tokens=False)[: tgt - 2]
    return {"input_ids": input_ids, "label_ids": label_ids, "label": decode_text(tok, label_ids)}


def build_examples(tok, rows: Sequence[dict[str, Any]], columns: Columns, lengths: Lengths,
                   train: bool) -> list[dict[str, Any]]:
    make = train_example if train else eval_example
    out = [e for e in (make(tok, r, columns, lengths) for r in rows) if e is not None]
    if not out:
        raise ValueError(f"no usable rows: every row lacks a non-empty {columns.prompt!r} or {columns.response!r}")
    return out


def decode_text(tok, ids: Sequence[int]) -> str:
    """Decodes without special tokens, stripped (main.py: batch_decode(skip_special_tokens=True) then strip)."""
    special = set(_special_ids(tok))
    ids = [int(i) for i in ids if int(i) not in special and int(i) >= 0]
    return tok.decode(ids).strip() if ids else ""


def _special_ids(tok) -> list[int]:
    ids = getattr(tok, "all_special_ids", None)
    if ids is not None:
        return [int(i) for i in ids]
    names = ("pad_token_id", "eos_token_id", "bos_token_id", "eop_token_id", "sop_token_id", "gmask_token_id",
             "mask_token_id", "smask_token_id", "unk_token_id")
    return [int(getattr(tok, n)) for n in names if getattr(tok, n, None) is not None and n != "unk_token_id"]


# ------------------------------------------------------------------------------------------------------ batching
def collate_train(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads to the longest row: input_ids with pad_id, labels with -100. Examples with position_ids and
    context (the original GLM) also give position_ids [B, 2, T] and their Part A / Part B mask as attention_mask
    (bool [B, 1, T, T]); the model takes both (`model(input_ids, **the rest)`)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
    out = {"input_ids": ids, "labels": labels}
    if "position_ids" in examples[0]:
        positions = torch.zeros(len(examples), 2, T, dtype=torch.long)
        for i, e in enumerate(examples):
            positions[i, :, : len(e["input_ids"])] = torch.tensor(e["position_ids"])
        out["position_ids"] = positions
        out["attention_mask"] = sep_mask(torch.tensor([e["context"] for e in examples]), T)
    return out


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pads prompts (ChatGLM's tokenizers pad on the left): input_ids and a [B, T] 1/0 attention_mask."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
