"""GLM-4's tokenizer: tiktoken byte-level BPE over `tokenizer.model` (base64 ranks), special tokens from the config."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Iterable

from glmkit.core.atomic import atomic_file
from glmkit.core.tokenizer.base import (
    GLM4_PATTERN,
    GLM4_SPECIAL_TOKENS,
    KEEP_SPACES,
    GLMTokenizerBase,
    TokenizerError,
    added_tokens,
    as_id_list,
    clean_up_tokenization,
    rule_of,
    split_on,
    token_str,
)

# --------------------------------------------------------------------------------------------------------- GLM-4

class GLM4Tokenizer(GLMTokenizerBase):
    """GLM-4: tiktoken over `tokenizer.model` (lines of `base64(token) rank`), special tokens from the config."""

    family = "glm4"
    vocab_file_name = "tokenizer.model"

    def __init__(self, vocab_file: str | Path, config: dict[str, Any] | None = None) -> None:
        super().__init__(vocab_file, config)
        import tiktoken

        self.hf_json = Path(vocab_file).name == "tokenizer.json"  # GLM-4-0414 / GLM-4.5 ship only tokenizer.json
        if self.hf_json:
            self.vocab_file_name = "tokenizer.json"
            self.mergeable_ranks, added, self.tokenizer = read_tokenizer_json(vocab_file)
        else:
            self.mergeable_ranks, added = read_tiktoken_ranks(vocab_file), {}
        self.decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.n_words = len(self.decoder)
        self.clean_up_tokenization_spaces = bool(self.init_kwargs.get("clean_up_tokenization_spaces", False))
        self.special_tokens = self._read_special_tokens() if not added or self.init_kwargs.get(
            "added_tokens_decoder") else added
        self.index_special_tokens = {i: t for t, i in self.special_tokens.items()}
        clash = [i for i in self.index_special_tokens if i in self.decoder]
        if clash:
            raise TokenizerError(f"special token ids {clash[:5]} collide with ranks in {vocab_file}")
        if not self.hf_json:
            self.tokenizer = tiktoken.Encoding(name=f"glmkit-glm4-{id(self)}", pat_str=GLM4_PATTERN,
                                               mergeable_ranks=self.mergeable_ranks, special_tokens={})
        cfg = self.init_kwargs
        self.eos_token = token_str(cfg.get("eos_token"), "<|endoftext|>")
        self.pad_token = token_str(cfg.get("pad_token"), "<|endoftext|>")
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
        no_split = {t: r for t, (_, r) in added_tokens(cfg).items()}
        named = [cfg.get(a) for a in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                      "mask_token")] + list(cfg.get("additional_special_tokens") or [])
        for value in named:
            if value is not None and token_str(value, "") in st:
                no_split.setdefault(token_str(value, ""), rule_of(value, KEEP_SPACES))
        self._no_split = {t: r for t, r in no_split.items() if t in st}

    def _read_special_tokens(self) -> dict[str, int]:
        decoder = self.init_kwargs.get("added_tokens_decoder")
        if decoder:
            out = {}
            for idx, tok in decoder.items():
                out[token_str(tok, "")] = int(idx)
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
        return split_on(text, self._no_split)

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
        for i in as_id_list(ids):
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

    def token_bytes(self, index: int) -> bytes:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index].encode("utf-8")
        if index not in self.decoder:
            raise IndexError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        return self.decoder[index]

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
        if self.hf_json:  # transformers' fast-tokenizer layout: its own config, as read
            return dict(self.init_kwargs)
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
    with atomic_file(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")


class _FastOrdinary:
    """tokenizers' byte-level BPE behind tiktoken's `encode_ordinary` surface: text without special tokens (GLM4Tokenizer
    cuts those out first) to ids, exactly as transformers' fast tokenizer encodes it."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.fast = Tokenizer.from_file(str(path))

    def encode_ordinary(self, text: str) -> list[int]:
        return self.fast.encode(text, add_special_tokens=False).ids if text else []


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is spelled as -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def read_tokenizer_json(path: str | Path) -> tuple[dict[bytes, int], dict[str, int], _FastOrdinary]:
    """A transformers `tokenizer.json` of GLM-4-0414 / GLM-4.5 (byte-level BPE): (token bytes -> id for the BPE
    vocabulary, added token -> id, the encoder)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path} is not a tokenizers JSON file ({e})") from None
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path} holds a {model.get('type')} model; GLM-4's tokenizer.json is byte-level BPE")
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    table = _byte_decoder()
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(table[ch] for ch in token)] = int(i)
        except KeyError:
            raise TokenizerError(f"{path}: vocabulary entry {token!r} is not byte-level BPE") from None
    return ranks, added, _FastOrdinary(path)
