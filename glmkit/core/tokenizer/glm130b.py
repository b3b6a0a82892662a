"""GLM-130B's tokenizer: icetk's text model as SwissArmyTransformer's `icetk-glm-130B` tokenizer uses it.

icetk numbers 20000 image tokens first, so a text id is the SentencePiece id of `ice_text.model` + 20000, and it
runs SentencePiece on the raw text (icetk 0.0.7 `encode(text)`: no `<n>` / blank / tab rewriting; its decode turns
`<n>` back into newlines). SAT's `_IceTokenizer` numbers 8 command tokens after icetk's 150000 ids, none of them
pieces of the model: [MASK] 150000, [gMASK] 150001, [sMASK] 150002, eod 150003, sop 150004, eop 150005, ENC 150006,
dBLOCK 150007; `eos` is the text model's `</s>` (20002) and id 0 is `[pad]`. The model's vocabulary is padded to
150528.

How ChatGLM-6B's `ice_text.model` relates: it is icetk's 130,000 text pieces (same ids: the text ids lie below
GLM-130B's first command id) followed by pieces for the command tokens ([MASK] [gMASK] [sMASK] <unused_0> <sop>
<eop> <ENC> <dBLOCK> at 130000-130007) and further pieces, its `<|blank_k|>` / `<|tab|>` whitespace tokens among
them (130,344 pieces in all, the size its tokenizer reports). ChatGLM-6B as first released kept the 20000 image offset
(`num_image_tokens` 20000, vocab 150528), so its command ids were 150000-150007, GLM-130B's; the later "slim"
checkpoint sets the offset to 0 (ids 130000-130007, vocab 130528). So glmkit reads either file: text pieces are
the same ids, and the command tokens keep GLM-130B's numbering. (The extra ChatGLM-6B pieces can only come out of
SentencePiece for text spelling them, e.g. "<|blank_2|>".)

Prompts (`encode`) are built as GLM-130B's generate.py builds them: the text with its [MASK] / [sMASK] / [gMASK]
as command ids; [gMASK] appended when there is no mask, else eos when the text does not end with a mask; then sop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glmkit.core.tokenizer.base import GLMTokenizerBase, TokenizerError, as_id_list, load_sp

NUM_IMAGE_TOKENS = 20000
COMMAND_BASE = 150000
COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK"]
EOS_ID = 20002  # the text model's </s>
PAD_ID = 0
MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")


class GLM130BTokenizer(GLMTokenizerBase):
    """icetk's text tokenizer with GLM-130B's command ids (SAT `icetk-glm-130B`)."""

    family = "glm130b"
    vocab_file_name = "ice_text.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(vocab_file, config)
        self.sp = load_sp(vocab_file)
        self.num_image_tokens = NUM_IMAGE_TOKENS
        if self.num_image_tokens + self.sp.GetPieceSize() > COMMAND_BASE + 544:
            raise TokenizerError(f"{vocab_file} has {self.sp.GetPieceSize()} pieces: icetk's text model has 130000 "
                                 "(ChatGLM-6B's 130344); this is neither")
        self.commands = {name: COMMAND_BASE + i for i, name in enumerate(COMMANDS)}
        self.command_names = {v: k for k, v in self.commands.items()}
        self.mask_token_id, self.gmask_token_id = self.commands["[MASK]"], self.commands["[gMASK]"]
        self.smask_token_id = self.commands["[sMASK]"]
        self.sop_token_id = self.bos_token_id = self.commands["sop"]
        self.eop_token_id = self.commands["eop"]
        self.eos_token_id = EOS_ID
        self.pad_token_id = PAD_ID
        self.unk_token_id = NUM_IMAGE_TOKENS + self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer uses (SAT's vocab_size: 150000 + 8 command tokens; the model pads to 150528)."""
        return COMMAND_BASE + len(COMMANDS)

    # -- text <-> ids
    def text_ids(self, text: str) -> list[int]:
        """icetk.encode(text): SentencePiece over the raw text, ids shifted by the 20000 image tokens."""
        return [i + self.num_image_tokens for i in self.sp.encode(text)] if text else []

    def tokenize(self, text: str) -> list[str]:
        pieces: list[str] = []
        for part, is_mask in self._parts(text):
            pieces.extend([part] if is_mask else self.sp.encode(part, out_type=str) if part else [])
        return pieces

    def _parts(self, text: str) -> list[tuple[str, bool]]:
        out, pos = [], 0
        for m in MASK_PATTERN.finditer(text):
            out.append((text[pos:m.start()], False))
            out.append((m.group(0), True))
            pos = m.end()
        out.append((text[pos:], False))
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """generate.py's prompt: text pieces split at [MASK] / [sMASK] / [gMASK] (command ids), then, with
        add_special_tokens, [gMASK] if the text has no mask (else eos unless it ends with a mask), and sop."""
        ids: list[int] = []
        for part, is_mask in self._parts(text):
            ids.extend([self.commands[part]] if is_mask else self.text_ids(part))
        if add_special_tokens:
            if "MASK]" not in text:  # generate.py appends " [gMASK]", after which the text ends with a mask
                ids.append(self.gmask_token_id)
            elif not text.endswith("MASK]"):
                ids.append(self.eos_token_id)
            ids.append(self.sop_token_id)
        return ids

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """SAT's detokenize: text runs decoded by icetk (`<n>` -> newline); command tokens and eos written as SAT's
        IdToToken does ("[" + name + "]", e.g. "[sop]", "[[MASK]]", "[</s>]"); pad (0) dropped. With
        skip_special_tokens they are dropped."""
        ids = [i for i in as_id_list(ids) if i != self.pad_token_id]
        out, run = [], []
        for i in ids:
            if i in self.command_names or i == self.eos_token_id:
                out.append(self._decode_text(run))
                run = []
                if not skip_special_tokens:
                    out.append("[</s>]" if i == self.eos_token_id else f"[{self.command_names[i]}]")
            else:
                run.append(i)
        out.append(self._decode_text(run))
        return "".join(out)

    def _decode_text(self, ids: list[int]) -> str:
        """icetk's decode of text ids; an image id (below 20000) reads `<image_k>` as icetk names it, an id past this
        text model (a padding row of the 150528-row vocabulary) reads as SentencePiece's unknown piece."""
        out, run = [], []
        n = self.sp.GetPieceSize()
        for i in ids:
            if i < self.num_image_tokens:
                out.append(self.sp.decode(run))
                run = []
                out.append(f"<image_{i}>")
            else:
                run.append(i - self.num_image_tokens if i - self.num_image_tokens < n else self.sp.unk_id())
        out.append(self.sp.decode(run))
        return "".join(out).replace("<n>", "\n")

    def token_bytes(self, index: int) -> bytes:
        if index in self.command_names or index in (self.eos_token_id, self.pad_token_id):
            return b""
        return self._decode_text([index]).encode("utf-8")

    def _token_to_id(self, token: str) -> int:
        if token in self.commands:
            return self.commands[token]
        if token == "[pad]":
            return self.pad_token_id
        return self.sp.PieceToId(token) + self.num_image_tokens

    def _id_to_token(self, index: int) -> str:
        if index in self.command_names:
            return self.command_names[index]
        if index == self.pad_token_id:
            return "[pad]"
        if not self.num_image_tokens <= index < self.num_image_tokens + self.sp.GetPieceSize():
            raise IndexError(f"token id {index} is outside GLM-130B's text and command ids")
        return self.sp.IdToPiece(index - self.num_image_tokens)

    def get_command(self, name: str) -> int:
        aliases = {"<sop>": "sop", "<eop>": "eop", "bos": "sop"}
        name = aliases.get(name, name)
        if name == "eos":
            return self.eos_token_id
        if name == "pad":
            return self.pad_token_id
        if name not in self.commands:
            raise KeyError(f"{name!r} is not a GLM-130B command token; it has {COMMANDS + ['eos', 'pad']}")
        return self.commands[name]

    def _config_to_save(self) -> dict[str, Any]:
        return {**self.init_kwargs, "tokenizer_class": "GLM130BTokenizer", "glmkit_family": "glm130b"}
