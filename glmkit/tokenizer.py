"""Tokenizers of the GLM family, read from the files each checkpoint publishes, plus a SentencePiece trainer.

Three layouts, one small surface (`encode`, `decode`, `__call__`, `convert_tokens_to_ids`, special-token ids):

- ChatGLM-6B (`ice_text.model`): SentencePiece over text whose newlines became `<n>`, tabs `<|tab|>` and runs of
  2..80 spaces `<|blank_k|>`. `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` are pieces of the model,
  every id is shifted by `num_image_tokens`, and `encode` appends `[gMASK] <sop>`. In text, `<sop> <eop> <unk> <pad>
  [MASK]` (transformers 4.27's special tokens of the class) are cut out together with the whitespace around them;
  `[gMASK]`, `[sMASK]`, `</s>`... are text for SentencePiece.
- ChatGLM2-6B / ChatGLM3-6B (`tokenizer.model`): plain SentencePiece; `[MASK] [gMASK] [sMASK] sop eop` (and ChatGLM3's
  role tokens) are numbered after the SentencePiece vocabulary, and `encode` prefixes `[gMASK] sop`. Their strings in
  text are text for SentencePiece (a piece spelled like one maps to the command id).
- GLM-4 (`tokenizer.model` holding base64 ranks): tiktoken byte-level BPE with GLM-4's split regex; special tokens and
  their ids come from `tokenizer_config.json` (`added_tokens_decoder`); in text they are cut out, whitespace kept.

Each class reproduces what the family's original `tokenization_chatglm.py` does through `PreTrainedTokenizer` of the
transformers version it ran with (tokenize -> pieces -> ids, then the family's special tokens; see `_split_on` for the
added-token rules); the ids of special tokens are always read from the files, never assumed. tests/data/special_tokens
holds ids produced by the original code.
"""

from __future__ import annotations

import abc
import argparse
import base64
import binascii
import io
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import sentencepiece as spm

from glmkit.core.hub import read_json_object, resolve_model_dir

# ---------------------------------------------------------------------------------------------------------- constants

CHATGLM_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
MAX_BLANK_LENGTH = 80
CHATGLM2_SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>"]
# GLM-4's pre-tokenizer (cl100k-like; digits in groups of up to 3).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZER_FILES = ["ice_text.model", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json"]


class TokenizerError(ValueError):
    """A tokenizer folder glmkit cannot read."""


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


TAB_TOKEN = "<|tab|>"


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied by ChatGLM-6B's decode under the transformers it pinned)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


class SplitRule(NamedTuple):
    """How transformers' slow tokenizer treats the whitespace around one no-split token (AddedToken's flags)."""

    lstrip: bool = False  # the token eats the whitespace before it
    rstrip: bool = False  # ... and after it
    single_word: bool = False  # only a token when not glued to a word (it joins the neighbouring text otherwise)


STRIP_BOTH = SplitRule(lstrip=True, rstrip=True)  # a special token given as a plain string, transformers < 4.34
KEEP_SPACES = SplitRule()  # an AddedToken with the default flags (added_tokens_decoder, transformers >= 4.34)


def _rule_of(value: Any, plain: SplitRule) -> SplitRule:
    """The rule of a token as a tokenizer config gives it: an AddedToken dict carries its flags, a string gets `plain`."""
    if isinstance(value, dict):
        return SplitRule(bool(value.get("lstrip", False)), bool(value.get("rstrip", False)),
                         bool(value.get("single_word", False)))
    return plain


def _split_on(text: str, specials: dict[str, SplitRule]) -> list[tuple[str, bool]]:
    """Splits text on no-split tokens as `PreTrainedTokenizer.tokenize` does before `_tokenize` sees the rest.

    1. The text is cut at every occurrence of a token (leftmost first, longest at a position: the added-token trie).
    2. For each token in order: `rstrip` strips the whitespace (`str.lstrip`) off the chunk after it, `lstrip` off
       the chunk before it; `single_word` glues the token to a neighbour that is not separated by a space, which
       makes the token plain text of that chunk.
    3. Empty chunks are dropped. Returns (chunk, is_special) pairs.

    transformers 4.27-4.33 (ChatGLM-6B pinned 4.27.1) strip both sides of special tokens given as plain strings;
    4.34+ keep the whitespace unless the AddedToken (tokenizer_config.json `added_tokens_decoder`) says otherwise.
    Strings that are not no-split tokens reach the model's own tokenizer as text (SentencePiece still matches its
    user-defined pieces there, whitespace included)."""
    specials = {s: r for s, r in specials.items() if s}
    if not text:
        return []
    if not specials or not any(s in text for s in specials):
        return [(text, False)]
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    chunks: list[str] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            chunks.append(text[pos:m.start()])
        chunks.append(m.group(0))
        pos = m.end()
    if pos < len(text):
        chunks.append(text[pos:])
    for i, token in enumerate(chunks):  # chunks change under the loop, as in transformers
        rule = specials.get(token)
        if rule is None:
            continue
        left = chunks[i - 1] if i > 0 else None
        right = chunks[i + 1] if i < len(chunks) - 1 else None
        if rule.rstrip and right:
            chunks[i + 1] = right.lstrip()
        if rule.lstrip and left:
            chunks[i - 1] = left.rstrip()
        if rule.single_word and left and left[-1] != " ":
            chunks[i - 1] += token
            chunks[i] = ""
        elif rule.single_word and right and right[0] != " ":
            chunks[i + 1] = token + chunks[i + 1]
            chunks[i] = ""
    return [(c, c in specials) for c in chunks if c]


