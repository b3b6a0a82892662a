"""ChatGLM2-6B and ChatGLM3-6B's tokenizer: `tokenizer.model` (SentencePiece) with command ids after its vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from glmkit.core.tokenizer.base import (
    CHATGLM2_SPECIAL_TOKENS,
    CHATGLM3_ROLE_TOKENS,
    GLMTokenizerBase,
    TokenizerError,
    added_tokens,
    as_id_list,
    clean_up_tokenization,
    load_sp,
    split_on,
)

# ------------------------------------------------------------------------------------------ ChatGLM2-6B / ChatGLM3-6B

class ChatGLM2Tokenizer(GLMTokenizerBase):
    """ChatGLM2-6B / ChatGLM3-6B: `tokenizer.model` with command tokens numbered after the SentencePiece vocab."""

    vocab_file_name = "tokenizer.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None, family: str = "chatglm2") -> None:
        super().__init__(vocab_file, config)
        if family not in ("chatglm2", "chatglm3"):
            raise ValueError(f"family must be 'chatglm2' or 'chatglm3', got {family!r}")
        self.family = family
        self.sp = load_sp(vocab_file)
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
        self._added = added_tokens(self.init_kwargs)
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
        for chunk, special in split_on(text, self._no_split):
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
        ids = as_id_list(ids)
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

    def token_bytes(self, index: int) -> bytes:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index].encode() if self.family == "chatglm3" else b""
        if index in (self.eos_token_id, self.bos_token_id, self.pad_token_id) or index < 0:
            return b""
        if index >= self.sp.vocab_size():
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        piece = self.sp.IdToPiece(index)
        if self.sp.IsByte(index):
            return bytes([int(piece[1:-1], 16)])  # <0x0A>
        if self.sp.IsControl(index) or self.sp.IsUnknown(index):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

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
