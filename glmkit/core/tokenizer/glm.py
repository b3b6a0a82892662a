"""The original GLM's tokenizers (THUDM's hub `tokenization_glm.py`), as transformers' slow tokenizer runs them.

- GLMChineseTokenizer (glm-large-chinese, glm-10b-chinese): SentencePiece `cog-pretrain.model` (50000 pieces).
- GLMGPT2Tokenizer (glm-2b, glm-10b): GPT-2's byte-level BPE, `vocab.json` + `merges.txt`.

Both are `PreTrainedTokenizer`s whose only own rules are `tokenizer(text) = [CLS] ... <|endoftext|>` and the pieces;
everything else is transformers' (4.26-4.33, the releases the hub code runs on), which glmkit reproduces here:

- Ids: the base vocabulary, then `added_tokens.json` (its ids must follow the vocabulary without gaps, which
  transformers checks), then every special token of `special_tokens_map.json` / `tokenizer_config.json` that is still
  unknown, in transformers' attribute order (bos, eos, unk, sep, pad, cls, mask, additional). A token is only added
  when it is not the unk token and the vocabulary maps it to the unk token's id. So the command-token ids come from
  the files: glm-large-chinese's `<|endoftext|>` 50000, `[SEP]` 50001, `[CLS]` 50002, `[MASK]` 50003,
  `<|startofpiece|>` 50006, `<|endofpiece|>` 50007, `[sMASK]` 50008, `[gMASK]` 50009. GLM-10B-Chinese was trained
  with `[gMASK]` = 50007, the id of `<|endofpiece|>` (THUDM/GLM#55); its hub conversion copied embedding row 50007 to
  50009 and its tokenizer files give `[gMASK]` 50009, which glmkit reads like any other id.
- Text: the no-split tokens (added and special tokens) are cut out first (`split_on`); a special token given as a
  plain string eats the whitespace on both sides, an AddedToken (GPT-2's `<|endoftext|>`) only what its
  lstrip/rstrip say; every other chunk goes to SentencePiece / the byte-level BPE (GPT-2's regex, then merges; the
  `tokenizers` library runs them, with the merges read as GPT2Tokenizer reads merges.txt: its first line skipped).
- decode: runs of vocabulary pieces are detokenized together, every added token stands alone, the parts are joined
  by single spaces, then transformers' clean-up of " ." / " ," / " n't" spaces. So `decode(tokenizer(t))` of
  glm-large-chinese reads "[CLS] ... <|endoftext|>", while GPT-2's `<|endoftext|>` (a vocabulary piece) sticks to
  the text before it.

Batches are padded on the right, as the hub tokenizer (transformers' default) pads them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from glmkit.core.atomic import atomic_path, write_json
from glmkit.core.hub import read_json_object
from glmkit.core.tokenizer.base import (
    STRIP_BOTH,
    GLMTokenizerBase,
    SplitRule,
    TokenizerError,
    as_id_list,
    clean_up_tokenization,
    load_sp,
    rule_of,
    split_on,
    token_str,
)

SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"
CHINESE_VOCAB = "cog-pretrain.model"
GPT2_VOCAB, GPT2_MERGES = "vocab.json", "merges.txt"
TOKENIZER_CLASSES = ("GLMChineseTokenizer", "GLMGPT2Tokenizer")


class _Special:
    """A special-token value as transformers holds it: its text and, for an AddedToken, its split rule."""

    def __init__(self, value: Any) -> None:
        self.text = token_str(value, "")
        # transformers < 4.34's slow tokenize reads only lstrip/rstrip of an AddedToken (single_word is ignored)
        self.rule = SplitRule(*rule_of(value, STRIP_BOTH)[:2]) if isinstance(value, dict) else None

    def __repr__(self) -> str:
        return repr(self.text)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError) if path.exists() else {}


class GLMHubTokenizer(GLMTokenizerBase):
    """What both GLM tokenizers share: transformers' added/special-token bookkeeping over a base vocabulary."""

    family = "glm"
    padding_side = "right"
    tokenizer_class = ""
    class_defaults: ClassVar[dict[str, Any]] = {}  # special tokens the class sets when the config names none

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        super().__init__(folder / self.vocab_file_name, config)
        self.folder = folder
        cfg = self.init_kwargs
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", True))
        # special tokens: the class defaults, then tokenizer_config.json (init kwargs), then special_tokens_map.json
        self._specials: dict[str, _Special | None] = {a: None for a in SPECIAL_ATTRIBUTES}
        self._additional: list[_Special] = []
        # (the class's __init__ sees the first two and may wrap them; the map is set afterwards, as given)
        for n, source in enumerate((self.class_defaults, cfg, _read_json(folder / "special_tokens_map.json"))):
            for attr in SPECIAL_ATTRIBUTES:
                if source.get(attr) is not None:
                    value = source[attr]
                    self._specials[attr] = self._wrap(attr, value) if n < 2 else _Special(value)
            if source.get("additional_special_tokens") is not None:
                self._additional = [_Special(v) for v in source["additional_special_tokens"]]
        self.added_tokens_encoder: dict[str, int] = {}
        self.added_tokens_decoder: dict[int, str] = {}
        self._no_split_set: set[str] = set()
        self._load_added_tokens(folder / "added_tokens.json")
        self._add_tokens(self.all_special_tokens, special=True)  # transformers' sanitize_special_tokens
        rules = {s.text: s.rule for s in self._special_values() if s.rule is not None}
        self._no_split = {t: rules.get(t, STRIP_BOTH) for t in self._no_split_set}

        self.cls_token_id = self._optional_id(self._text("cls_token"))
        self.eos_token_id = self._optional_id(self._text("eos_token"))
        self.pad_token_id = self._optional_id(self._text("pad_token"))
        self.bos_token_id = self._optional_id(self._text("bos_token"))
        self.sep_token_id = self._optional_id(self._text("sep_token"))
        self.unk_token_id = self._optional_id(self._text("unk_token"))
        self.mask_token_id = self._optional_id(self._text("mask_token"))
        self.sop_token_id = self._optional_id(SOP)
        self.eop_token_id = self._optional_id(EOP)
        self.gmask_token_id = self._optional_id("[gMASK]")
        self.smask_token_id = self._optional_id("[sMASK]")
        for name in ("cls_token_id", "eos_token_id", "sop_token_id", "eop_token_id", "mask_token_id"):
            if getattr(self, name) is None:
                raise TokenizerError(f"the GLM tokenizer in {folder} has no {name.removesuffix('_id')} "
                                     f"({self._text(name.removesuffix('_id')) or '?'}); the hub files name "
                                     "[CLS], <|endoftext|>, [MASK], <|startofpiece|> and <|endofpiece|>")

    # ------------------------------------------------------------------ what each backend provides
    def _wrap(self, attr: str, value: Any) -> _Special:
        return _Special(value)

    def _base_size(self) -> int:
        raise NotImplementedError

    def _base_id(self, token: str) -> int | None:
        """The vocabulary's id for a token (transformers' `_convert_token_to_id`)."""
        raise NotImplementedError

    def _base_token(self, index: int) -> str:
        raise NotImplementedError

    def _pieces(self, text: str) -> list[str]:
        raise NotImplementedError

    def _pieces_to_text(self, pieces: list[str]) -> str:
        raise NotImplementedError

    def _prepare(self, text: str) -> str:
        return text

    # ------------------------------------------------------------------ transformers' bookkeeping
    def _special_values(self) -> list[_Special]:
        values = [s for s in (self._specials[a] for a in SPECIAL_ATTRIBUTES) if s is not None] + self._additional
        return values

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(s.text for s in self._special_values()))

    def _text(self, attr: str) -> str | None:
        s = self._specials.get(attr)
        return s.text if s is not None else None

    def _convert(self, token: str | None) -> int | None:
        """transformers' convert_tokens_to_ids for one token: added tokens first, then the vocabulary."""
        if token is None:
            return None
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self._base_id(token)

    def _add_tokens(self, tokens: list[str], special: bool) -> None:
        """transformers' `_add_tokens`: a token joins the vocabulary when it is not the unk token and the vocabulary
        maps it to the unk token's id; special tokens are no-split tokens whether added or not."""
        unk = self._text("unk_token")
        unk_id = self._convert(unk)
        new: list[str] = []
        for tok in tokens:
            if tok != unk and self._convert(tok) == unk_id and tok not in new:
                new.append(tok)
        for tok in new:
            index = len(self)
            self.added_tokens_encoder[tok] = index
            self.added_tokens_decoder[index] = tok
        self._no_split_set.update(tokens if special else new)

    def _load_added_tokens(self, path: Path) -> None:
        added = _read_json(path)
        if not added:
            return
        special = set(self.all_special_tokens)
        batch: list[str] = []
        last: bool | None = None
        for token, index in sorted(added.items(), key=lambda kv: kv[1]):
            expected = len(self) + len(batch)
            if index != expected:
                raise TokenizerError(f"{path}: non-consecutive added token {token!r}: it should have id {expected} "
                                     f"but has {index} (transformers refuses this folder too)")
            is_special = token in special
            if last is None or last == is_special:
                batch.append(token)
            else:
                self._add_tokens(batch, last)
                batch = [token]
            last = is_special
        if batch:
            self._add_tokens(batch, bool(last))

    def _optional_id(self, token: str | None) -> int | None:
        """The id of a token the tokenizer knows (added or a vocabulary piece); None when it would only map to unk."""
        if token is None:
            return None
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        index = self._base_id(token)
        if index is None or (token != self._text("unk_token") and index == self._convert(self._text("unk_token"))):
            return None
        return index

    def __len__(self) -> int:
        return self._base_size() + len(self.added_tokens_encoder)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size (pieces / vocab.json), as the hub class reports it; len() adds the added
        tokens."""
        return self._base_size()

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i in (self._convert(t) for t in self.all_special_tokens) if i is not None}

    # ------------------------------------------------------------------ text -> ids
    def tokenize(self, text: str) -> list[str]:
        out: list[str] = []
        for chunk, special in split_on(self._prepare(text), self._no_split):
            out.extend([chunk] if special else self._pieces(chunk))
        return out

    def _token_to_id(self, token: str) -> int:
        index = self._convert(token)
        if index is None:
            raise KeyError(f"{token!r} has no id in this GLM tokenizer (the vocabulary has no unk piece for it)")
        return index

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The hub's `tokenizer(text)["input_ids"]`: [CLS] + ids + <|endoftext|> (add_special_tokens=False: ids)."""
        ids = [self._token_to_id(t) for t in self.tokenize(text)]
        return [self.cls_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    # ------------------------------------------------------------------ ids -> text
    def _id_to_token(self, index: int) -> str:
        if index in self.added_tokens_decoder:
            return self.added_tokens_decoder[index]
        if not 0 <= index < self._base_size():
            raise IndexError(f"token id {index} is outside this GLM tokenizer's vocabulary (size {len(self)}); the "
                             "model's padded embedding rows have no text")
        return self._base_token(index)

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """As transformers 4.26-4.33 decode: vocabulary pieces detokenized run by run, added tokens apart, the parts
        joined by spaces, then the clean-up of " ." / " ," spaces (default on, as transformers)."""
        drop = self.special_token_ids if skip_special_tokens else set()
        parts: list[str] = []
        run: list[str] = []
        for index in as_id_list(ids):
            if index in drop:
                continue
            token = self._id_to_token(index)
            if token in self.added_tokens_encoder:
                if run:
                    parts.append(self._pieces_to_text(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self._pieces_to_text(run))
        text = " ".join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ------------------------------------------------------------------ misc
    def get_command(self, name: str) -> int:
        names = {"[CLS]": self.cls_token_id, "ENC": self.cls_token_id, "[MASK]": self.mask_token_id,
                 "MASK": self.mask_token_id, "[gMASK]": self.gmask_token_id, "gMASK": self.gmask_token_id,
                 "[sMASK]": self.smask_token_id, "sMASK": self.smask_token_id, SOP: self.sop_token_id,
                 "sop": self.sop_token_id, "<sop>": self.sop_token_id, EOP: self.eop_token_id,
                 "eop": self.eop_token_id, "<eop>": self.eop_token_id, "<|endoftext|>": self.eos_token_id,
                 "eos": self.eos_token_id, "<eos>": self.eos_token_id, "pad": self.pad_token_id,
                 "<pad>": self.pad_token_id, "[SEP]": self.sep_token_id, "sep": self.sep_token_id}
        if names.get(name) is None:
            raise KeyError(f"{name!r} is not a command token of this GLM tokenizer; it has "
                           f"{sorted(k for k, v in names.items() if v is not None)}")
        return names[name]

    @property
    def mask_token_ids(self) -> list[int]:
        """The blank tokens the hub's build_inputs_for_generation looks for: [MASK], [sMASK], [gMASK]."""
        return [i for i in (self.mask_token_id, self.smask_token_id, self.gmask_token_id) if i is not None]

    def _vocab_files(self) -> list[str]:
        return [self.vocab_file_name]

    def save_pretrained(self, save_directory: str | Path) -> list[str]:
        """Writes the hub layout: the vocabulary file(s), tokenizer_config.json, special_tokens_map.json and
        added_tokens.json (as transformers' save_pretrained writes them for the hub class)."""
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self._vocab_files():
            src, dst = self.folder / name, out / name
            if src.resolve() != dst.resolve():
                with atomic_path(dst) as tmp:  # each file whole or the previous one (glmkit.core.atomic)
                    shutil.copyfile(src, tmp)
            written.append(str(dst))
        cfg = {**self.init_kwargs, "tokenizer_class": self.tokenizer_class,
               "auto_map": {"AutoTokenizer": [f"tokenization_glm.{self.tokenizer_class}", None]}}
        def plain(value):  # special_tokens_map.json holds AddedTokens without tokenizer_config.json's "__type"
            return {k: v for k, v in value.items() if k != "__type"} if isinstance(value, dict) else value

        smap = {a: plain(self.init_kwargs.get(a, self._text(a))) for a in SPECIAL_ATTRIBUTES
                if self._text(a) is not None}
        if self._additional:
            smap["additional_special_tokens"] = [s.text for s in self._additional]
        for name, data in (("tokenizer_config.json", cfg), ("special_tokens_map.json", smap),
                           ("added_tokens.json", self.added_tokens_encoder)):
            write_json(out / name, data)
            written.append(str(out / name))
        return written


class GLMChineseTokenizer(GLMHubTokenizer):
    """glm-large-chinese / glm-10b-chinese: SentencePiece `cog-pretrain.model`, pieces as `sp_model.encode` gives."""

    vocab_file_name = CHINESE_VOCAB
    tokenizer_class = "GLMChineseTokenizer"

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None) -> None:
        self.sp = load_sp(Path(folder) / CHINESE_VOCAB)
        super().__init__(folder, config)

    def _base_size(self) -> int:
        return self.sp.GetPieceSize()

    def _base_id(self, token: str) -> int:
        return self.sp.PieceToId(token)

    def _base_token(self, index: int) -> str:
        return self.sp.IdToPiece(index)

    def _pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _pieces_to_text(self, pieces: list[str]) -> str:
        return self.sp.decode(pieces)

    def sp_encode(self, text: str) -> list[int]:
        """SentencePiece ids of text, special-token strings treated as plain text."""
        return self.sp.encode(text)


class GLMGPT2Tokenizer(GLMHubTokenizer):
    """glm-2b / glm-10b: GPT-2's byte-level BPE (`vocab.json` + `merges.txt`), GPT2Tokenizer's rules."""

    vocab_file_name = GPT2_VOCAB
    tokenizer_class = "GLMGPT2Tokenizer"
    # GPT2Tokenizer.__init__: unk/bos/eos default to <|endoftext|>; given as strings they (and pad) become
    # AddedTokens without lstrip/rstrip, so they keep the whitespace around them.
    class_defaults: ClassVar[dict[str, Any]] = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                                                "eos_token": "<|endoftext|>"}
    _NO_STRIP = ("unk_token", "bos_token", "eos_token", "pad_token")

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        folder = Path(folder)
        try:
            self.encoder: dict[str, int] = json.loads((folder / GPT2_VOCAB).read_text(encoding="utf-8"))
            # GPT2Tokenizer: merges = merges.txt split on "\n", first line (the #version header) and the last
            # (empty) element dropped
            lines = (folder / GPT2_MERGES).read_text(encoding="utf-8").split("\n")[1:-1]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{folder} does not hold a readable GPT-2 vocab.json/merges.txt ({e})") from None
        merges = [tuple(m.split()) for m in lines]
        merges = [m for m in merges if len(m) == 2]
        self.decoder = {i: t for t, i in self.encoder.items()}
        try:
            bpe = Tokenizer(models.BPE(vocab=self.encoder, merges=merges))
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types for inconsistent files
            raise TokenizerError(f"{folder}: vocab.json and merges.txt do not fit together ({e})") from None
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._bpe = bpe
        self._byte_decoder = decoders.ByteLevel()
        self.add_prefix_space = bool((config or {}).get("add_prefix_space", False))
        super().__init__(folder, config)

    def _wrap(self, attr: str, value: Any) -> _Special:
        if attr in self._NO_STRIP and isinstance(value, str):
            return _Special({"content": value, "lstrip": False, "rstrip": False})
        return _Special(value)

    def _base_size(self) -> int:
        return len(self.encoder)

    def _base_id(self, token: str) -> int | None:
        return self.encoder.get(token, self.encoder.get(self._text("unk_token") or ""))

    def _base_token(self, index: int) -> str:
        if index not in self.decoder:
            raise IndexError(f"token id {index} is not in {GPT2_VOCAB}")
        return self.decoder[index]

    def _prepare(self, text: str) -> str:
        return " " + text if self.add_prefix_space else text

    def _pieces(self, text: str) -> list[str]:
        return self._bpe.encode(text, add_special_tokens=False).tokens

    def _pieces_to_text(self, pieces: list[str]) -> str:
        return self._byte_decoder.decode(pieces)

    def _vocab_files(self) -> list[str]:
        return [GPT2_VOCAB, GPT2_MERGES]