def _added_tokens(cfg: dict[str, Any]) -> dict[str, tuple[int, SplitRule]]:
    """tokenizer_config.json's `added_tokens_decoder`: token -> (id, rule); transformers >= 4.34 splits all of them
    out of the text before the model's tokenizer runs."""
    out: dict[str, tuple[int, SplitRule]] = {}
    for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
        content = _token_str(tok, "")
        if content:
            out[content] = (int(idx), _rule_of(tok, KEEP_SPACES))
    return out


# ------------------------------------------------------------------------------------------------------- base class

class GLMTokenizerBase(abc.ABC):
    """What every family shares: batching with left padding, special-token bookkeeping, saving."""

    family: str = ""
    vocab_file_name: str = ""
    padding_side = "left"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        self.vocab_file = str(vocab_file)
        self.init_kwargs: dict[str, Any] = dict(config or {})
        self.name_or_path = str(Path(vocab_file).parent)
        self.clean_up_tokenization_spaces = False

    # -- each family provides these
    @abc.abstractmethod
    def tokenize(self, text: str) -> list[str]:
        ...

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        ...

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in _as_id_list(ids)]

    @abc.abstractmethod
    def _token_to_id(self, token: str) -> int:
        ...

    @abc.abstractmethod
    def _id_to_token(self, index: int) -> str:
        ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        ...

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_token_ids(self) -> set[int]:
        """Ids `decode(..., skip_special_tokens=True)` drops."""
        return {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.mask_token_id,
                            self.gmask_token_id, self.smask_token_id, self.sop_token_id, self.eop_token_id)
                if i is not None}

    @abc.abstractmethod
    def get_command(self, name: str) -> int:
        ...

    # -- batching
    def __call__(self, text_or_texts: str | Sequence[str], padding: bool | str = True, return_tensors: str | None = None,
                 add_special_tokens: bool = True, max_length: int | None = None) -> dict[str, Any]:
        """Encodes one text or a batch. Batches are LEFT padded with `pad_token_id` (attention_mask 0 = pad).

        `padding`: True / "longest" pads to the longest row, "max_length" pads to `max_length`, False pads nothing.
        A single string gives flat lists (or [1, T] tensors with return_tensors="pt"), as transformers does."""
        single = isinstance(text_or_texts, str)
        texts = [text_or_texts] if single else list(text_or_texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer(...) takes a string or a list of strings")
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        target = None
        if padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        input_ids, attention_mask = [], []
        for r in rows:
            n_pad = max(0, target - len(r)) if target is not None else 0
            if n_pad and self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token, so a batch of unequal lengths cannot be padded")
            input_ids.append([self.pad_token_id] * n_pad + r)
            attention_mask.append([0] * n_pad + [1] * len(r))
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in input_ids}) > 1:
                raise ValueError("rows have different lengths; pass padding=True to build a tensor")
            return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                    "attention_mask": torch.tensor(attention_mask, dtype=torch.long)}
        if single:
            return {"input_ids": input_ids[0], "attention_mask": attention_mask[0]}
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # -- saving
    def _config_to_save(self) -> dict[str, Any]:
        return dict(self.init_kwargs)

    def save_pretrained(self, save_directory: str | Path) -> list[str]:
        """Writes the vocabulary file and tokenizer_config.json in the family's published layout."""
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        vocab_out = out / self.vocab_file_name
        if Path(self.vocab_file).resolve() != vocab_out.resolve():
            shutil.copyfile(self.vocab_file, vocab_out)
        cfg_out = out / "tokenizer_config.json"
        cfg_out.write_text(json.dumps(self._config_to_save(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return [str(vocab_out), str(cfg_out)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, vocab_size={self.vocab_size}, path={self.name_or_path!r})"


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if out and isinstance(out[0], (list, tuple)):
        raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
    return [int(i) for i in out]


def _load_sp(path: str | Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({e}); the tokenizer folder looks corrupt") from None
    return sp


# ------------------------------------------------------------------------------------------------- ChatGLM-6B (v1)

class ChatGLMTokenizer(GLMTokenizerBase):
    """ChatGLM-6B: `ice_text.model` + tokenizer_config.json (`num_image_tokens`, special tokens)."""

    family = "chatglm"
    vocab_file_name = "ice_text.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(vocab_file, config)
        cfg = self.init_kwargs
        self.sp = _load_sp(vocab_file)
        # The original class defaults to 20000 image ids before the text ids; the "slim" checkpoint's config says 0.
        self.num_image_tokens = int(cfg.get("num_image_tokens", 20000))
        self.max_blank_length = MAX_BLANK_LENGTH
        self.do_lower_case = bool(cfg.get("do_lower_case", False))
        self.remove_space = bool(cfg.get("remove_space", False))
        # transformers 5 (glmkit's) does not clean up " ," / " ." in decode unless the config asks; the 4.27 that
        # ChatGLM-6B once pinned did. A tokenizer_config.json that sets the key decides.
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self.bos_token = _token_str(cfg.get("bos_token"), "<sop>")
        self.eos_token = _token_str(cfg.get("eos_token"), "<eop>")
        self.end_token = _token_str(cfg.get("end_token"), "</s>")
        self.mask_token = _token_str(cfg.get("mask_token"), "[MASK]")
        self.gmask_token = _token_str(cfg.get("gmask_token"), "[gMASK]")
        self.pad_token = _token_str(cfg.get("pad_token"), "<pad>")
        self.unk_token = _token_str(cfg.get("unk_token"), "<unk>")
        for needed in (self.gmask_token, self.bos_token, self.eos_token):
            if not self._has_piece(needed):
                raise TokenizerError(f"{vocab_file} has no piece {needed!r}; a ChatGLM-6B ice_text.model holds "
                                     f"{' '.join(CHATGLM_SPECIAL_PIECES)} as pieces")
        self.bos_token_id = self._token_to_id(self.bos_token)
        self.eos_token_id = self._token_to_id(self.eos_token)
        self.sop_token_id = self.bos_token_id
        self.eop_token_id = self._optional_id("<eop>")
        self.end_token_id = self._optional_id(self.end_token)
        self.mask_token_id = self._optional_id(self.mask_token)
        self.gmask_token_id = self._token_to_id(self.gmask_token)
        self.smask_token_id = self._optional_id("[sMASK]")
        self.pad_token_id = self._optional_id(self.pad_token)
        self.unk_token_id = self._token_to_id(self.unk_token)
        # What transformers 4.27.1 (pinned by ChatGLM-6B) does with the original class: only the SPECIAL_TOKENS_
        # ATTRIBUTES (bos <sop>, eos <eop>, unk, pad, mask [MASK], and sep/cls/additional_special_tokens when a config
        # names them) become no-split tokens. They are cut out of the text and, given as plain strings, strip the
        # whitespace on both sides; every remaining chunk is preprocessed and gets SentencePiece's dummy prefix on its
        # own. `gmask_token` / `end_token` are only kwargs of the class: "[gMASK]", "[sMASK]", "</s>"... stay text
        # for SentencePiece (which matches them only where the model makes them user-defined pieces).
        no_split: dict[str, SplitRule] = {}
        for attr, default in (("bos_token", "<sop>"), ("eos_token", "<eop>"), ("unk_token", "<unk>"),
                              ("sep_token", None), ("pad_token", "<pad>"), ("cls_token", None),
                              ("mask_token", "[MASK]")):
            value = cfg.get(attr, default)
            if value is not None:
                no_split.setdefault(_token_str(value, ""), _rule_of(value, STRIP_BOTH))
        for value in cfg.get("additional_special_tokens") or []:
            no_split.setdefault(_token_str(value, ""), _rule_of(value, STRIP_BOTH))
        # A special token that is no piece of the model would get an id past the vocabulary there; glmkit keeps
        # such a string as text instead.
        self._no_split = {t: r for t, r in no_split.items() if t and self._has_piece(t)}
        self._hf_special_tokens = list(self._no_split)  # dropped by decode(skip_special_tokens=True)

    def _has_piece(self, piece: str) -> bool:
        pid = self.sp.PieceToId(piece)
        return self.sp.IdToPiece(pid) == piece

    def _optional_id(self, piece: str) -> int | None:
        return self._token_to_id(piece) if self._has_piece(piece) else None

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.GetPieceSize()

    # -- text <-> pieces
    def _preprocess(self, text: str, linebreak: bool = True, whitespaces: bool = True) -> str:
        if linebreak:
            text = text.replace("\n", "<n>")
        if whitespaces:
            text = text.replace("\t", TAB_TOKEN)
            for i in range(self.max_blank_length, 1, -1):  # longest run first
                text = text.replace(" " * i, blank_token(i))
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace(TAB_TOKEN, "\t")
        for i in range(2, self.max_blank_length + 1):
            text = text.replace(blank_token(i), " " * i)
        return text

    def _prepare_text(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def sp_encode(self, text: str, add_dummy_prefix: bool = True, out_type: type = int) -> list:
        """The original SPTokenizer.encode/tokenize: preprocess, then SentencePiece. Without the dummy prefix, the
        text is encoded after a `<n>` and the first two pieces (the prefix '▁' and `<n>`) are dropped."""
        text = self._preprocess(self._prepare_text(text))
        if not add_dummy_prefix:
            text = "<n>" + text
        out = self.sp.encode(text, out_type=out_type)
        if out_type is int:
            out = [i + self.num_image_tokens for i in out]
        return out if add_dummy_prefix else out[2:]

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        if self.do_lower_case:  # transformers lowercases all but the no-split tokens before it splits
            text = "".join(c if special else c.lower() for c, special in
                           _split_on(text, dict.fromkeys(self._no_split, KEEP_SPACES)))
        return _split_on(text, self._no_split)

    def tokenize(self, text: str) -> list[str]:
        pieces: list[str] = []
        for chunk, special in self._segments(text):
            pieces.extend([chunk] if special else self.sp_encode(chunk, out_type=str))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The original's `encode`: tokenize (no-split tokens cut out, whitespace around them stripped, SentencePiece
        on each chunk), pieces -> ids, then `[gMASK] <sop>` appended."""
        ids: list[int] = []
        for chunk, special in self._segments(text):
            ids.extend([self._token_to_id(chunk)] if special else self.sp_encode(chunk))
        if add_special_tokens:
            ids = ids + [self.gmask_token_id, self.bos_token_id]
        return ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """As the original: pad ids are removed, the pieces are joined by SentencePiece (control pieces such as
        <eop> vanish there if the model marks them CONTROL), then `<n>`/tab/blank tokens become whitespace."""
        ids = _as_id_list(ids)
        if not ids:
            return ""
        if self.pad_token_id is not None:
            ids = [i for i in ids if i != self.pad_token_id]
        if skip_special_tokens:
            drop = {self._token_to_id(t) for t in self._hf_special_tokens} | self.special_token_ids
            if self.end_token_id is not None:
                drop.add(self.end_token_id)
            ids = [i for i in ids if i not in drop]
        pieces = [self._id_to_token(i) for i in ids]
        text = self._postprocess(self.sp.decode_pieces(pieces))
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            return int(token[7:-1])
        return self.sp.PieceToId(token) + self.num_image_tokens

    def _id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        if index >= self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.IdToPiece(index - self.num_image_tokens)

    def get_command(self, name: str) -> int:
        names = {"[MASK]": self.mask_token_id, "[gMASK]": self.gmask_token_id, "[sMASK]": self.smask_token_id,
                 "<sop>": self.sop_token_id, "sop": self.sop_token_id, "<eop>": self.eop_token_id,
                 "eop": self.eop_token_id, "<pad>": self.pad_token_id, "<eos>": self.eos_token_id,
                 "<bos>": self.bos_token_id, "</s>": self.end_token_id}
        if names.get(name) is None:
            raise KeyError(f"{name!r} is not a command token of this ChatGLM-6B tokenizer; it has "
                           f"{sorted(k for k, v in names.items() if v is not None)} (no role tokens in ChatGLM-6B)")
        return names[name]

    def _config_to_save(self) -> dict[str, Any]:
        cfg = {
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "bos_token": self.bos_token, "eos_token": self.eos_token, "end_token": self.end_token,
            "mask_token": self.mask_token, "gmask_token": self.gmask_token, "pad_token": self.pad_token,
            "unk_token": self.unk_token, "padding_side": "left", "remove_space": self.remove_space,
            "do_lower_case": self.do_lower_case, "num_image_tokens": self.num_image_tokens,
        }
        return {**self.init_kwargs, **cfg}


def _token_str(value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return str(value.get("content", default))
    return str(value)


# ------------------------------------------------------------------------------------------ ChatGLM2-6B / ChatGLM3-6B

class ChatGLM2Tokenizer(GLMTokenizerBase):
    """ChatGLM2-6B / ChatGLM3-6B: `tokenizer.model` with command tokens numbered after the SentencePiece vocab."""

    vocab_file_name = "tokenizer.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None, family: str = "chatglm2") -> None:
        super().__init__(vocab_file, config)
        if family not in ("chatglm2", "chatglm3"):
            raise ValueError(f"family must be 'chatglm2' or 'chatglm3', got {family!r}")
        self.family = family
        self.sp = _load_sp(vocab_file)
        self.clean_up_tokenization_spaces = bool(self.init_kwargs.get("clean_up_tokenization_spaces", False))
        n = self.sp.vocab_size()
        specials = CHATGLM2_SPECIAL_TOKENS + (CHATGLM3_ROLE_TOKENS if family == "chatglm3" else [])
        self.special_tokens = {tok: n + i for i, tok in enumerate(specials)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.n_words = n + len(specials)
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token_id = self.sp.eos_id()
        if self.eos_token_id < 0:
            raise TokenizerError(f"{vocab_file} has no eos piece; ChatGLM2/3 stop on SentencePiece's eos id")
        self.pad_token_id = self.sp.unk_id()  # ChatGLM2/3 pad with the unk id
        self.unk_token_id = self.sp.unk_id()
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.smask_token_id = self.special_tokens["[sMASK]"]
        self.sop_token_id = self.special_tokens["sop"]
        self.eop_token_id = self.special_tokens["eop"]
        # The original (transformers 4.30, ChatGLM2-6B's pin; ChatGLM3-6B ran 4.30-4.40 with the same result) has no
        # no-split tokens (its unk/pad/eos are read-only properties, its command tokens no transformers specials):
        # "[gMASK]", "<|user|>", "sop"... inside text are plain text for SentencePiece, whitespace and all. Only a
        # config carrying `added_tokens_decoder` (transformers >= 4.34) makes transformers split tokens out.
        self._added = _added_tokens(self.init_kwargs)
        self._no_split = {t: r for t, (_, r) in self._added.items()}

    @property
    def vocab_size(self) -> int:
        return self.n_words

    @property
    def special_token_ids(self) -> set[int]:
        return set(self.index_special_tokens) | {i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id)
                                                 if i is not None}

    def tokenize(self, text: str) -> list[str]:
        pieces: list[str] = []
        for chunk, special in _split_on(text, self._no_split):
            pieces.extend([chunk] if special else self.sp.encode(chunk, out_type=str))
        return pieces

    def sp_encode(self, text: str) -> list[int]:
        """SentencePiece ids of text, no command tokens (the original SPTokenizer.encode)."""
        return self.sp.encode(text)

    def _piece_id(self, piece: str) -> int:
        # The original maps pieces through `convert_token_to_id`, which looks at the command tokens first: a
        # SentencePiece piece spelled "sop" or "[MASK]" gets the command id, not its own.
        if piece in self._added:
            return self._added[piece][0]
        return self.special_tokens[piece] if piece in self.special_tokens else self.sp.PieceToId(piece)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The original's `encode`: SentencePiece pieces of the text, each piece -> id (command tokens first), then
        `[gMASK] sop` in front."""
        ids = [self._piece_id(p) for p in self.tokenize(text)]
        return [self.gmask_token_id, self.sop_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """As the original through transformers: bos/eos/pad(=unk) become empty pieces; ChatGLM2's command tokens
        decode to nothing, ChatGLM3's to their text (`<|user|>`...) unless skip_special_tokens."""
        ids = _as_id_list(ids)
        out: list[str] = []
        buffer: list[str] = []
        for i in ids:
            if i in self.index_special_tokens:
                if self.family == "chatglm3" and not skip_special_tokens:
                    if buffer:
                        out.append(self.sp.decode_pieces(buffer))
                        buffer = []
                    out.append(self.index_special_tokens[i])
                continue
            if i in (self.eos_token_id, self.bos_token_id, self.pad_token_id) or i < 0:
                continue
            if i >= self.sp.vocab_size():
                raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            buffer.append(self.sp.IdToPiece(i))
        if buffer:
            out.append(self.sp.decode_pieces(buffer))
        text = "".join(out)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp.PieceToId(token)

    def _id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index in (self.eos_token_id, self.bos_token_id, self.pad_token_id) or index < 0:
            return ""
        if index >= self.sp.vocab_size():
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.IdToPiece(index)

    def get_command(self, name: str) -> int:
        aliases = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id,
                   "<sop>": self.sop_token_id, "<eop>": self.eop_token_id}
        if name in self.special_tokens:
            return self.special_tokens[name]
        if aliases.get(name) is not None:
            return aliases[name]
        raise KeyError(f"{name!r} is not a command token of this {self.family} tokenizer; it has "
                       f"{list(self.special_tokens) + ['<bos>', '<eos>', '<pad>']}")

    def _config_to_save(self) -> dict[str, Any]:
        cfg = {
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "padding_side": "left", "remove_space": False, "do_lower_case": False,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "glmkit_family": self.family,
        }
        return {**self.init_kwargs, **cfg}


# --------------------------------------------------------------------------------------------------------- GLM-4

class GLM4Tokenizer(GLMTokenizerBase):
    """GLM-4: tiktoken over `tokenizer.model` (lines of `base64(token) rank`), special tokens from the config."""

    family = "glm4"
    vocab_file_name = "tokenizer.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(vocab_file, config)
        import tiktoken

        self.mergeable_ranks = read_tiktoken_ranks(vocab_file)
        self.decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.n_words = len(self.decoder)
        self.clean_up_tokenization_spaces = bool(self.init_kwargs.get("clean_up_tokenization_spaces", False))
        self.special_tokens = self._read_special_tokens()
        self.index_special_tokens = {i: t for t, i in self.special_tokens.items()}
        clash = [i for i in self.index_special_tokens if i in self.decoder]
        if clash:
            raise TokenizerError(f"special token ids {clash[:5]} collide with ranks in {vocab_file}")
        self.tokenizer = tiktoken.Encoding(name=f"glmkit-glm4-{id(self)}", pat_str=GLM4_PATTERN,
                                           mergeable_ranks=self.mergeable_ranks, special_tokens={})
        cfg = self.init_kwargs
        self.eos_token = _token_str(cfg.get("eos_token"), "<|endoftext|>")
        self.pad_token = _token_str(cfg.get("pad_token"), "<|endoftext|>")
        st = self.special_tokens
        self.eos_token_id = st.get(self.eos_token)
        self.pad_token_id = st.get(self.pad_token)
        self.bos_token_id = None
        self.mask_token_id = st.get("[MASK]")
        self.gmask_token_id = st.get("[gMASK]")
        self.smask_token_id = st.get("[sMASK]")
        self.sop_token_id = st.get("<sop>")
        self.eop_token_id = st.get("<eop>")
        for needed in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>"):
            if needed not in st:
                raise TokenizerError(f"the GLM-4 tokenizer config in {Path(vocab_file).parent} lacks {needed!r}")
        if self.eos_token_id is None:
            raise TokenizerError(f"eos token {self.eos_token!r} is not one of the special tokens {sorted(st)}")
        # The original runs on transformers >= 4.40: every token of `added_tokens_decoder` is cut out of the text
        # before tiktoken sees it, keeping the whitespace around it unless its lstrip/rstrip/single_word flags say
        # otherwise; special-token attributes the config names (eos_token, pad_token, additional_special_tokens...)
        # are added the same way. A folder without a config splits nothing: the strings are text for tiktoken.
        no_split = {t: r for t, (_, r) in _added_tokens(cfg).items()}
        named = [cfg.get(a) for a in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                      "mask_token")] + list(cfg.get("additional_special_tokens") or [])
        for value in named:
            if value is not None and _token_str(value, "") in st:
                no_split.setdefault(_token_str(value, ""), _rule_of(value, KEEP_SPACES))
        self._no_split = {t: r for t, r in no_split.items() if t in st}

    def _read_special_tokens(self) -> dict[str, int]:
        decoder = self.init_kwargs.get("added_tokens_decoder")
        if decoder:
            out = {}
            for idx, tok in decoder.items():
                out[_token_str(tok, "")] = int(idx)
            return out
        # Without added_tokens_decoder, GLM-4's tokens follow the ranks in their published order.
        return {tok: self.n_words + i for i, tok in enumerate(GLM4_SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return max([self.n_words - 1, *self.index_special_tokens]) + 1

    @property
    def special_token_ids(self) -> set[int]:
        return set(self.index_special_tokens)

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        return _split_on(text, self._no_split)

    def tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for chunk, special in self._segments(text):
            if special:
                out.append(chunk)
            else:
                out.extend(self.decoder[i].decode("utf-8", errors="replace")
                           for i in self.tokenizer.encode_ordinary(chunk))
        return out

    def sp_encode(self, text: str) -> list[int]:
        """Byte-level BPE ids of text, special-token strings treated as plain text (GLM-4's `tokenizer.encode`)."""
        return self.tokenizer.encode_ordinary(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for chunk, special in self._segments(text):
            ids.extend([self.special_tokens[chunk]] if special else self.tokenizer.encode_ordinary(chunk))
        return [self.gmask_token_id, self.sop_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = b""
        for i in _as_id_list(ids):
            if i in self.index_special_tokens:
                if skip_special_tokens:
                    continue
                if buf:
                    parts.append(buf.decode("utf-8", errors="replace"))
                    buf = b""
                parts.append(self.index_special_tokens[i])
            elif i in self.decoder:
                buf += self.decoder[i]
            else:
                raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if buf:
            parts.append(buf.decode("utf-8", errors="replace"))
        text = "".join(parts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key not in self.mergeable_ranks:
            raise KeyError(f"{token!r} is not a token of this GLM-4 tokenizer")
        return self.mergeable_ranks[key]

    def _id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index not in self.decoder:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return self.decoder[index].decode("utf-8", errors="replace")

    def get_command(self, name: str) -> int:
        aliases = {"sop": "<sop>", "eop": "<eop>", "<eos>": self.eos_token, "<pad>": self.pad_token}
        key = aliases.get(name, name)
        if key not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token of this GLM-4 tokenizer; it has {sorted(self.special_tokens)}")
        return self.special_tokens[key]

    def _config_to_save(self) -> dict[str, Any]:
        cfg = {
            "tokenizer_class": "ChatGLM4Tokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
            "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for i, t in sorted(self.index_special_tokens.items())},
            "additional_special_tokens": [t for _, t in sorted(self.index_special_tokens.items())
                                          if t.startswith("<|") and t != self.eos_token],
            "eos_token": self.eos_token, "pad_token": self.pad_token, "padding_side": "left",
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "do_lower_case": False, "remove_space": False,
        }
        return {**self.init_kwargs, **cfg}


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}:{n} is not a 'base64-token rank' line; the GLM-4 tokenizer.model "
                                     "looks corrupt") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no ranks")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


# ------------------------------------------------------------------------------------------------------- loading

Tokenizer = ChatGLMTokenizer | ChatGLM2Tokenizer | GLM4Tokenizer


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096).strip()
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except binascii.Error:
        return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError) if path.exists() else {}


def _chatglm2_or_3(folder: Path, cfg: dict[str, Any]) -> str:
    if cfg.get("glmkit_family") in ("chatglm2", "chatglm3"):
        return cfg["glmkit_family"]
    text = json.dumps(cfg, ensure_ascii=False)
    model_cfg = _read_json(folder / "config.json")
    names = " ".join(str(x) for x in (cfg.get("name_or_path"), cfg.get("_name_or_path"), model_cfg.get("_name_or_path"),
                                      model_cfg.get("name"), model_cfg.get("family")) if x)
    if "<|user|>" in text or "chatglm3" in names.lower():
        return "chatglm3"
    return "chatglm2"


def load_tokenizer(path_or_id: str | os.PathLike, family: str | None = None) -> Tokenizer:
    """Loads the tokenizer of a local folder, the bundled model ("glm-tiny") or a Hugging Face id.

    The family is detected from the files: `ice_text.model` -> ChatGLM-6B; a SentencePiece `tokenizer.model` ->
    ChatGLM2 (ChatGLM3 when the config names its role tokens); a base64-ranks `tokenizer.model` -> GLM-4.
    `family` ("chatglm2" / "chatglm3") overrides the ChatGLM2-vs-3 guess."""
    if Path(path_or_id).expanduser().is_file():
        raise TokenizerError(f"{path_or_id} is a file; pass the folder that holds it (ice_text.model or "
                             "tokenizer.model plus tokenizer_config.json)")
    folder = resolve_model_dir(path_or_id, allow_patterns=TOKENIZER_FILES)
    cfg = _read_json(folder / "tokenizer_config.json")
    if (folder / "ice_text.model").is_file():
        if family not in (None, "chatglm"):
            raise ValueError(f"{folder} holds a ChatGLM-6B tokenizer (ice_text.model), not family {family!r}")
        return ChatGLMTokenizer(folder / "ice_text.model", cfg)
    model = folder / "tokenizer.model"
    if model.is_file():
        if model.stat().st_size == 0:
            raise TokenizerError(f"{model} is empty; the tokenizer folder looks corrupt")
        if _looks_like_tiktoken(model):
            if family not in (None, "glm4"):
                raise ValueError(f"{folder} holds a GLM-4 (tiktoken) tokenizer, not family {family!r}")
            return GLM4Tokenizer(model, cfg)
        fam = family or _chatglm2_or_3(folder, cfg)
        return ChatGLM2Tokenizer(model, cfg, family=fam)
    raise FileNotFoundError(f"no tokenizer in {folder}: expected ice_text.model (ChatGLM-6B) or tokenizer.model "
                            "(ChatGLM2/3 SentencePiece, GLM-4 tiktoken ranks)")


# ------------------------------------------------------------------------------------------------------- training

def _iter_input_texts(paths: Sequence[str | Path]) -> Iterator[str]:
    """Texts from JSON Lines files (a "text" field per row) or plain text files."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"training input {path} does not exist")
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
            f.seek(0)
            is_jsonl = path.suffix in (".jsonl", ".json") or first.lstrip().startswith("{")
            if not is_jsonl:
                yield f.read()
                continue
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n} is not valid JSON (JSON Lines inputs need one object per line "
                                     "with a 'text' field)") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n} has no string 'text' field")
                yield row["text"]


def _training_sentences(paths: Sequence[str | Path], family: str, max_bytes: int, seed: int,
                        max_sentences: int) -> list[str]:
    """Lines for the SentencePiece trainer. Newlines end sentences (they become `<n>` / byte pieces at run time);
    for ChatGLM-6B runs of spaces and tabs are folded, because `<|blank_k|>` / `<|tab|>` take them at run time."""
    sentences: list[str] = []
    for text in _iter_input_texts(paths):
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if family == "chatglm":
                line = re.sub(r"[ \t]{2,}|\t", " ", line).strip()
            if not line.strip():
                continue
            while len(line.encode("utf-8")) > max_bytes:  # long lines are cut, not dropped
                cut = max_bytes // 4
                sentences.append(line[:cut])
                line = line[cut:]
            sentences.append(line)
    if not sentences:
        raise ValueError(f"no text found in {list(map(str, paths))}")
    if len(sentences) > max_sentences:
        rng = random.Random(seed)
        sentences = rng.sample(sentences, max_sentences)
    return sentences


def train_tokenizer(inputs: Sequence[str | Path], vocab_size: int, family: str, output_dir: str | Path, *,
                    model_type: str = "bpe", character_coverage: float = 0.9995, max_sentences: int = 300_000,
                    seed: int = 0, num_threads: int | None = None) -> Tokenizer:
    """Trains a SentencePiece tokenizer and writes it in `family`'s published layout; returns it loaded.

    `vocab_size` is the size of the whole id space (`len(tokenizer)`, what the model's embedding needs):
    - chatglm: `ice_text.model` = `<unk> <s> </s> <pad> <n>` + learned pieces + `[MASK] [gMASK] [sMASK] <unused_0>
      <sop> <eop> <ENC> <dBLOCK>` (control) + `<|tab|> <|blank_2|>..<|blank_80|>` (user-defined) + 256 byte pieces,
      the piece order of the published ChatGLM-6B model; `num_image_tokens` 0.
    - chatglm2 / chatglm3: `tokenizer.model` = `<unk> <s> </s>` + 256 byte pieces + learned pieces; the 5 (9)
      command tokens follow the SentencePiece vocabulary.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if family not in ("chatglm", "chatglm2", "chatglm3"):
        raise ValueError(f"family must be chatglm, chatglm2 or chatglm3 (GLM-4 tokenizers are tiktoken), got {family!r}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    extra = {"chatglm": len(CHATGLM_SPECIAL_PIECES) + 1 + (MAX_BLANK_LENGTH - 1) + 256,
             "chatglm2": len(CHATGLM2_SPECIAL_TOKENS),
             "chatglm3": len(CHATGLM2_SPECIAL_TOKENS) + len(CHATGLM3_ROLE_TOKENS)}[family]
    sp_size = vocab_size - extra
    minimum = 64 if family == "chatglm" else 64 + 256 + 3
    if sp_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for a {family} tokenizer: its fixed pieces take "
                         f"{extra}{' + 259 byte/meta pieces' if family != 'chatglm' else ''} ids; use at least "
                         f"{minimum + extra}")
    max_bytes = 4096
    sentences = _training_sentences(inputs, family, max_bytes, seed, max_sentences)
    common = dict(
        vocab_size=sp_size, model_type=model_type, character_coverage=character_coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=max_bytes,
        input_sentence_size=len(sentences), shuffle_input_sentence=True, hard_vocab_limit=False,
        num_threads=num_threads or max(1, min(4, os.cpu_count() or 1)), minloglevel=2, seed_sentencepiece_size=200_000,
        unk_id=0, bos_id=1, eos_id=2, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    )
    if family == "chatglm":
        # byte pieces are appended after training so that the published order (bytes last) holds
        common.update(pad_id=3, pad_piece="<pad>", user_defined_symbols=["<n>"], byte_fallback=False)
    else:
        common.update(pad_id=-1, byte_fallback=True)
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)  # SentencePiece's own sampling/shuffling, for reproducible tokenizers
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, **common)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    if family == "chatglm":
        Piece = pb.ModelProto.SentencePiece
        for tok in CHATGLM_SPECIAL_PIECES:
            proto.pieces.append(Piece(piece=tok, score=0.0, type=Piece.CONTROL))
        for tok in [TAB_TOKEN] + [blank_token(i) for i in range(2, MAX_BLANK_LENGTH + 1)]:
            proto.pieces.append(Piece(piece=tok, score=0.0, type=Piece.USER_DEFINED))
        for b in range(256):
            proto.pieces.append(Piece(piece=f"<0x{b:02X}>", score=0.0, type=Piece.BYTE))
        proto.trainer_spec.byte_fallback = True
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "chatglm":
        model_path = out / "ice_text.model"
        cfg: dict[str, Any] = {"num_image_tokens": 0}
    else:
        model_path = out / "tokenizer.model"
        cfg = {"glmkit_family": family}
    model_path.write_bytes(proto.SerializeToString())
    tok = ChatGLMTokenizer(model_path, cfg) if family == "chatglm" else ChatGLM2Tokenizer(model_path, cfg, family)
    tok.save_pretrained(out)
    return load_tokenizer(out)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmkit tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece tokenizer in a ChatGLM family's file layout",
                        description="Train a SentencePiece tokenizer (byte fallback, the family's special pieces) "
                                    "and write it in the family's layout: ice_text.model + tokenizer_config.json "
                                    "(chatglm) or tokenizer.model + tokenizer_config.json (chatglm2/chatglm3).")
    tr.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="training text: JSON Lines files with a 'text' field, or plain text files")
    tr.add_argument("--vocab-size", type=int, required=True,
                    help="size of the whole id space (len(tokenizer)), special and byte pieces included")
    tr.add_argument("--family", choices=["chatglm", "chatglm2", "chatglm3"], default="chatglm")
    tr.add_argument("--output", required=True, metavar="DIR", help="folder to write the tokenizer to")
    tr.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tr.add_argument("--character-coverage", type=float, default=0.9995)
    tr.add_argument("--max-sentences", type=int, default=300_000,
                    help="lines sampled from the inputs for training (keeps training fast)")
    tr.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.family, args.output, model_type=args.model_type,
                              character_coverage=args.character_coverage, max_sentences=args.max_sentences,
                              seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit tokenizer train: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {tok.family} tokenizer with {len(tok)} ids to {args.output}")
    return 0
