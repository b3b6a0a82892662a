"""GLM blank-infilling samples in the ChatGLM-6B layout (THUDM/GLM's blocklm_utils.py
ConstructBlockStrategy and build_mask_matrix; ChatGLM-6B's get_masks / get_position_ids).

A document (token ids, no special tokens) becomes one sample:

    Part A  = the corrupted text: every span replaced by one mask token ([MASK], [sMASK] or [gMASK]); bidirectional.
    Part B  = the spans in shuffled order, each `<sop> span`; its targets are `span <eop>`; causal.
    positions = Part A: 0, 1, 2, ... ; Part B: frozen at the index of its span's mask token in Part A.
    blocks    = Part A: 0 ; Part B: 1, 2, ... restarting at every `<sop>`.
    loss      = on Part B only.

Unlike the original GLM there is no leading [CLS]: ChatGLM-6B's inputs start with the text. The document-level
objective therefore gives exactly ChatGLM-6B's inference layout, `text [gMASK] <sop> continuation <eop>`, with the
positions of its `get_position_ids` (arange up to [gMASK], then frozen at [gMASK]; blocks 1, 2, ... from <sop>), so
`model.generate`/`chat` on a model pretrained here runs the code path it was trained on.

Objectives (chosen per document, with configurable probabilities):
  - "bert"     token-level [MASK] spans: lengths ~ Poisson(3) truncated to 1..39 until 15% of tokens are covered,
               placed by `sample_spans` (at least one kept token between spans).
  - "sentence" whole sentences -> [sMASK] until 15% are covered.
  - "gpt"      one [gMASK] suffix span covering 50-100% of the document.
The original draws the objective once per batch; drawing it per document is what lets packed rows mix them.

`pack_samples` concatenates samples into fixed-length rows with a block-diagonal attention mask (True = may
attend) so packed samples never see each other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Objective = Literal["bert", "sentence", "gpt"]
IGNORE_INDEX = -100

# Sentence boundaries of the original builder (`ConstructBlockStrategy.contains_sentence_end`).
SENTENCE_END_MARKS = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…", "\n")


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids a sample needs (take them from the tokenizer: `SpecialIds.from_tokenizer(tok)`)."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        names = ("mask_token_id", "smask_token_id", "gmask_token_id", "sop_token_id", "eop_token_id", "pad_token_id")
        missing = [n for n in names if getattr(tok, n, None) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks {missing}; blank infilling needs a ChatGLM-6B-layout tokenizer "
                             "with [MASK], [sMASK], [gMASK], <sop>, <eop> and a pad token")
        return cls(*(int(getattr(tok, n)) for n in names))


@dataclass
class BlankConfig:
    """The blank-infilling recipe. Defaults follow the original GLM constructor (§1.4)."""

    bert_prob: float = 0.5
    """probability that a document gets the token-level [MASK] objective"""
    sentence_prob: float = 0.0
    """probability of the sentence-level [sMASK] objective; the rest gets the document-level [gMASK] objective"""
    mask_ratio: float = 0.15
    """fraction of tokens covered by [MASK] spans (`bert_ratio`)"""
    sentence_ratio: float = 0.15
    """fraction of tokens covered by [sMASK] sentences (`gap_sentence_ratio`)"""
    avg_block_length: float = 3.0
    """Poisson λ of the [MASK] span lengths"""
    max_block_length: int = 40
    """span lengths are drawn from 1..max_block_length-1"""
    gpt_min_ratio: float = 0.5
    """the [gMASK] suffix covers between this fraction and all of the document"""
    gpt_full_prob: float = 0.0
    """extra probability that the [gMASK] suffix is the whole document (empty context, `[gMASK] <sop> text`)"""
    shuffle_spans: bool = True
    """shuffle the spans before building Part B (Part A always keeps the original order)"""

    def __post_init__(self) -> None:
        for name in ("bert_prob", "sentence_prob", "mask_ratio", "sentence_ratio", "gpt_min_ratio", "gpt_full_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"BlankConfig.{name} must lie in [0, 1], got {v}")
        if self.bert_prob + self.sentence_prob > 1.0 + 1e-9:
            raise ValueError(f"bert_prob + sentence_prob must be <= 1 (the rest is [gMASK]), got "
                             f"{self.bert_prob} + {self.sentence_prob}")
        if self.max_block_length < 2:
            raise ValueError(f"max_block_length must be >= 2, got {self.max_block_length}")
        if self.avg_block_length <= 0:
            raise ValueError(f"avg_block_length must be > 0, got {self.avg_block_length}")

@dataclass
class BlankSample:
    """One blank-infilling sample. `sep` = len(Part A); Part B = [sep:]."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on Part A
    position_ids: list[int]
    block_ids: list[int]
    sep: int
    objective: Objective
    spans: list[tuple[int, int]] = field(default_factory=list)  # (start, end) in the document, Part-B order

    def __len__(self) -> int:
        return len(self.input_ids)


