"""`glmkit eval ppl`: per-token loss, perplexity and per-character cross-entropy of a model on held-out text.

Each document is scored as a continuation from an empty context, exactly as the model generates text:

    input  = tokenizer.encode("")  +  tokenizer.encode(text, add_special_tokens=False)
           = [gMASK] <sop> t1 ... tn                      (ChatGLM-6B layout; other families: their prefix)
    loss   = -log p(t1 | prefix) - ... - log p(tn | prefix, t1..tn-1)   (natural log; no <eop> term)

with the model's own positions and attention mask (`GLM.default_position_ids` / `default_attention_mask`).
per-token loss = Σ loss / Σ n;  perplexity = exp(per-token loss);  per-character CE = Σ loss / Σ len(text)
(nats per character, independent of the tokenizer). `--unigram-corpus` adds the baseline: a character unigram
model fitted on a corpus (add-one smoothing), scored on the same texts; glm-tiny's acceptance test is a
per-character CE at least 20% below it.

`python -m glmkit.evaluate card ...` writes the bundled model's README (used by scripts/train_glm_tiny.sh).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from glmkit.data.corpus import Source, corpus_files, iter_documents, iter_file_documents


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
    """Documents of a .jsonl/.txt file or folder (see glmkit.data.corpus), at most `limit` of them."""
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
    device = model.wte.weight.device
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


# ------------------------------------------------------------------------------------------------------- model card
def write_card(model_dir: Path, run_dir: Path, eval_json: Path, output: Path) -> None:
    """Copies the exported model into `output` and writes its README.md from the run's log and the evaluation."""
    import shutil

    output.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, output / f.name)
    ev = json.loads(eval_json.read_text(encoding="utf-8"))
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(run_dir / "log.csv", encoding="utf-8")))
    last = rows[-1]
    evals = [r for r in rows if r["eval_loss"]]
    size_mb = sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6
    weights_mb = (output / "model.safetensors").stat().st_size / 1e6
    train_s = float(last["elapsed_s"])  # cumulative over resumed invocations
    cfg_file = run_dir / "pretrain_config.json"
    if cfg_file.exists():
        run_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    else:  # runs started before pretrain wrote pretrain_config.json: the checkpoint carries the config
        run_cfg = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["config"]
    seq_len, blank = run_cfg["data"]["seq_len"], run_cfg["data"]["blank"]
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    bert, sent = float(blank.get("bert_prob", 0.5)), float(blank.get("sentence_prob", 0.0))
    objectives = (f"[MASK] spans {bert:.0%}, [sMASK] sentences {sent:.0%}, [gMASK] suffixes {1 - bert - sent:.0%} "
                  f"(of which {float(blank.get('gpt_full_prob', 0.0)):.0%} whole documents)")
    samples = _card_samples(output)
    unigram = ev.get("unigram_char_ce")
    ratio = (1 - ev["char_ce"] / unigram) * 100 if unigram else None
    card = f"""# glm-tiny

glmkit's bundled model: a small **ChatGLM-6B-architecture** model (2D rotary positions, DeepNorm, prefix-LM
attention, non-gated GELU MLP) with its own ChatGLM-6B-layout SentencePiece tokenizer (`ice_text.model`,
{cfg['vocab_size']} ids, byte fallback), pretrained from scratch by GLM blank infilling with `glmkit pretrain`.
The folder is a THUDM ChatGLM-6B checkpoint (`config.json` model_type `chatglm`, THUDM tensor names), so
`glmkit.load_model("glm-tiny")`, `glmkit.load_tokenizer("glm-tiny")`, `glmkit chat`, `glmkit fill` and
`glmkit generate` use it like the published models. It is a toy: it writes poem-like text, not sense.

| | |
|---|---|
| parameters | {n_params / 1e6:.2f} M ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, FFN {cfg['inner_hidden_size']}) |
| weights | {cfg['torch_dtype']} safetensors, {weights_mb:.1f} MB; whole folder {size_mb:.1f} MB |
| training data | `shared/data/corpus` (Tang poems 0-38999, Song ci, Analects/Book of Songs, Moby-Dick, State of the Union) |
| held out | Tang poems 39000-39999 (`tang-poems.jsonl` lines 39001-40000): never seen by the tokenizer or the model |
| objectives | per document: {objectives} (configs/glm-tiny.yaml) |
| training | {last['step']} steps, {int(last['tokens']) / 1e6:.1f} M tokens in packed rows of {seq_len}, {train_s / 60:.1f} min wall time on 2 shared CPU threads |
| final training loss | {float(last['loss']):.3f} nats/token (Part B targets) |
| held-out blank-infilling loss | {float(evals[-1]['eval_loss']) if evals else float('nan'):.3f} nats/token (same objective mix, held-out poems) |

## Held-out Tang poems ({ev['documents']} poems, {ev['characters']} characters)

Scored as `encode("")` (= `[gMASK] <sop>`) followed by `encode(poem, add_special_tokens=False)`
(`glmkit eval ppl --model glm-tiny --data tang-heldout.jsonl --unigram-corpus ../shared/data/corpus`):

| metric | value |
|---|---|
| per-token loss | {ev['token_loss']:.3f} nats (perplexity {ev['perplexity']:.1f}) |
| per-character cross-entropy | **{ev['char_ce']:.3f} nats/char** |
| character unigram model of the whole corpus (add-one) | {unigram if unigram else float('nan'):.3f} nats/char |
| reduction vs unigram | **{ratio if ratio is not None else float('nan'):.1f}%** (required: at least 20%) |

## Samples (greedy, `glmkit fill`)

{samples}

## Reproduce

    scripts/train_glm_tiny.sh        # tokenizer, pretraining, this evaluation, copy into glmkit/assets/glm-tiny
"""
    (output / "README.md").write_text(card, encoding="utf-8")


