"""Copies the trained glm-tiny into glmkit/assets/glm-tiny and writes its model card (README.md) from the two
training runs' logs and the held-out evaluations. Run by scripts/train_glm_tiny.sh.

    python scripts/glm_tiny_card.py --model out/glm-tiny/run-bodies/final --runs out/glm-tiny/run \
        out/glm-tiny/run-bodies --eval-bodies out/glm-tiny/eval-bodies.json --eval-full out/glm-tiny/eval-full.json \
        --eval-poem-gen out/glm-tiny/eval-poem-gen.json --output glmkit/assets/glm-tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

from safetensors import safe_open

import glmkit
from glmkit.core.fill import fill


def run_summary(run: Path) -> dict:
    rows = list(csv.DictReader(open(run / "log.csv", encoding="utf-8")))
    cfg = json.loads((run / "pretrain_config.json").read_text(encoding="utf-8"))
    evals = [r for r in rows if r["eval_loss"]]
    return {"steps": int(rows[-1]["step"]), "tokens": int(rows[-1]["tokens"]), "minutes": float(rows[-1]["elapsed_s"]) / 60,
            "loss": float(rows[-1]["loss"]), "eval_loss": float(evals[-1]["eval_loss"]) if evals else math.nan,
            "config": cfg}


def eval_row(name: str, ev: dict) -> str:
    return (f"| {name} | {ev['documents']} | {ev['characters']} | {ev['char_ce']:.3f} | {ev['unigram_char_ce']:.3f} | "
            f"**{100 * ev['reduction_vs_unigram']:.1f}%** |")


def samples(model_dir: Path) -> str:
    model, tok = glmkit.load_model(model_dir), glmkit.load_tokenizer(model_dir)
    lines = []
    for prompt in ("床前明月[MASK]，疑是地上霜。", "春江花月夜\n", "白日依山盡，[sMASK]"):
        res = fill(model, tok, prompt, max_new_tokens=16, gmask_max_new_tokens=48, repetition_penalty=1.1)
        lines.append(f"    {prompt!r}\n    -> {res.text!r}")
    return "\n\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--runs", type=Path, nargs=2, required=True, help="stage 1 and stage 2 pretraining out_dirs")
    p.add_argument("--stage1-note", default=None,
                   help="describes stage 1 when its out_dir (log.csv) is not on this machine")
    p.add_argument("--eval-bodies", type=Path, required=True)
    p.add_argument("--eval-full", type=Path, required=True)
    p.add_argument("--eval-poem-gen", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    a = p.parse_args()
    a.output.mkdir(parents=True, exist_ok=True)
    for f in a.model.iterdir():
        if f.is_file():
            shutil.copy2(f, a.output / f.name)
    cfg = json.loads((a.output / "config.json").read_text(encoding="utf-8"))
    with safe_open(str(a.output / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    size_mb = sum(f.stat().st_size for f in a.output.iterdir() if f.is_file() and f.name != "README.md") / 1e6
    s2 = run_summary(a.runs[1])
    if (a.runs[0] / "log.csv").exists():
        s1 = run_summary(a.runs[0])
        stage1 = f"{s1['steps']} steps, {s1['tokens'] / 1e6:.1f} M tokens, {s1['minutes']:.0f} min"
    elif a.stage1_note:
        stage1 = a.stage1_note
    else:
        raise SystemExit(f"no {a.runs[0] / 'log.csv'}; pass --stage1-note")
    bodies, full, poem_gen = (json.loads(x.read_text(encoding="utf-8"))
                              for x in (a.eval_bodies, a.eval_full, a.eval_poem_gen))
    card = f"""# glm-tiny

glmkit's bundled model: a small **ChatGLM-6B-architecture** model (2D rotary positions, DeepNorm with the original's
α = √56, prefix-LM attention, non-gated tanh-GELU MLP) with its own ChatGLM-6B-layout SentencePiece tokenizer
(`ice_text.model`, {cfg['vocab_size']} ids, byte fallback), pretrained from scratch by GLM blank infilling with
`glmkit pretrain`. The folder is a THUDM ChatGLM-6B checkpoint (`config.json` model_type `chatglm`, THUDM tensor
names) whose α is the one THUDM's own `modeling_chatglm.py` computes (√56 at every depth), so `glmkit.load_model("glm-tiny")`,
`glmkit chat`, `glmkit fill` and `glmkit generate` use it like the published models. It is a toy: it writes
poem-like text, not sense.

| | |
|---|---|
| parameters | {n_params / 1e6:.2f} M ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, FFN {cfg['inner_hidden_size']}) |
| files | {cfg['torch_dtype']} safetensors + tokenizer, {size_mb:.1f} MB |
| training data | `shared/data/corpus`: Tang poems 0-38999 (whole, and their bodies on one line), Song ci, Analects/Book of Songs, Moby-Dick, State of the Union |
| held out | Tang poems 39000-39999 (`tang-poems.jsonl` lines 39001-40000): never seen by the tokenizer or the model |
| stage 1 | `configs/glm-tiny.yaml` with `model.alpha_num_layers=4` (α = √8): {stage1} |
| α = √56 | stage 1's weights rewritten exactly for ChatGLM-6B's α = √56 (`rescale_deepnorm`: each output projection × √56/√8; every LayerNorm input is scaled by the same factor, so the logits are unchanged) |
| stage 2 | `configs/glm-tiny-bodies.yaml` from there with α = √56: {s2['steps']} steps, {s2['tokens'] / 1e6:.1f} M tokens, {s2['minutes']:.0f} min on 2 shared CPU threads |
| final losses | training {s2['loss']:.3f}, held-out blank infilling {s2['eval_loss']:.3f} nats/token (Part B targets) |

## Held-out evaluation

Each text is scored as `encode("")` (= `[gMASK] <sop>`) followed by `encode(text, add_special_tokens=False)`, in
nats per character, against a character unigram model of the whole corpus (add-one smoothing) on the same
characters (`glmkit eval ppl --model glm-tiny --data FILE --unigram-corpus ../shared/data/corpus`):

| texts | documents | characters | glm-tiny | unigram | reduction |
|---|---|---|---|---|---|
{eval_row("held-out poem bodies (one line, no title or author)", bodies)}
{eval_row("held-out whole poems (title, author, lines)", full)}
{eval_row("poem-gen dev bodies (in the training poems)", poem_gen)}

## Samples (greedy, `glmkit fill`)

{samples(a.output)}

## Reproduce

    scripts/train_glm_tiny.sh        # tokenizer, both stages, these evaluations, this folder
"""
    (a.output / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