# ------------------------------------------------------------------------------------------------------- span draws
def poisson_length_weights(avg: float, max_length: int) -> list[float]:
    """Poisson(avg) pmf over lengths 1..max_length-1 (random.choices renormalises them)."""
    return [math.exp(-avg + k * math.log(avg) - math.lgamma(k + 1)) for k in range(1, max_length)]


def sample_span_lengths(rng: random.Random, n_tokens: int, ratio: float, weights: Sequence[float]) -> list[int]:
    """Span lengths drawn until they cover >= int(ratio·n) tokens (at least one token), fitted to the document.

    Spans need one kept token between them, so n spans of total S fit when S + n - 1 <= n_tokens; lengths that
    would not fit are shortened (the last one) or dropped.
    """
    goal = max(1, int(ratio * n_tokens))
    lengths, covered = [], 0
    population = range(1, len(weights) + 1)
    while covered < goal:
        k = rng.choices(population, weights)[0]
        lengths.append(k)
        covered += k
    while lengths and sum(lengths) + len(lengths) - 1 > n_tokens:
        excess = sum(lengths) + len(lengths) - 1 - n_tokens
        if lengths[-1] > excess:
            lengths[-1] -= excess
        else:
            lengths.pop()
    return lengths or [1]


def sample_spans(lengths: Sequence[int], n_tokens: int, rng: random.Random) -> list[tuple[int, int]]:
    """Places spans as the original `sample_spans`: n offsets uniform in [0, L-S-n+1], sorted; each span starts at
    its offset plus the earlier spans' lengths plus one gap per earlier span. Returns sorted (start, end) pairs."""
    m = n_tokens - sum(lengths) - len(lengths) + 1
    if m < 0:
        raise ValueError(f"spans of lengths {list(lengths)} do not fit in {n_tokens} tokens")
    places = sorted(rng.randrange(m + 1) for _ in lengths)
    spans, shift = [], 0
    for place, length in zip(places, lengths):
        start = place + shift
        spans.append((start, start + length))
        shift += length + 1
    return spans


def sentence_spans(tokens: Sequence[int], sentence_end_ids: frozenset[int]) -> list[tuple[int, int]]:
    """Sentences = runs of tokens ending with (and including) a sentence-end token; a tail without one counts too."""
    spans, last = [], 0
    for i, t in enumerate(tokens):
        if t in sentence_end_ids:
            if last < i + 1:
                spans.append((last, i + 1))
            last = i + 1
    if last < len(tokens):
        spans.append((last, len(tokens)))
    return spans


def sentence_end_ids_from_tokenizer(tok, vocab_size: int | None = None) -> frozenset[int]:
    """Ids of the tokens whose text contains a sentence-end mark (`. ? ! ; : 。 ？ ！ ； …` or a newline)."""
    n = vocab_size or getattr(tok, "vocab_size", None) or len(tok)
    ids = set()
    for i in range(n):
        piece = _piece(tok, i)
        if piece and (any(m in piece for m in SENTENCE_END_MARKS) or piece == "<n>"):
            ids.add(i)
    return frozenset(ids)


def _piece(tok, i: int) -> str:
    for name in ("id_to_piece", "convert_id_to_token", "convert_ids_to_tokens"):
        fn = getattr(tok, name, None)
        if fn is not None:
            try:
                out = fn(i)
            except Exception:  # special/out-of-range ids in some tokenizers
                return ""
            return out if isinstance(out, str) else str(out)
    try:
        return tok.decode([i])
    except Exception:
        return ""