def is_glm_tokenizer_folder(folder: Path, cfg: dict[str, Any]) -> bool:
    return cfg.get("tokenizer_class") in TOKENIZER_CLASSES or (folder / CHINESE_VOCAB).is_file() or (
        (folder / GPT2_VOCAB).is_file() and (folder / GPT2_MERGES).is_file())


def load_glm_tokenizer(folder: Path, cfg: dict[str, Any]) -> GLMHubTokenizer:
    """GLMChineseTokenizer for a `cog-pretrain.model` folder, GLMGPT2Tokenizer for vocab.json + merges.txt."""
    cls_name = cfg.get("tokenizer_class")
    if cls_name not in (None, *TOKENIZER_CLASSES):
        raise TokenizerError(f"{folder}: tokenizer_class {cls_name!r} is not one of the original GLM's "
                             f"{', '.join(TOKENIZER_CLASSES)} (GLMBertTokenizer / GLMRobertaTokenizer are not supported)")
    if cls_name == "GLMChineseTokenizer" or (cls_name is None and (folder / CHINESE_VOCAB).is_file()):
        if not (folder / CHINESE_VOCAB).is_file():
            raise FileNotFoundError(f"{folder} has no {CHINESE_VOCAB} for its GLMChineseTokenizer")
        return GLMChineseTokenizer(folder, cfg)
    missing = [n for n in (GPT2_VOCAB, GPT2_MERGES) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} for its GLMGPT2Tokenizer")
    return GLMGPT2Tokenizer(folder, cfg)
