"""Tokenizers of the GLM family, read from the files each checkpoint publishes, (the trainer is glmkit.training.tokenizer).

Four layouts, one small surface (`encode`, `decode`, `__call__`, `convert_tokens_to_ids`, special-token ids):

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
- The original GLM (`tokenization_glm.py`: glm-large-chinese / glm-10b-chinese `cog-pretrain.model`, glm-2b / glm-10b
  GPT-2 `vocab.json` + `merges.txt`): the base vocabulary plus added_tokens.json and the special tokens of the files,
  as transformers' slow tokenizer loads them; `encode` gives `[CLS] ... <|endoftext|>` (glmkit.core.tokenizer.glm).

Each class reproduces what the family's original `tokenization_chatglm.py` does through `PreTrainedTokenizer` of the
transformers version it ran with (tokenize -> pieces -> ids, then the family's special tokens; see `split_on` for the
added-token rules); the ids of special tokens are always read from the files, never assumed. tests/data/special_tokens
holds ids produced by the original code.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from glmkit.core.hub import read_json_object, resolve_model_dir
from glmkit.core.tokenizer.base import TOKENIZER_FILES, GLMTokenizerBase, TokenizerError
from glmkit.core.tokenizer.chatglm import ChatGLMTokenizer
from glmkit.core.tokenizer.chatglm2 import ChatGLM2Tokenizer
from glmkit.core.tokenizer.glm import (
    GLMChineseTokenizer,
    GLMGPT2Tokenizer,
    GLMHubTokenizer,
    is_glm_tokenizer_folder,
    load_glm_tokenizer,
)
from glmkit.core.tokenizer.glm4 import GLM4Tokenizer, read_tiktoken_ranks, write_tiktoken_ranks
from glmkit.core.tokenizer.glm130b import GLM130BTokenizer

__all__ = [
    "ChatGLM2Tokenizer",
    "ChatGLMTokenizer",
    "GLM4Tokenizer",
    "GLM130BTokenizer",
    "GLMChineseTokenizer",
    "GLMGPT2Tokenizer",
    "GLMHubTokenizer",
    "GLMTokenizerBase",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "write_tiktoken_ranks",
]

Tokenizer = (ChatGLMTokenizer | ChatGLM2Tokenizer | GLM4Tokenizer | GLMChineseTokenizer | GLMGPT2Tokenizer
             | GLM130BTokenizer)


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
    # ChatGLM3's tokenizer class (not ChatGLM2's) passes `encode_special_tokens` to transformers, which saves it
    if "<|user|>" in text or "chatglm3" in names.lower() or "encode_special_tokens" in cfg:
        return "chatglm3"
    return "chatglm2"


def _is_glm130b_folder(folder: Path, cfg: dict[str, Any]) -> bool:
    """A GLM-130B folder: a SAT checkpoint (`latest`, model_config.json of GLM130B / icetk-glm-130B), a `glmkit
    convert` folder (config.json family glm130b) or a tokenizer saved by GLM130BTokenizer."""
    if cfg.get("glmkit_family") == "glm130b" or cfg.get("tokenizer_class") == "GLM130BTokenizer":
        return True
    sat = _read_json(folder / "model_config.json")
    if sat.get("model_class") == "GLM130B" or sat.get("tokenizer_type") == "icetk-glm-130B":
        return True
    if (folder / "latest").is_file() and not (folder / "config.json").is_file():
        return True
    return _read_json(folder / "config.json").get("family") == "glm130b"


def load_tokenizer(path_or_id: str | os.PathLike, family: str | None = None) -> Tokenizer:
    """Loads the tokenizer of a local folder, the bundled model ("glm-tiny") or a Hugging Face id.

    The family is detected from the files: `cog-pretrain.model`, or `vocab.json` + `merges.txt`, or a
    `tokenizer_class` GLMChineseTokenizer / GLMGPT2Tokenizer -> the original GLM (glmkit.core.tokenizer.glm);
    `ice_text.model` -> ChatGLM-6B, or GLM-130B (glmkit.core.tokenizer.glm130b: icetk ids + 20000, command ids
    from 150000) in a GLM-130B folder or with family="glm130b"; a SentencePiece `tokenizer.model` ->
    ChatGLM2 (ChatGLM3 when the config names its role tokens); a base64-ranks `tokenizer.model` -> GLM-4.
    `family` ("chatglm2" / "chatglm3") overrides the ChatGLM2-vs-3 guess."""
    if Path(path_or_id).expanduser().is_file():
        raise TokenizerError(f"{path_or_id} is a file; pass the folder that holds it (ice_text.model or "
                             "tokenizer.model plus tokenizer_config.json)")
    folder = resolve_model_dir(path_or_id, allow_patterns=TOKENIZER_FILES)
    cfg = _read_json(folder / "tokenizer_config.json")
    if is_glm_tokenizer_folder(folder, cfg):
        if family not in (None, "glm"):
            raise ValueError(f"{folder} holds an original GLM tokenizer (tokenization_glm.py), not family {family!r}")
        return load_glm_tokenizer(folder, cfg)
    if (folder / "ice_text.model").is_file() and (family == "glm130b" or _is_glm130b_folder(folder, cfg)):
        return GLM130BTokenizer(folder / "ice_text.model", cfg)
    if family == "glm130b":
        raise FileNotFoundError(f"no ice_text.model in {folder}: GLM-130B's tokenizer is icetk's text model "
                                "(~/.icetk_models/ice_text.model once icetk has fetched it) or ChatGLM-6B's "
                                "ice_text.model; copy one into the folder")
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
    if (folder / "tokenizer.json").is_file():  # GLM-4-0414, GLM-Z1, GLM-4.5/4.6/4.7: transformers' fast layout
        if family not in (None, "glm4"):
            raise ValueError(f"{folder} holds a GLM-4 tokenizer.json, not family {family!r}")
        return GLM4Tokenizer(folder / "tokenizer.json", cfg)
    raise FileNotFoundError(f"no tokenizer in {folder}: expected ice_text.model (ChatGLM-6B), tokenizer.model "
                            "(ChatGLM2/3 SentencePiece, GLM-4 tiktoken ranks), tokenizer.json (GLM-4-0414, GLM-4.5), cog-pretrain.model or vocab.json + "
                            "merges.txt (the original GLM)")