# ---------------------------------------------------------------------------------------------------------- samples
class BlankBuilder:
    """Turns token-id documents into blank-infilling samples; all randomness comes from the `rng` passed in."""

    def __init__(self, special: SpecialIds, config: BlankConfig | None = None,
                 sentence_end_ids: Iterable[int] = ()) -> None:
        self.special = special
        self.config = config or BlankConfig()
        self.sentence_end_ids = frozenset(sentence_end_ids)
        self.length_weights = poisson_length_weights(self.config.avg_block_length, self.config.max_block_length)

    def choose_objective(self, rng: random.Random) -> Objective:
        r = rng.random()
        if r < self.config.bert_prob:
            return "bert"
        if r < self.config.bert_prob + self.config.sentence_prob:
            return "sentence"
        return "gpt"

    def build(self, tokens: Sequence[int], rng: random.Random, objective: Objective | None = None) -> BlankSample:
        """One sample from one document (token ids without special tokens)."""
        if len(tokens) == 0:
            raise ValueError("cannot build a blank-infilling sample from an empty document")
        objective = objective or self.choose_objective(rng)
        c, sp = self.config, self.special
        n = len(tokens)
        if objective == "bert":
            spans = sample_spans(sample_span_lengths(rng, n, c.mask_ratio, self.length_weights), n, rng)
            mask_id = sp.mask
        elif objective == "sentence":
            sentences = sentence_spans(tokens, self.sentence_end_ids)
            rng.shuffle(sentences)
            goal, spans, covered = max(1, int(c.sentence_ratio * n)), [], 0
            for s, e in sentences:
                spans.append((s, e))
                covered += e - s
                if covered >= goal:
                    break
            spans.sort()
            mask_id = sp.smask
        elif objective == "gpt":
            if c.gpt_full_prob and rng.random() < c.gpt_full_prob:
                gen = n
            else:
                gen = rng.randint(max(1, math.ceil(c.gpt_min_ratio * n)), n)
            spans = [(n - gen, n)]
            mask_id = sp.gmask
        else:
            raise ValueError(f"unknown objective {objective!r}; expected 'bert', 'sentence' or 'gpt'")
        return self.assemble(tokens, spans, mask_id, objective, rng)

    def assemble(self, tokens: Sequence[int], spans: list[tuple[int, int]], mask_id: int, objective: Objective,
                 rng: random.Random | None = None, order: Sequence[tuple[int, int]] | None = None) -> BlankSample:
        """Part A + Part B from sorted, non-overlapping spans. Part B follows `order` if given, else the spans
        shuffled by `rng` (when the config says so), else their document order."""
        sp = self.special
        part_a: list[int] = []
        mask_index: dict[tuple[int, int], int] = {}
        last = 0
        for s, e in spans:
            if s < last or e <= s or e > len(tokens):
                raise ValueError(f"spans must be sorted, non-empty and inside the document, got {spans}")
            part_a += tokens[last:s]
            mask_index[(s, e)] = len(part_a)
            part_a.append(mask_id)
            last = e
        part_a += tokens[last:]
        sep = len(part_a)

        if order is not None:
            if sorted(order) != list(spans):
                raise ValueError(f"order {list(order)} is not a permutation of the spans {spans}")
            order = list(order)
        else:
            order = list(spans)
            if self.config.shuffle_spans and rng is not None and len(order) > 1:
                rng.shuffle(order)
        inputs, labels = list(part_a), [IGNORE_INDEX] * sep
        positions, blocks = list(range(sep)), [0] * sep
        for s, e in order:
            span = list(tokens[s:e])
            inputs += [sp.sop] + span
            labels += span + [sp.eop]
            positions += [mask_index[(s, e)]] * (len(span) + 1)
            blocks += list(range(1, len(span) + 2))
        return BlankSample(inputs, labels, positions, blocks, sep, objective, order)


# ---------------------------------------------------------------------------------------------------------- packing
@dataclass
class PackedRow:
    """Fixed-length row of packed samples. `segments` holds (start, sep, end) per sample (sep absolute)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    block_ids: list[int]
    segments: list[tuple[int, int, int]]

    def tensors(self) -> dict[str, torch.Tensor]:
        T = len(self.input_ids)
        return {
            "input_ids": torch.tensor(self.input_ids, dtype=torch.long),
            "labels": torch.tensor(self.labels, dtype=torch.long),
            "position_ids": torch.tensor([self.position_ids, self.block_ids], dtype=torch.long),  # [2, T]
            "attention_mask": attention_mask_for_segments(self.segments, T)[None],  # [1, T, T]
        }


def attention_mask_for_segments(segments: Sequence[tuple[int, int, int]], length: int) -> torch.Tensor:
    """Bool [T, T], True = may attend: in each segment, everything sees its Part A [start, sep), Part B rows
    also see Part B causally; segments are block-diagonal. Padding rows see only themselves."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for start, sep, end in segments:
        allowed[start:end, start:end] = causal[start:end, start:end]
        allowed[start:end, start:sep] = True
    used = torch.zeros(length, dtype=torch.bool)
    for start, _, end in segments:
        used[start:end] = True
    idx = torch.nonzero(~used).flatten()
    allowed[idx, idx] = True
    return allowed


def pack_samples(samples: Iterable[BlankSample], seq_len: int, pad_id: int) -> Iterator[PackedRow]:
    """Greedy packing in stream order: a sample that does not fit closes the row (padded to seq_len)."""
    row = PackedRow([], [], [], [], [])

    def flush() -> PackedRow:
        pad = seq_len - len(row.input_ids)
        return PackedRow(row.input_ids + [pad_id] * pad, row.labels + [IGNORE_INDEX] * pad,
                         row.position_ids + [0] * pad, row.block_ids + [0] * pad, list(row.segments))

    for sample in samples:
        if len(sample) > seq_len:
            raise ValueError(f"a sample of {len(sample)} tokens does not fit seq_len {seq_len}; cut documents to "
                             "max_doc_tokens first")
        if len(row.input_ids) + len(sample) > seq_len:
            yield flush()
            row = PackedRow([], [], [], [], [])
        start = len(row.input_ids)
        row.input_ids += sample.input_ids
        row.labels += sample.labels
        row.position_ids += sample.position_ids
        row.block_ids += sample.block_ids
        row.segments.append((start, start + sample.sep, start + len(sample)))
    if row.input_ids:
        yield flush()


def collate_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks `PackedRow.tensors()` dicts: input_ids/labels [B, T], position_ids [B, 2, T], mask [B, 1, T, T]."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
