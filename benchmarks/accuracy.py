"""Relative L2 logits error of INT8/INT4 quantize-on-load against the float model, beside ChatGLM-6B's own scheme,
and what quantizing the output layer and embedding costs (logits error and held-out cross-entropy).

    python benchmarks/accuracy.py            # two tables, ~2 min on 2 cores

Models (ChatGLM-6B layout, fp32, each saved as a checkpoint and loaded back through
``glmkit.load_model(dir, quantize=...)``, the real quantize-on-load path):

* glm-tiny: the bundled model (trained, 4 layers, hidden 192), on 8 held-out Tang poems of ../shared/data
  (random token ids when the data folder is absent);
* random: 4 layers, hidden 256, inner 1024, matrices N(0, 0.12^2), five seeds, 2 x 32 random token ids each.
  Random models at this scale are chaotic (attention close to argmax), so one seed says little; the mean ratio
  to the original's error is the figure to read.

"int8/int4 GPTQ": `glmkit quantize --calibrate` (glmkit.quant.calibrate) on the bundled calibration text, for
glm-tiny (the random models have no tokenizer).

"original": the float weights replaced by ChatGLM-6B's quantize() result, written from its formula
(``scale = (absmax / qmax).half()``, ``q = round(w / scale)``), in place of the four linears of every layer.

The first table compares the layers' schemes alone (output layer and embedding kept in floating point, as the
original's quantize() keeps them); "int4 g32 MSE-fit" is the group scheme with clipping search and least-squares
refits (glmkit's INT4 default before the output layer was quantized). The second table is glm-tiny with the output
layer and embedding in floating point, INT8 (the default) or INT4, on top of INT4 or INT8 layers: the logits error
(ratio to the original's INT4, which leaves them in floating point) and the per-character cross-entropy on 300
held-out Tang poems (glmkit.evaluation.perplexity.score_texts), in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import glmkit  # noqa: E402
import glmkit.quant.formats as F  # noqa: E402  (quantize-on-load calls formats.quantize_group)
from glmkit.core.config import GLMConfig  # noqa: E402
from glmkit.core.model import GLM  # noqa: E402
from glmkit.evaluation.perplexity import score_texts  # noqa: E402
from glmkit.loading.loader import save_model  # noqa: E402
from glmkit.quant.calibrate import calibrate_and_quantize  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "corpus" / "tang-poems.jsonl"
LAYERS = dict(quantize_head="none")  # the layers' schemes alone
VARIANTS = {"int8": dict(quantize="int8", **LAYERS), "int4 g32 (default)": dict(quantize="int4", **LAYERS),
            "int4 g32 MSE-fit": dict(quantize="int4", mse_fit=True, **LAYERS),
            "int4 g64": dict(quantize="int4", group_size=64, **LAYERS),
            "int4 g128": dict(quantize="int4", group_size=128, **LAYERS)}
HEADS = {"int4, head float": dict(quantize="int4", quantize_head="none"),
         "int4, head int8 (default)": dict(quantize="int4"),
         "int4, head int4": dict(quantize="int4", quantize_head="int4"),
         "int8, head float": dict(quantize="int8", quantize_head="none"),
         "int8, head int8 (default)": dict(quantize="int8")}
def load(folder: Path, dtype: torch.dtype = torch.float32, mse_fit: bool = False, **kw) -> GLM:
    """glmkit.load_model, with mse_fit=True under the earlier INT4 rounding (quantize_group's MSE fit)."""
    plain = F.quantize_group
    if mse_fit:
        F.quantize_group = lambda w, group_size, symmetric=False: plain(w, group_size, symmetric, mse_fit=True)
    try:
        return glmkit.load_model(folder, dtype=dtype, **kw)
    finally:
        F.quantize_group = plain


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def original_scheme(model: GLM, bits: int) -> GLM:
    """ChatGLM-6B's quantize(): per-row absmax, fp16 scale, round to nearest; dequantized in fp32."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for block in model.h:
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                w = lin.weight.float()
                scale = (w.abs().max(dim=-1).values / qmax).half()
                lin.weight.copy_(torch.round(w / scale[:, None]).clamp(-qmax, qmax) * scale.float()[:, None])
    return model


def errors(folder: Path, ids: torch.Tensor, calibrate: bool = False) -> dict[str, float]:
    float_model = glmkit.load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = float_model(ids)
        out = {f"original int{b}": rel_err(original_scheme(glmkit.load_model(folder, dtype=torch.float32), b)(ids),
                                           ref) for b in (8, 4)}
        for name, kw in VARIANTS.items():
            out[name] = rel_err(load(folder, **kw)(ids), ref)
        for bits in (8, 4):  # `glmkit quantize --calibrate` on the bundled calibration text
            name = f"int{bits} GPTQ" + (" g32" if bits == 4 else "")
            out[name] = float("nan")
            if calibrate:
                model = calibrate_and_quantize(glmkit.load_model(folder, dtype=torch.float32),
                                               glmkit.load_tokenizer(folder), bits, progress=False)
                out[name] = rel_err(model(ids), ref)
    return out


def heldout_texts(n: int = 300) -> list[str]:
    """The last n Tang poems: held out from glm-tiny's tokenizer and training (scripts/train_glm_tiny.sh)."""
    lines = SHARED.read_text(encoding="utf-8").splitlines()[-n:]
    return [json.loads(line)["text"] for line in lines]


def head_table(folder: Path, ids: torch.Tensor) -> None:
    """glm-tiny: the output layer and embedding in floating point, INT8 or INT4 (logits error, held-out CE)."""
    tok = glmkit.load_tokenizer(folder)
    texts = heldout_texts() if SHARED.exists() else []
    float_model = glmkit.load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = float_model(ids)
        original = rel_err(original_scheme(glmkit.load_model(folder, dtype=torch.float32), 4)(ids), ref)

    def ce(model) -> float:
        return score_texts(model, tok, texts, batch_size=16, progress=False).char_ce if texts else float("nan")

    rows = [("float", None, ce(float_model), ce(glmkit.load_model(folder, dtype=torch.bfloat16)))]
    for name, kw in HEADS.items():
        model = load(folder, **kw)
        with torch.no_grad():
            err = rel_err(model(ids), ref)
        rows.append((name, err, ce(model), ce(load(folder, torch.bfloat16, **kw))))
    print(f"\nglm-tiny: the output layer and embedding (logits error on the poems above; per-character CE on "
          f"{len(texts)} held-out Tang poems, nats)")
    print(f"{'model':<28}{'logits error':>14}{'/ original int4':>17}{'CE fp32':>10}{'CE bf16':>10}")
    for name, err, ce32, ce16 in rows:
        cells = ("-", "-") if err is None else (f"{err:.4f}", f"{err / original:.2f}x")
        print(f"{name:<28}{cells[0]:>14}{cells[1]:>17}{ce32:>10.4f}{ce16:>10.4f}")


def poem_ids(folder: Path, n: int = 8, length: int = 48) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    gmask, sop = config["gmask_token_id"], config["bos_token_id"]
    if not SHARED.exists():
        return torch.randint(10, gmask - 10, (n, length), generator=torch.Generator().manual_seed(0))
    tok = glmkit.load_tokenizer(folder)
    rows = []
    for line in reversed(SHARED.read_text(encoding="utf-8").splitlines()):
        ids = list(tok.encode(json.loads(line)["text"]))
        if len(ids) >= length:
            rows.append(ids[:length - 2] + [gmask, sop])
        if len(rows) == n:
            break
    return torch.tensor(rows)


def random_model(folder: Path, seed: int) -> Path:
    config = GLMConfig.from_name("chatglm-6b", vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4,
                                 ffn_hidden_size=1024, max_seq_len=256, bos_token_id=994, eos_token_id=995,
                                 mask_token_id=990, gmask_token_id=991, pad_token_id=3, torch_dtype="float32")
    torch.manual_seed(seed)  # the biases keep nn.Linear's default init
    model = GLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.12)
    save_model(model, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="random models to average over")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    tiny = ROOT / "glmkit" / "assets" / "glm-tiny"
    rows.append(("glm-tiny", errors(tiny, poem_ids(tiny), calibrate=True)))
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = []
        for seed in range(args.seeds):
            folder = random_model(Path(tmp) / f"r{seed}", seed)
            ids = torch.randint(10, 990, (2, 32), generator=torch.Generator().manual_seed(100 + seed))
            ids[:, -2:] = torch.tensor([991, 994])
            per_seed.append(errors(folder, ids))
        mean = {k: sum(e[k] for e in per_seed) / len(per_seed) for k in per_seed[0]}
        rows.append((f"random, mean of {args.seeds}", mean))
        ratio = {k: sum(e[k] / e["original int" + ("8" if k.startswith(("int8", "original int8")) else "4")]
                        for e in per_seed) / len(per_seed) for k in per_seed[0]}
    cols = list(rows[0][1])
    print("relative L2 logits error vs the float model (lower is better)")
    print(f"{'model':<22}" + "".join(f"{c:>20}" for c in cols))
    def cell(v: float, fmt: str) -> str:
        return f"{'-':>20}" if v != v else format(v, fmt)  # nan: not measured

    def base(e: dict, c: str) -> float:
        return e["original int8" if c.startswith(("int8", "original int8")) else "original int4"]

    for name, e in rows:
        print(f"{name:<22}" + "".join(cell(e[c], ">20.4f") for c in cols))
        print(f"{'  / original':<22}" + "".join(cell(e[c] / base(e, c), ">19.2f") + ("" if e[c] != e[c] else "x")
                                               for c in cols))
    print(f"{'random, mean ratio':<22}" + "".join(cell(ratio[c], ">19.2f") + ("" if ratio[c] != ratio[c] else "x")
                                                   for c in cols))
    head_table(tiny, poem_ids(tiny))


if __name__ == "__main__":
    main()
