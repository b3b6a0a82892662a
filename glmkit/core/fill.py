"""Fill [MASK] / [sMASK] / [gMASK] blanks, left to right, as GLM's blank infilling does (`glmkit fill`).

    glmkit fill "床前明月[MASK]，疑是地上霜。"
    glmkit fill "白日依山盡，[sMASK]" --do-sample --top-p 0.8 --seed 1
    glmkit fill "Call me Ishmael." --model path/to/chatglm-6b          # no blank: continue, as [gMASK] at the end

ChatGLM-6B layout (2D rotary): for each blank, the input is the text so far (earlier blanks already filled, later
ones still masks: Part A, bidirectional) followed by `<sop>`; generation runs until `<eop>` with every generated token
at the blank's position and block ids 1, 2, ... (Part B), which is the layout glmkit pretrain trains and ChatGLM-6B
uses for `[gMASK]`.

The original GLM (glm-large-chinese, glm-2b, glm-10b, glm-10b-chinese) fills as its hub code's
`build_inputs_for_generation` + `generate` do: Part A is `tokenizer(text)` = `[CLS] text <|endoftext|>` with every
blank still a mask, seen bidirectionally; the first blank's answer follows `<|startofpiece|>` at that blank's position
with block positions 1, 2, ..., until `<|endofpiece|>` (glmkit.core.blank). The hub fills only the first blank;
glmkit fills the others after it as THUDM/GLM's generate_samples.py does: each later blank's Part B comes after the
earlier ones, which it sees. A text without blanks gets `[gMASK]` at its end.

Generation itself is glmkit.core.generate's loop (the model's KV cache); this module only builds inputs and positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from glmkit.core.blank import BlankInfillingView
from glmkit.core.generate import generate_stream

BLANK_RE = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")


@dataclass
class FillResult:
    text: str  # the input with every blank replaced by its answer
    answers: list[str] = field(default_factory=list)  # one per blank, left to right


class _BlankView:
    """The model as glmkit.core.generate sees it while one blank is filled: the family's positions, except that Part B
    (from <sop>) sits at `mask_pos`. ChatGLM-6B's own rule freezes it at the first [gMASK], else the first [MASK],
    which is wrong for an [sMASK] or for a [MASK] left of a [gMASK]."""

    def __init__(self, model, mask_pos: int) -> None:
        self._model = model
        self._mask_pos = mask_pos

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def default_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        pos = self._model.default_position_ids(input_ids, attention_mask)  # [B, 2, T]
        part_b = pos[:, 1] > 0
        pos[:, 0] = torch.where(part_b, torch.full_like(pos[:, 0], self._mask_pos), pos[:, 0])
        return pos


def _encode_piece(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of a text segment. Segments after a blank continue the text, so they get no SentencePiece dummy
    prefix (the pretraining samples cut spans out of one encoded document)."""
    if not text:
        return []
    if not first and hasattr(tokenizer, "sp_encode") and getattr(tokenizer, "family", "") == "chatglm":
        return tokenizer.sp_encode(text, add_dummy_prefix=False)
    return tokenizer.encode(text, add_special_tokens=False)


DEFAULT_MAX_NEW_TOKENS, DEFAULT_GMASK_MAX_NEW_TOKENS = 64, 128


