"""What the three tokenizer families share: their special-token constants, transformers' added-token split
rules (`split_on`), and GLMTokenizerBase (batching with left padding, special-token bookkeeping, saving)."""

from __future__ import annotations

import abc
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import sentencepiece as spm

from glmkit.core.atomic import atomic_path, write_json
from glmkit.core.chat_template import apply_chat_template as _apply_chat_template

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
                   "config.json", "cog-pretrain.model", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.json"]


class TokenizerError(ValueError):
    """A tokenizer folder glmkit cannot read."""


def check_text(text: Any) -> None:
    """Refuses what is not encodable text: a non-string, or a string with an unpaired surrogate."""
    if not isinstance(text, str):
        raise TokenizerError(f"expected text (str), got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text holds an unpaired surrogate {text[e.start]!r} at position {e.start} "
                                 "(not valid Unicode)") from None


def _checks_text(method):
    import functools

    @functools.wraps(method)
    def wrapper(self, text, *args, **kwargs):
        check_text(text)
        return method(self, text, *args, **kwargs)

    return wrapper


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


def rule_of(value: Any, plain: SplitRule) -> SplitRule:
    """The rule of a token as a tokenizer config gives it: an AddedToken dict carries its flags, a string gets `plain`."""
    if isinstance(value, dict):
        return SplitRule(bool(value.get("lstrip", False)), bool(value.get("rstrip", False)),
                         bool(value.get("single_word", False)))
    return plain


def split_on(text: str, specials: dict[str, SplitRule]) -> list[tuple[str, bool]]:
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


def added_tokens(cfg: dict[str, Any]) -> dict[str, tuple[int, SplitRule]]:
    """tokenizer_config.json's `added_tokens_decoder`: token -> (id, rule); transformers >= 4.34 splits all of them
    out of the text before the model's tokenizer runs."""
    out: dict[str, tuple[int, SplitRule]] = {}
    for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
        content = token_str(tok, "")
        if content:
            out[content] = (int(idx), rule_of(tok, KEEP_SPACES))
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

    def __init_subclass__(cls, **kwargs) -> None:
        # every family's encode/tokenize refuses text that is not valid Unicode (SentencePiece and tiktoken fail
        # on it with opaque errors)
        super().__init_subclass__(**kwargs)
        for name in ("encode", "tokenize"):
            if name in cls.__dict__:
                setattr(cls, name, _checks_text(cls.__dict__[name]))

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
        return [self._id_to_token(int(i)) for i in as_id_list(ids)]

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
        """Encodes one text or a batch. Batches are padded on `padding_side` (left; the original GLM's: right) with
        `pad_token_id` (attention_mask 0 = pad).

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
            if self.padding_side == "left":
                input_ids.append([self.pad_token_id] * n_pad + r)
                attention_mask.append([0] * n_pad + [1] * len(r))
            else:  # the original GLM's tokenizers pad on the right (transformers' default)
                input_ids.append(r + [self.pad_token_id] * n_pad)
                attention_mask.append([1] * len(r) + [0] * n_pad)
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

    # -- chat
    @property
    def chat_template(self) -> Any:
        """tokenizer_config.json's `chat_template` (None when the folder has none)."""
        return self.init_kwargs.get("chat_template")

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: list[Any] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False,
                            **template_kwargs: Any) -> Any:
        """The family's chat prompt for `messages` (role dicts, native or OpenAI-shaped) and `tools`, exactly as the
        original tokenizer builds it: ids, or the prompt text with tokenize=False (glmkit.core.chat_template).
        As in transformers, return_tensors="pt" gives a [1, T] tensor and return_dict=True
        {"input_ids", "attention_mask"}. Other keyword arguments reach a jinja template as variables (as in
        transformers: `enable_thinking=False` for GLM-4.5)."""
        out = _apply_chat_template(self, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   tokenize=tokenize, template_kwargs=template_kwargs or None)
        if not tokenize:
            return out
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if return_tensors == "pt":
            import torch

            out = torch.tensor([out], dtype=torch.long)
        if return_dict:
            mask = [1] * len(out) if return_tensors is None else torch.ones_like(out)
            return {"input_ids": out, "attention_mask": mask}
        return out

    def token_bytes(self, index: int) -> bytes:
        """The bytes token `index` stands for in decoded text (b"" for tokens that decode to nothing)."""
        return self.decode([index]).encode("utf-8")

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
            with atomic_path(vocab_out) as tmp:  # each file whole or the previous one (glmkit.core.atomic)
                shutil.copyfile(self.vocab_file, tmp)
        cfg_out = out / "tokenizer_config.json"
        write_json(cfg_out, self._config_to_save())
        return [str(vocab_out), str(cfg_out)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, vocab_size={self.vocab_size}, path={self.name_or_path!r})"


def as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out = list(ids)
    if out and isinstance(out[0], (list, tuple)):
        raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
    return [int(i) for i in out]


def load_sp(path: str | Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({e}); the tokenizer folder looks corrupt") from None
    return sp


def token_str(value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return str(value.get("content", default))
    return str(value)
