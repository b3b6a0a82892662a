"""Reading text corpora: a corpus is a list of sources; each source is a JSON Lines file (`{"text": ...}` per
line), a plain-text file (documents separated by blank lines) or a folder of them (read recursively, sorted).
Documents stream line by line. Pretraining (glmkit.training.data.corpus) and perplexity evaluation
(glmkit.evaluation.perplexity) both read corpora through here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".jsonl", ".txt")


@dataclass
class Source:
    """One corpus source. `lines` = "start:end" keeps only those (0-based, end exclusive) documents of each file,
    e.g. to hold out the end of a file; `weight` is its share when sources are interleaved."""

    path: str
    weight: float = 1.0
    lines: str | None = None
    key: str = "text"

    def line_range(self) -> tuple[int, int | None]:
        if not self.lines:
            return 0, None
        try:
            a, b = self.lines.split(":")
            return int(a or 0), (int(b) if b else None)
        except ValueError:
            raise ValueError(f"Source.lines must look like 'start:end' (e.g. '0:39000' or '39000:'), "
                             f"got {self.lines!r}") from None

    @classmethod
    def parse(cls, spec: str | dict | Source) -> Source:
        if isinstance(spec, Source):
            return spec
        if isinstance(spec, str):
            return cls(path=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {"path", "weight", "lines", "key"}
            if unknown or "path" not in spec:
                raise ValueError(f"a corpus source is a path or a mapping with path/weight/lines/key, got {spec}")
            return cls(**spec)
        raise ValueError(f"cannot read a corpus source from {spec!r}")


def corpus_files(path: str | Path) -> list[Path]:
    """The files a source path stands for: itself, or every .jsonl/.txt under a folder (sorted)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {p} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .jsonl or .txt files under {p}")
    return files


def iter_file_documents(path: Path, key: str = "text") -> Iterator[str]:
    """Documents of one file, streamed: JSON Lines rows (field `key`), or blank-line-separated plain text."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON ({e})") from None
                if not isinstance(row, dict) or key not in row:
                    raise ValueError(f"{path}:{n} has no {key!r} field (JSON Lines rows must be {{{key!r}: ...}})")
                yield str(row[key])
        else:
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para).rstrip("\n")
                    para = []
            if para:
                yield "".join(para).rstrip("\n")


def iter_documents(source: Source) -> Iterator[str]:
    """One pass over a source (all of its files), keeping the documents in its `lines` range per file."""
    start, end = source.line_range()
    for file in corpus_files(source.path):
        for i, doc in enumerate(iter_file_documents(file, source.key)):
            if end is not None and i >= end:
                break
            if i >= start and doc:
                yield doc