def _limits(max_new_tokens: int | None, gmask_max_new_tokens: int | None) -> tuple[int, int]:
    """(limit per [MASK]/[sMASK] blank, limit per [gMASK] blank). An explicit max_new_tokens caps every blank, as the
    original's generate(max_length=len(prompt) + N) does; gmask_max_new_tokens, when given, overrides it for [gMASK]."""
    for name, v in (("max_new_tokens", max_new_tokens), ("gmask_max_new_tokens", gmask_max_new_tokens)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    span = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    if gmask_max_new_tokens is not None:
        return span, gmask_max_new_tokens
    return span, DEFAULT_GMASK_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens


def fill(model, tokenizer, text: str, *, max_new_tokens: int | None = None, gmask_max_new_tokens: int | None = None,
         **generate_kwargs) -> FillResult:
    """Fills each blank of `text` left to right; a text without blanks is continued (a trailing [gMASK]).

    generate_kwargs go to glmkit.core.generate.generate_stream (do_sample, temperature, top_p, top_k, seed,
    repetition_penalty, ...). `max_new_tokens` caps every blank, [gMASK] included; `gmask_max_new_tokens` is an
    explicit override for [gMASK] blanks. With neither given, a [MASK]/[sMASK] blank gets up to 64 tokens and a
    [gMASK] blank up to 128.
    """
    max_new_tokens, gmask_max_new_tokens = _limits(max_new_tokens, gmask_max_new_tokens)
    if model.config.family == "glm":
        return _fill_original_glm(model, tokenizer, text, max_new_tokens, gmask_max_new_tokens, generate_kwargs)
    if model.config.rope != "2d":
        raise ValueError("glmkit fill needs a blank-infilling model (the original GLM, or ChatGLM-6B's layout with 2D "
                         f"positions); {model.config.family!r} models are causal-only")
    ids_of = {"[MASK]": tokenizer.mask_token_id, "[sMASK]": tokenizer.smask_token_id,
              "[gMASK]": tokenizer.gmask_token_id}
    parts = BLANK_RE.split(text)  # text, blank, text, blank, ..., text
    if len(parts) == 1:
        parts = [text, "[gMASK]", ""]
    for blank in parts[1::2]:
        if ids_of[blank] is None:
            raise ValueError(f"the tokenizer has no {blank} token")
    segments = [_encode_piece(tokenizer, seg, first=i == 0) for i, seg in enumerate(parts[0::2])]
    blanks = parts[1::2]
    answers: list[list[int]] = []
    eop = tokenizer.eop_token_id
    for k, blank in enumerate(blanks):
        ids: list[int] = []
        for j, seg in enumerate(segments):
            ids += seg
            if j < len(blanks):
                if j < k:
                    ids += answers[j]
                else:
                    if j == k:
                        mask_pos = len(ids)
                    ids.append(ids_of[blanks[j]])
        ids.append(tokenizer.sop_token_id)
        limit = gmask_max_new_tokens if blank == "[gMASK]" else max_new_tokens
        out: list[int] = []
        for step in generate_stream(_BlankView(model, mask_pos), torch.tensor([ids]), max_new_tokens=limit,
                                    eos_token_id=eop, **generate_kwargs):
            tok = int(step[0])
            if tok == eop:
                break
            out.append(tok)
        answers.append(out)
    decoded = [tokenizer.decode(a) for a in answers]
    filled = "".join(seg + (decoded[i] if i < len(decoded) else "") for i, seg in enumerate(parts[0::2]))
    return FillResult(filled, decoded)


def _fill_original_glm(model, tokenizer, text: str, max_new_tokens: int, gmask_max_new_tokens: int,
                       generate_kwargs: dict) -> FillResult:
    """The original GLM: Part A = tokenizer(text); blank k's Part B after the earlier blanks' (see the module doc)."""
    needed = ("mask_token_ids", "sop_token_id", "eop_token_id", "gmask_token_id")
    if any(not hasattr(tokenizer, n) for n in needed):
        raise ValueError("the original GLM fills blanks with its own tokenizer (glmkit.load_tokenizer of the same "
                         f"folder); got {type(tokenizer).__name__}")
    if not BLANK_RE.search(text):
        text = text + "[gMASK]"
    ids = tokenizer.encode(text)  # [CLS] ... <|endoftext|>, as the hub's tokenizer(text)
    blanks = [i for i, t in enumerate(ids) if t in set(tokenizer.mask_token_ids)]
    if not blanks:
        raise ValueError("the text's blanks are not blank tokens of this tokenizer")
    sop, eop = tokenizer.sop_token_id, tokenizer.eop_token_id
    n = len(ids)
    part_b: list[int] = []
    part_b_pos: list[list[int]] = [[], []]
    answers: list[list[int]] = []
    for position in blanks:
        prompt = ids + part_b + [sop]
        positions = torch.tensor([[list(range(n)) + part_b_pos[0] + [position], [0] * n + part_b_pos[1] + [1]]])
        view = BlankInfillingView(model, positions, torch.tensor([n]))
        limit = gmask_max_new_tokens if ids[position] == tokenizer.gmask_token_id else max_new_tokens
        out: list[int] = []
        for step in generate_stream(view, torch.tensor([prompt]), max_new_tokens=limit, eos_token_id=eop,
                                    **generate_kwargs):
            tok = int(step[0])
            if tok == eop:
                break
            out.append(tok)
        answers.append(out)
        part_b += [sop] + out
        part_b_pos[0] += [position] * (len(out) + 1)
        part_b_pos[1] += list(range(1, len(out) + 2))
    decoded = [tokenizer.decode(a) for a in answers]
    parts = BLANK_RE.split(text)
    pieces = []
    for i, seg in enumerate(parts[0::2]):
        pieces.append(seg)
        if i < len(decoded):
            answer = decoded[i]
            if seg[-1:].isspace() and answer[:1].isspace():  # " at [MASK]" + " Beijing": one space
                answer = answer.lstrip()
            pieces.append(answer)
    return FillResult("".join(pieces), decoded)
