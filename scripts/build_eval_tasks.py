"""Builds glmkit/assets/tasks/: small evaluation tasks in GLM-130B's task-file and data layout, from ../shared/data.

    .venv/bin/python scripts/build_eval_tasks.py [--data ../shared/data] [--out glmkit/assets/tasks]

Deterministic (random.Random(0)); the product reads only the written files. Sources: Tang poems 39000-39999 of
corpus/tang-poems.jsonl, which glm-tiny never saw (configs/glm-tiny.yaml holds them out), and State of the Union
addresses (corpus/state-of-the-union.jsonl): glm-tiny's training mix includes them (about 8% of its tokens), so the
prose items are not held out; no prose in ../shared/data is.

Tasks written (each a YAML file beside a data/ folder, `path` relative to it):

- lambada-tiny.yaml (gen, module lambada): LAMBADA-style last word. poems: the poem without its last character
  (the last line's rhyme) -> that character; prose: a passage without its last word -> the word.
- next-line.yaml (mul): which line follows. poems: a poem's first lines -> the true next line and three lines of
  the same length from other held-out poems; prose: a passage -> its next sentence and three other sentences.
- couplet.yaml (gen): a poem's title, author and first half-line -> the second half-line without its 。 (the
  generation stops at 。 or a newline; EM, F1, ROUGE, BLEU).
- poems-lm.yaml (lm): 60 held-out poems as one text file (token perplexity, bits per byte).
- next-line-letters.yaml (mul, scoring: letters, prompt: chat): the poem items of next-line as a C-Eval-style
  question with lettered options, the answer letter read from the letter tokens' logits.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = slice(39000, 40000)
LINE_RE = re.compile(r"^[\u4e00-\u9fff]{5,7}，[\u4e00-\u9fff]{5,7}。$")


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def clean_poems(texts: list[str]) -> list[tuple[str, str, list[str]]]:
    """(title, author, lines) of poems whose every line is a regular couplet 五言/七言 'xxxxx，xxxxx。' (no notes)."""
    out = []
    for t in texts:
        parts = t.split("\n")
        if len(parts) < 4:
            continue
        title, author, lines = parts[0], parts[1], parts[2:]
        if all(LINE_RE.match(line) for line in lines) and len({len(x) for x in lines}) == 1:
            out.append((title, author, lines))
    return out


def prose_sentences(texts: list[str]) -> list[list[str]]:
    """Each address cut into sentences (plain ones: 6-40 words, no brackets or quotes)."""
    docs = []
    for t in texts:
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", t)]
        docs.append([s for s in sents if 6 <= len(s.split()) <= 40 and not re.search(r"[()\[\]\"“”]", s)])
    return docs


def build(data: Path, out: Path) -> None:
    rng = random.Random(0)
    poems = clean_poems(read_jsonl(data / "corpus" / "tang-poems.jsonl")[HELD_OUT])
    rng.shuffle(poems)
    addresses = read_jsonl(data / "corpus" / "state-of-the-union.jsonl")
    docs = prose_sentences(addresses)
    d = out / "data"

    # LAMBADA-style ------------------------------------------------------------------------------------
    lam_poems = []
    for title, author, lines in poems[:300]:
        text = "\n".join([title, author, *lines])
        assert text.endswith("。")
        lam_poems.append({"inputs_pretokenized": text[:-2], "targets_pretokenized": [text[-2]]})
    lam_prose = []
    for doc in docs:
        for i in range(2, len(doc)):
            last = doc[i]
            m = re.match(r"^(.*\s)([A-Za-z]{3,})\.$", last)
            if m and rng.random() < 0.08:
                context = " ".join(doc[i - 2:i] + [m.group(1).rstrip()])
                lam_prose.append({"inputs_pretokenized": context, "targets_pretokenized": [m.group(2)]})
    rng.shuffle(lam_prose)
    write_jsonl(d / "lambada-tiny" / "poems" / "test.jsonl", lam_poems)
    write_jsonl(d / "lambada-tiny" / "prose" / "test.jsonl", lam_prose[:200])

    # which line follows -----------------------------------------------------------------------------
    by_len: dict[int, list[str]] = {}
    for _, _, lines in poems:
        for line in lines:
            by_len.setdefault(len(line), []).append(line)
    mul_poems = []
    for title, author, lines in poems[300:600]:
        k = rng.randrange(1, len(lines))
        true = lines[k]
        own = set(lines)
        pool = [x for x in by_len[len(true)] if x not in own]
        choices = rng.sample(pool, 3) + [true]
        rng.shuffle(choices)
        mul_poems.append({"inputs_pretokenized": "\n".join([title, author, *lines[:k]]) + "\n",
                          "choices_pretokenized": choices, "label": choices.index(true)})
    all_sents = [s for doc in docs for s in doc]
    mul_prose = []
    for doc in docs:
        own = set(doc)
        for i in range(2, len(doc) - 1, 7):
            true = doc[i]
            others: list[str] = []
            while len(others) < 3:  # three sentences of other addresses
                s = all_sents[rng.randrange(len(all_sents))]
                if s not in own and s not in others:
                    others.append(s)
            choices = others + [true]
            rng.shuffle(choices)
            mul_prose.append({"inputs_pretokenized": " ".join(doc[i - 2:i]), "choices_pretokenized": [" " + c for c in choices],
                              "label": choices.index(true)})
    rng.shuffle(mul_prose)
    write_jsonl(d / "next-line" / "poems" / "test.jsonl", mul_poems)
    write_jsonl(d / "next-line" / "prose" / "test.jsonl", mul_prose[:200])

    # lettered, C-Eval style ---------------------------------------------------------------------------
    letters = []
    for item in mul_poems[:100]:
        head = item["inputs_pretokenized"].rstrip("\n").split("\n")
        question = (f"以下哪一句是《{head[0]}》（{head[1]}）中「{head[-1]}」的下一句？\n" +
                    "\n".join(f"{'ABCD'[j]}. {c}" for j, c in enumerate(item["choices_pretokenized"])) + "\n答案：")
        letters.append({"inputs_pretokenized": question, "choices_pretokenized": ["A", "B", "C", "D"],
                        "label": item["label"]})
    write_jsonl(d / "next-line-letters" / "test.jsonl", letters)

    # couplet continuation ---------------------------------------------------------------------------
    gen = []
    for title, author, lines in poems[600:700]:
        first, second = lines[0].split("，")
        gen.append({"inputs_pretokenized": f"{title}\n{author}\n{first}，", "targets_pretokenized": [second.rstrip("。")]})
    write_jsonl(d / "couplet" / "test.jsonl", gen)

    # language modelling -----------------------------------------------------------------------------
    lm = "\n\n".join("\n".join([t, a, *ls]) for t, a, ls in poems[700:760])
    (d / "poems-lm").mkdir(parents=True, exist_ok=True)
    (d / "poems-lm" / "test.txt").write_text(lm + "\n", encoding="utf-8")

    yamls = {
        "lambada-tiny.yaml": """\
            # LAMBADA-style last word (GLM-130B's tasks/lambada/lambada.yaml layout): the whole word must be produced
            name: "LAMBADA-tiny"
            type: "gen"
            module: "lambada"
            path: "data/lambada-tiny"
            file-pattern:
              poems: "poems/test.jsonl"
              prose: "prose/test.jsonl"
            use_task_mask: true
            max_gen_length: 6
            micro-batch-size: 16
            """,
        "next-line.yaml": """\
            # which line follows: per-choice log-likelihood, GLM-130B's multiple-choice layout ([MASK] appended)
            name: "NextLine-tiny"
            type: "mul"
            path: "data/next-line"
            file-pattern:
              poems: "poems/test.jsonl"
              prose: "prose/test.jsonl"
            length_normalization: [token]
            micro-batch-size: 16
            """,
        "next-line-letters.yaml": """\
            # C-Eval style: lettered options, the answer letter read from the letter tokens' logits (chat prompt)
            name: "NextLine-letters-tiny"
            type: "mul"
            path: "data/next-line-letters"
            file-pattern: "test.jsonl"
            prompt: chat
            scoring: letters
            micro-batch-size: 16
            """,
        "couplet.yaml": """\
            # the second half of a poem's first line
            name: "Couplet-tiny"
            type: "gen"
            path: "data/couplet"
            file-pattern: "test.jsonl"
            use_task_mask: true
            max_gen_length: 8
            stop: ["。", "\\n"]
            metrics: ["EM", "F1", "ROUGE", "BLEU"]
            micro-batch-size: 16
            """,
        "poems-lm.yaml": """\
            # held-out Tang poems as one document: GLM-130B's sliding windows
            name: "TangPoems-lm"
            type: "lm"
            path: "data/poems-lm"
            file-pattern: "test.txt"
            use_task_mask: true
            max_seq_length: 512
            generation_length: 128
            metrics: ["TokenPPL", "BPB"]
            micro-batch-size: 8
            """,
    }
    import textwrap

    for name, text in yamls.items():
        (out / name).write_text(textwrap.dedent(text), encoding="utf-8")
    print(f"wrote {out}: lambada poems {len(lam_poems)}, prose {min(len(lam_prose), 200)}; next-line poems "
          f"{len(mul_poems)}, prose {min(len(mul_prose), 200)}; letters {len(letters)}; couplet {len(gen)}; "
          f"lm {len(lm)} characters")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "glmkit" / "assets" / "tasks"))
    args = p.parse_args()
    build(Path(args.data), Path(args.out))


if __name__ == "__main__":
    main()
