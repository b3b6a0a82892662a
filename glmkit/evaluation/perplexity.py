"""Per-token loss, perplexity and per-character cross-entropy of a model on held-out text.

Each document is scored as a continuation from an empty context, exactly as the model generates text:

    input  = tokenizer.encode("")  +  tokenizer.encode(text, add_special_tokens=False)
           = [gMASK] <sop> t1 ... tn                      (ChatGLM-6B layout; other families: their prefix)
    loss   = -log p(t1 | prefix) - ... - log p(tn | prefix, t1..tn-1)   (natural log; no <eop> term)

with the model's own positions and attention mask (`GLM.default_position_ids` / `default_attention_mask`).
per-token loss = Σ loss / Σ n;  perplexity = exp(per-token loss);  per-character CE = Σ loss / Σ len(text)
(nats per character, independent of the tokenizer). `--unigram-corpus` adds the baseline: a character unigram
model fitted on a corpus (add-one smoothing), scored on the same texts; glm-tiny's acceptance test is a
per-character CE at least 20% below it.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from glmkit.loading.corpus import Source, corpus_files, iter_documents, iter_file_documents


@dataclass
class PplResult:
    documents: int
    tokens: int
    characters: int
    loss_sum: float  # nats, over all predicted tokens

    @property
    def token_loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.token_loss, 50.0))

    @property
    def char_ce(self) -> float:
        return self.loss_sum / max(1, self.characters)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "token_loss": self.token_loss, "perplexity": self.perplexity,
                "char_ce": self.char_ce}


def read_texts(path: str | Path, key: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a .jsonl/.txt file or folder (see glmkit.loading.corpus), at most `limit` of them."""
    texts = []
    for doc in iter_documents(Source(str(path), key=key)):
        texts.append(doc)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"no documents in {path}")
    return texts


@torch.inference_mode()
def score_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int | None = None,
                progress: bool = True) -> PplResult:
    """Summed token cross-entropy of each text continued from `tokenizer.encode("")` (see the module doc).

    Texts longer than `max_tokens` (default: the model's max_seq_len minus the prefix) are cut; their characters
    are then counted only up to the cut, so the per-character value stays a ratio over what was scored.
    """
    prefix = tokenizer.encode("")
    limit = (max_tokens or model.config.max_seq_len) - len(prefix)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > limit:
            ids = ids[:limit]
            text = tokenizer.decode(ids)
        if ids:
            items.append((ids, len(text)))
    # similar lengths together keep padding small; the sum does not depend on the order
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="eval ppl", unit="doc", file=sys.stderr, dynamic_ncols=True)
    result = PplResult(0, 0, 0, 0.0)
    device = model.device
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        T = len(prefix) + max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):  # left padding, as ChatGLM-6B
            row = prefix + ids
            input_ids[r, T - len(row):] = torch.tensor(row)
            mask[r, T - len(row):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids, attention_mask=mask)  # positions/mask: the model's own, from the [B, T] mask
        for r, (ids, n_chars) in enumerate(chunk):
            n = len(ids)
            pred = logits[r, T - n - 1:T - 1].float()  # the position before each text token predicts it
            target = input_ids[r, T - n:]
            result.loss_sum += F.cross_entropy(pred, target, reduction="sum").item()
            result.tokens += n
            result.characters += n_chars
            result.documents += 1
        if bar:
            bar.update(len(chunk))
            bar.set_postfix(loss=f"{result.token_loss:.3f}", char_ce=f"{result.char_ce:.3f}")
    if bar:
        bar.close()
    return result


def char_unigram_counts(paths: Iterable[str | Path], key: str = "text") -> Counter:
    """Character counts over every document of the given corpus files/folders."""
    counts: Counter = Counter()
    for path in paths:
        for file in corpus_files(path):
            for doc in iter_file_documents(file, key):
                counts.update(doc)
    if not counts:
        raise ValueError(f"no characters in {list(map(str, paths))}")
    return counts


def unigram_char_ce(counts: Counter, texts: Sequence[str]) -> float:
    """Cross-entropy (nats/char) of a character unigram model with add-one smoothing (one extra slot for
    unseen characters) on `texts`."""
    total, vocab = sum(counts.values()), len(counts) + 1
    loss, n = 0.0, 0
    for text in texts:
        for ch in text:
            loss -= math.log((counts.get(ch, 0) + 1) / (total + vocab))
            n += 1
    return loss / max(1, n)


def texts_scored(model, tokenizer, texts: Sequence[str], max_tokens: int | None = None) -> list[str]:
    """The texts as score_texts scores them (cut to the token limit), so a baseline covers the same characters."""
    prefix = tokenizer.encode("")
    limit = (max_tokens or model.config.max_seq_len) - len(prefix)
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(tokenizer.decode(ids[:limit]) if len(ids) > limit else text)
    return out


def perplexity_report(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_tokens: int | None = None,
                      unigram_corpus: Sequence[str | Path] | None = None, key: str = "text",
                      progress: bool = True) -> dict[str, float]:
    """`glmkit eval ppl`: score_texts' numbers, plus (with `unigram_corpus`) the character unigram baseline on the
    same characters and the model's reduction against it."""
    res = score_texts(model, tokenizer, texts, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    out = res.as_dict()
    if unigram_corpus:
        uni = unigram_char_ce(char_unigram_counts(unigram_corpus, key), texts_scored(model, tokenizer, texts,
                                                                                     max_tokens))
        out["unigram_char_ce"] = uni
        out["reduction_vs_unigram"] = 1 - res.char_ce / uni
    return out
