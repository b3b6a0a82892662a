"""Training a SentencePiece tokenizer in a ChatGLM family's file layout (`glmkit tokenizer train`)."""

from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import sentencepiece as spm

from glmkit.core.atomic import atomic_dir
from glmkit.core.extras import require_extra

from glmkit.core.tokenizer import Tokenizer, load_tokenizer
from glmkit.core.tokenizer.base import (
    CHATGLM2_SPECIAL_TOKENS,
    CHATGLM3_ROLE_TOKENS,
    CHATGLM_SPECIAL_PIECES,
    MAX_BLANK_LENGTH,
    TAB_TOKEN,
    blank_token,
)
from glmkit.core.tokenizer.chatglm import ChatGLMTokenizer
from glmkit.core.tokenizer.chatglm2 import ChatGLM2Tokenizer


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
    require_extra("train", "google.protobuf", what="tokenizer training")  # sentencepiece's model proto
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
    with atomic_dir(output_dir) as out:  # output_dir stays the previous complete tokenizer until this one is
        if family == "chatglm":
            model_path = out / "ice_text.model"
            cfg: dict[str, Any] = {"num_image_tokens": 0}
        else:
            model_path = out / "tokenizer.model"
            cfg = {"glmkit_family": family}
        model_path.write_bytes(proto.SerializeToString())
        tok = ChatGLMTokenizer(model_path, cfg) if family == "chatglm" else ChatGLM2Tokenizer(model_path, cfg, family)
        tok.save_pretrained(out)
    return load_tokenizer(Path(output_dir))
