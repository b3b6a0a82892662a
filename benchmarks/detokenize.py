"""Per-token cost of streaming an answer's text: decoding the whole answer again for every token (glmkit before
issue 24) against the incremental detokenizer (glmkit.serving.detokenize), at answer lengths up to --tokens.

    python benchmarks/detokenize.py [--tokenizer tests/data/tool_calls/glm4] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from glmkit.core.tokenizer import load_tokenizer
from glmkit.serving.detokenize import IncrementalDetokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(REPO / "tests" / "data" / "tool_calls" / "glm4"))
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    words = "你好 世界 the cat runs fast 模型 回答 问题 😀 river stone , . ?".split()
    text = " ".join(rng.choice(words) for _ in range(args.tokens * 2))
    tokens = tok.encode(text, add_special_tokens=False)[:args.tokens]
    assert len(tokens) == args.tokens, "the text is too short for --tokens"

    start = time.perf_counter()
    for k in range(1, len(tokens) + 1):
        tok.decode(tokens[:k])
    whole = time.perf_counter() - start

    start = time.perf_counter()
    detok = IncrementalDetokenizer(tok)
    for token in tokens:
        detok.push(token)
    incremental = time.perf_counter() - start
    assert tok.decode(tokens).startswith(detok.text)

    last = 50  # the cost per token near the end of the answer, where re-decoding is most expensive
    start = time.perf_counter()
    for k in range(len(tokens) - last + 1, len(tokens) + 1):
        tok.decode(tokens[:k])
    whole_end = (time.perf_counter() - start) / last
    print(f"{type(tok).__name__}, {len(tokens)} tokens")
    print(f"| detokenizer | mean per token (us) | per token at {len(tokens)} tokens (us) |")
    print("|---|---|---|")
    print(f"| whole answer again | {whole / len(tokens) * 1e6:.0f} | {whole_end * 1e6:.0f} |")
    print(f"| incremental | {incremental / len(tokens) * 1e6:.0f} | (constant) |")


if __name__ == "__main__":
    main()
