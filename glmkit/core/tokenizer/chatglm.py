"""ChatGLM-6B's tokenizer: `ice_text.model` (SentencePiece) with its whitespace tokens and image-id offset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from glmkit.core.tokenizer.base import (
    CHATGLM_SPECIAL_PIECES,
    KEEP_SPACES,
    MAX_BLANK_LENGTH,
    STRIP_BOTH,
    TAB_TOKEN,
    GLMTokenizerBase,
    SplitRule,
    TokenizerError,
    as_id_list,
    blank_token,
    clean_up_tokenization,
    load_sp,
    rule_of,
    split_on,
    token_str,
)

# ------------------------------------------------------------------------------------------------- ChatGLM-6B (v1)

class ChatGLMTokenizer(GLMTokenizerBase):
    """ChatGLM-6B: `ice_text.model` + tokenizer_config.json (`num_image_tokens`, special tokens)."""

    family = "chatglm"
    vocab_file_name = "ice_text.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(vocab_file, config)
        cfg = self.init_kwargs
        self.sp = load_sp(vocab_file)
        # The original class defaults to 20000 image ids before the text ids; the "slim" checkpoint's config says 0.
        self.num_image_tokens = int(cfg.get("num_image_tokens", 20000))
        self.max_blank_length = MAX_BLANK_LENGTH
        self.do_lower_case = bool(cfg.get("do_lower_case", False))
        self.remove_space = bool(cfg.get("remove_space", False))
        # The original's decode hands its keyword arguments to transformers 4.27's, whose default cleans up " ," /
        # " ." / " n't" spaces (checked by running it); a tokenizer_config.json that sets the key decides.
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", True))
        self.bos_token = token_str(cfg.get("bos_token"), "<sop>")
        self.eos_token = token_str(cfg.get("eos_token"), "<eop>")
        self.end_token = token_str(cfg.get("end_token"), "</s>")
        self.mask_token = token_str(cfg.get("mask_token"), "[MASK]")
        self.gmask_token = token_str(cfg.get("gmask_token"), "[gMASK]")
        self.pad_token = token_str(cfg.get("pad_token"), "<pad>")
        self.unk_token = token_str(cfg.get("unk_token"), "<unk>")
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
                no_split.setdefault(token_str(value, ""), rule_of(value, STRIP_BOTH))
        for value in cfg.get("additional_special_tokens") or []:
            no_split.setdefault(token_str(value, ""), rule_of(value, STRIP_BOTH))
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
                           split_on(text, dict.fromkeys(self._no_split, KEEP_SPACES)))
        return split_on(text, self._no_split)

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

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """As the original: pad ids are removed, the pieces are joined by SentencePiece (control pieces such as
        <eop> vanish there if the model marks them CONTROL), then `<n>`/tab/blank tokens become whitespace, then
        transformers' clean-up of " ." / " ," spaces (default: the config's, else on)."""
        ids = as_id_list(ids)
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
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def token_bytes(self, index: int) -> bytes:
        if index < self.num_image_tokens:
            return f"<image_{index}>".encode()
        if index >= self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        sp_id = index - self.num_image_tokens
        if self.sp.IsControl(sp_id) or self.sp.IsUnknown(sp_id) or index == self.pad_token_id:
            return b""
        return self._postprocess(self.sp.IdToPiece(sp_id).replace("\u2581", " ")).encode("utf-8")

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
