"""Corpus mixing (interleave, shuffle) and the blank-infilling IterableDataset over glmkit.loading.corpus sources.

Nothing is held in memory beyond a shuffle buffer of documents: files are read line by line.

`BlankInfillingDataset` turns sources into fixed-length packed rows (glmkit.training.data.blank), deterministically for a
seed: the same seed gives the same rows in the same order whatever the number of processes; process `rank` of
`world_size` keeps rows `rank, rank + world_size, ...`, and `skip_rows` fast-forwards past rows already trained on
(exact resume).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from glmkit.loading.corpus import Source, corpus_files, iter_documents
from glmkit.training.data.blank import BlankBuilder, BlankConfig, BlankSample, SpecialIds, pack_samples


def _cycle(source: Source) -> Iterator[str]:
    while True:
        empty = True
        for doc in iter_documents(source):
            empty = False
            yield doc
        if empty:
            raise ValueError(f"corpus source {source.path} (lines {source.lines}) holds no documents")


def interleave(sources: Sequence[Source], rng: random.Random, cycle: bool) -> Iterator[str]:
    """Documents from several sources: weighted random choice per document when cycling forever (training),
    else one pass through each source in turn (evaluation)."""
    if not cycle:
        for s in sources:
            yield from iter_documents(s)
        return
    streams = [_cycle(s) for s in sources]
    weights = [s.weight for s in sources]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"source weights must be >= 0 with a positive sum, got {weights}")
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights)[0]])


def shuffled(docs: Iterator[str], buffer_size: int, rng: random.Random) -> Iterator[str]:
    """Approximate shuffle with a fixed-size buffer (a streamed corpus cannot be permuted as a whole)."""
    if buffer_size <= 1:
        yield from docs
        return
    buf: list[str] = []
    for doc in docs:
        if len(buf) < buffer_size:
            buf.append(doc)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = doc
    rng.shuffle(buf)
    yield from buf


class BlankInfillingDataset(IterableDataset):
    """Packed blank-infilling rows from streamed text: dicts of input_ids/labels [T], position_ids [2, T] and
    attention_mask [1, T, T] (bool, True = may attend).

    Args:
        sources: corpus sources (paths or `Source`s).
        tokenizer: anything with `encode(text, add_special_tokens=False) -> list[int]`.
        special: the special ids; sentence_end_ids: token ids that end a sentence (for [sMASK]).
        seq_len: row length; documents are cut into pieces of at most `max_doc_tokens` tokens.
        cycle: loop over the sources forever (training) or make one pass (evaluation).
        max_rows: stop after this many rows (per process) if given.
    """

    def __init__(self, sources: Sequence[str | dict | Source], tokenizer, special: SpecialIds,
                 config: BlankConfig | None = None, *, seq_len: int = 512, max_doc_tokens: int | None = None,
                 sentence_end_ids: Sequence[int] = (), seed: int = 0, cycle: bool = True,
                 shuffle_buffer: int = 1024, rank: int = 0, world_size: int = 1, skip_rows: int = 0,
                 max_rows: int | None = None) -> None:
        super().__init__()
        if not sources:
            raise ValueError("no corpus sources given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.sources = [Source.parse(s) for s in sources]
        for s in self.sources:
            corpus_files(s.path)  # fail early on a wrong path
        self.tokenizer = tokenizer
        self.builder = BlankBuilder(special, config, sentence_end_ids)
        self.seq_len = seq_len
        # A [MASK] sample is len + 2·spans tokens; keep documents short enough that every objective fits.
        self.max_doc_tokens = max_doc_tokens or max(8, int(seq_len * 0.7))
        if self.max_doc_tokens + 2 > seq_len:
            raise ValueError(f"max_doc_tokens {self.max_doc_tokens} leaves no room for [gMASK] <sop> in "
                             f"seq_len {seq_len}")
        self.seed, self.cycle, self.shuffle_buffer = seed, cycle, shuffle_buffer
        self.rank, self.world_size, self.skip_rows, self.max_rows = rank, world_size, skip_rows, max_rows

    def samples(self, rng: random.Random) -> Iterator[BlankSample]:
        docs = interleave(self.sources, rng, self.cycle)
        if self.cycle:
            docs = shuffled(docs, self.shuffle_buffer, rng)
        for text in docs:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            for i in range(0, len(ids), self.max_doc_tokens):
                piece = ids[i:i + self.max_doc_tokens]
                sample = self.builder.build(piece, rng)
                if len(sample) > self.seq_len:  # many short sentences/spans: fall back to one [gMASK] suffix
                    sample = self.builder.build(piece, rng, objective="gpt")
                yield sample

    def rows(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's rows, after `skip_rows` of them."""
        rng = random.Random(self.seed)
        mine = 0
        for i, row in enumerate(pack_samples(self.samples(rng), self.seq_len, self.builder.special.pad)):
            if i % self.world_size != self.rank:
                continue
            mine += 1
            if mine <= self.skip_rows:
                continue
            if self.max_rows is not None and mine - self.skip_rows > self.max_rows:
                return
            yield row.tensors()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.rows()