def _card_samples(model_dir: Path) -> str:
    """A few greedy `glmkit fill` outputs of the model, for its card."""
    from glmkit.fill import fill
    from glmkit.loader import load_model
    from glmkit.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype="float32").eval()
    tok = load_tokenizer(model_dir)
    lines = []
    for prompt in ("床前明月[MASK]，疑是地上霜。", "春江花月夜\n", "白日依山盡，[sMASK]"):
        res = fill(model, tok, prompt, max_new_tokens=16, gmask_max_new_tokens=48, repetition_penalty=1.1)
        lines.append(f"    {prompt!r}\n    -> {res.text!r}")
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmkit eval", description="Evaluate a model.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="per-token loss and perplexity (plus per-character CE) on a text file",
                         description="Scores every document of --data as a continuation of tokenizer.encode('') "
                                     "(ChatGLM-6B: [gMASK] <sop>) and prints per-token loss, perplexity and "
                                     "per-character cross-entropy (nats).")
    ppl.add_argument("--model", default="glm-tiny", help="model folder, bundled name or hub id (default glm-tiny)")
    ppl.add_argument("--data", required=True, help=".jsonl ({\"text\": ...} per line), .txt or a folder of them")
    ppl.add_argument("--key", default="text", help="JSON field holding the text (default text)")
    ppl.add_argument("--limit", type=int, help="score only the first N documents")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-tokens", type=int, help="cut documents to this many tokens (default: model max)")
    ppl.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    ppl.add_argument("--unigram-corpus", nargs="+", metavar="PATH",
                     help="also report a character unigram model fitted on these files/folders")
    ppl.add_argument("--json", metavar="FILE", help="write the numbers to this JSON file")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")

    card = sub.add_parser("card", help="copy an exported model into a folder and write its README (glm-tiny)")
    card.add_argument("--model", required=True, help="exported model folder (pretrain's out_dir/final)")
    card.add_argument("--run", required=True, help="the pretraining out_dir (log.csv)")
    card.add_argument("--eval", required=True, help="the JSON written by `eval ppl --json`")
    card.add_argument("--output", required=True, help="destination folder")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "card":
        write_card(Path(args.model), Path(args.run), Path(args.eval), Path(args.output))
        print(f"wrote {args.output}")
        return 0
    from glmkit.loader import load_model
    from glmkit.tokenizer import load_tokenizer

    try:
        texts = read_texts(args.data, args.key, args.limit)
        model = load_model(args.model, dtype=args.dtype)
        tokenizer = load_tokenizer(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit eval ppl: {e}", file=sys.stderr)
        return 2
    model.eval()
    res = score_texts(model, tokenizer, texts, batch_size=args.batch_size, max_tokens=args.max_tokens,
                      progress=not args.no_progress)
    out = {"model": str(args.model), "data": str(args.data), **res.as_dict()}
    print(f"documents {res.documents}  tokens {res.tokens}  characters {res.characters}")
    print(f"per-token loss {res.token_loss:.4f} nats  perplexity {res.perplexity:.2f}")
    print(f"per-character cross-entropy {res.char_ce:.4f} nats/char")
    if args.unigram_corpus:
        uni = unigram_char_ce(char_unigram_counts(args.unigram_corpus, args.key), texts_scored(texts, tokenizer,
                                                                                                res, args, model))
        out["unigram_char_ce"] = uni
        out["reduction_vs_unigram"] = 1 - res.char_ce / uni
        print(f"character unigram CE {uni:.4f} nats/char  ->  model is {100 * (1 - res.char_ce / uni):.1f}% lower")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def texts_scored(texts: Sequence[str], tokenizer, res: PplResult, args, model) -> list[str]:
    """The texts as the model scored them (cut to the token limit), so both numbers cover the same characters."""
    prefix = tokenizer.encode("")
    limit = (args.max_tokens or model.config.max_seq_len) - len(prefix)
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(tokenizer.decode(ids[:limit]) if len(ids) > limit else text)
    return out


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
