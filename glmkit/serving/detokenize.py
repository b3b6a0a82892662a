"""Incremental detokenization, as vLLM's detokenizer does it: each new token decodes a short window of the answer's
last tokens, not the whole answer again, so streaming an answer of n tokens costs O(n), not O(n^2).

The window runs from `prefix` (tokens already emitted once, kept for context: a SentencePiece piece's leading "▁"
is dropped only at the start of a decode, byte pieces join across tokens) to the end; the text the window adds over
its first part [prefix, read) is the new text. New text is held back while it could still change:
  - it ends in U+FFFD (an incomplete UTF-8 character, byte-fallback pieces that are not yet whole): the last 3
    of those wait, the text before them is final;
  - it ends in the beginning of something the tokenizer's decode rewrites across pieces (transformers' clean-up of
    " ." / " n't" ..., ChatGLM-6B's "<n>" / "<|tab|>" / "<|blank_k|>"), so a later piece could rewrite it;
  - the window's text does not start with its first part's text (a decode that is not piecewise there).
What was emitted is therefore always a prefix of the decode of the whole answer, at every later length too.
"""

from __future__ import annotations

from typing import Any

from glmkit.core.tokenizer.base import TAB_TOKEN, blank_token

# transformers' clean_up_tokenization patterns (glmkit.core.tokenizer.base.clean_up_tokenization)
MAX_UNFINISHED = 3  # U+FFFD characters an unfinished UTF-8 character can decode to (3 of its 4 bytes, one each)
CLEAN_UP = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


def rewrites(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer's decode rewrites in the joined text (so they must not be cut by a window's edge)."""
    out: list[str] = []
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        out.extend(CLEAN_UP)
    if hasattr(tokenizer, "max_blank_length"):  # ChatGLM-6B's _postprocess
        out.extend(["<n>", TAB_TOKEN] + [blank_token(i) for i in range(2, tokenizer.max_blank_length + 1)])
    return tuple(out)


class IncrementalDetokenizer:
    """Feed an answer's tokens one at a time; `text` is the decoded text so far, minus a held-back tail."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = tokenizer.decode
        self.tokens: list[int] = []
        self.prefix = 0  # window start: tokens before it are never decoded again
        self.read = 0  # tokens before it are emitted in `text`
        self.text = ""
        self._pending: str | None = ""  # the window's text past its first part (None: not a continuation of it)
        self._sent = 0  # characters of _pending already in `text` (the final part before an unfinished character)
        self._heads = {p[:n] for p in rewrites(tokenizer) for n in range(1, len(p))}
        self._longest = max(map(len, self._heads), default=0)

    def push(self, token: int) -> str:
        """Adds one token; returns the text emitted so far (it only ever grows)."""
        self.tokens.append(token)
        window = self.decode(self.tokens[self.prefix:])
        before = self.decode(self.tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        self._pending = window[len(before):] if window.startswith(before) else None
        if not self._pending or self._open(window):
            return self.text
        # A trailing U+FFFD may be an unfinished character: one for a byte-level decode, one per byte (at most 3)
        # for SentencePiece's byte fallback. Those wait; the text before them is final (UTF-8 resynchronizes), so a
        # model that emits invalid bytes still streams, at most 3 characters late.
        run = len(self._pending) - len(self._pending.rstrip("\ufffd"))
        stable = len(self._pending) - min(run, MAX_UNFINISHED)
        if stable > self._sent:
            self.text += self._pending[self._sent:stable]
            self._sent = stable
        if stable == len(self._pending):  # all of it final: the window moves on
            self._pending, self._sent = "", 0
            self.prefix, self.read = self.read, len(self.tokens)
        return self.text

    def current(self) -> str:
        """The whole decode of the tokens so far, held-back tail included (what a stop string is looked for in)."""
        if self._pending is None:  # a window whose decode is not piecewise: decode it all
            return self.decode(self.tokens)
        return self.text + self._pending[self._sent:]

    def _open(self, text: str) -> bool:
        """Does text end in a proper beginning of a rewritten string?"""
        return any(text[-n:] in self._heads for n in range(1, min(self._longest, len(text)) + 1))
