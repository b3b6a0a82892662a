"""INT4/INT8 formats side by side with the ones chatglm.cpp / llama.cpp users run (ggml's q4_0, q4_1, q8_0), on the
same weights: bits per weight, decode bytes per token at the ChatGLM-6B shape, held-out cross-entropy delta on
glm-tiny and relative logits error (glm-tiny, and an 8-layer ChatGLM-6B-shaped random checkpoint).

    python benchmarks/quant_formats.py                 # glm-tiny table (~5 min on 2 busy cores)
    python benchmarks/quant_formats.py --big 8         # + the 8-layer ChatGLM-6B-shaped checkpoint (~9 GB RAM)

ggml's formats are reimplemented here from ggml's reference quantizers (ggml-quants.c: quantize_row_q4_0_ref,
quantize_row_q4_1_ref, quantize_row_q8_0_ref, and their dequantize_row_*), operation by operation in fp32, so
no build is needed:

* q4_0: blocks of 32; the value of largest magnitude ``max`` (first one on ties), ``d = max / -8``,
  ``id = 1/d`` (from the fp32 d), ``q = min(15, (int8)(x*id + 8.5))``, d stored as fp16; ``w = (q - 8) * d``.
  4.5 bits per weight.
* q4_1: blocks of 32; ``d = (max - min) / 15``, ``q = min(15, (int8)((x - min)*id + 0.5))``, d and min stored as
  fp16; ``w = q * d + m``. 5 bits per weight.
* q8_0: blocks of 32; ``d = amax / 127``, ``q = roundf(x * id)`` (half away from zero), fp16 d; 8.5 bits.

chatglm.cpp quantizes the four linears of every layer and the embedding / output layer alike; so does this
benchmark for the ggml rows (fake quantization: the float weights replaced by their dequantized values, the
model run in fp32). glmkit's rows go through the real path, ``glmkit.load_model(dir, quantize=..., group_size=...,
quantize_head=...)``, in fp32 (fp32 activations dequantize exactly). "fp16 s/z" rows are fake-quantized (glmkit's
CPU kernel keeps bf16 scales and zeros): they say what fp16 parameters would buy.

Bytes per weight count what decode reads: glmkit's CPU INT4 kernel keeps a bf16 (scale, zero) pair per group
(symmetric groups too), so group g costs 4 + 32/g bits; INT8 rows 8 bits + an fp16 scale per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import glmkit  # noqa: E402
from accuracy import poem_ids  # noqa: E402  (the same held-out rows as benchmarks/accuracy.py)
from glmkit.evaluation.perplexity import score_texts  # noqa: E402

TINY = ROOT / "glmkit" / "assets" / "glm-tiny"
SHARED = ROOT.parent / "shared" / "data" / "corpus" / "tang-poems.jsonl"
CHATGLM6B_LAYER_WEIGHTS = 12 * 4096 * 4096  # qkv + dense + h_to_4h + 4h_to_h
CHATGLM6B_HEAD_WEIGHTS = 130528 * 4096


# ------------------------------------------------------------------------------------------------ ggml reference


def _blocks(w: torch.Tensor, qk: int = 32) -> torch.Tensor:
    if w.shape[-1] % qk:
        raise ValueError(f"row length {w.shape[-1]} is not a multiple of ggml's block size {qk}")
    return w.float().reshape(-1, qk)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def ggml_q4_0(w: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_0_ref then dequantize_row_q4_0: the fp32 values a q4_0 tensor holds."""
    x = _blocks(w)
    idx = x.abs().argmax(dim=-1, keepdim=True)  # first index of the largest |v|, as the strict `amax < |v|` loop
    d = torch.gather(x, 1, idx) / -8
    q = torch.trunc(x * _inverse(d) + 8.5).clamp_(max=15)  # (int8_t) truncates; the sum is >= 0.5 here
    return ((q - 8) * d.half().float()).reshape(w.shape)


def ggml_q4_1(w: torch.Tensor) -> torch.Tensor:
    """quantize_row_q4_1_ref then dequantize_row_q4_1."""
    x = _blocks(w)
    mn, mx = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    d = (mx - mn) / 15
    q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp_(max=15)
    return (q * d.half().float() + mn.half().float()).reshape(w.shape)


def ggml_q8_0(w: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref then dequantize_row_q8_0 (roundf: halves away from zero)."""
    x = _blocks(w)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    t = x * _inverse(d)
    r = torch.trunc(t)
    q = r + torch.sign(t) * ((t - r).abs() >= 0.5)
    return (q * d.half().float()).reshape(w.shape)


def fp16_group(w: torch.Tensor, group: int) -> torch.Tensor:
    """glmkit's asymmetric min-max group grid with fp16 instead of bf16 scale and zero (not a kernel layout)."""
    x = w.float().reshape(-1, group)
    mn, mx = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    s = ((mx - mn) / 15).half().float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = (mn + 8 * s).half().float()
    q = torch.round((x - z) / s).clamp_(-8, 7)
    return (q * s + z).reshape(w.shape)


def original_rowwise(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """ChatGLM-6B's quantize(): per-row absmax, fp16 scale, round to nearest."""
    qmax = 2 ** (bits - 1) - 1
    x = w.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).half().float()
    return torch.round(x / scale).clamp_(-qmax, qmax) * scale


def fake_quantize(model, fn, head: bool = True, source=None):
    """Replaces the four linears of every layer (and the embedding / output layer when `head`) by fn(weight),
    ~1M weights at a time. `source(name, param)` gives the float weight (default: the parameter itself)."""
    params = {}
    for i, block in enumerate(model.h):
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            params[id(lin.weight)] = lin.weight
    if head:
        params[id(model.wte.weight)] = model.wte.weight
        params[id(model.lm_head.weight)] = model.lm_head.weight  # tied: the same tensor, once
    with torch.no_grad():
        for p in params.values():
            w = source(p) if source else p
            rows = max(1, 2**20 // p.shape[1])
            for a in range(0, p.shape[0], rows):
                p[a:a + rows].copy_(fn(w[a:a + rows].float()))
    return model


# ------------------------------------------------------------------------------------------------ the formats

def g_bits(group: int) -> float:
    return 4 + 32 / group


def spec_bits(spec: dict | None) -> float:
    """Bits per weight decode reads for a glmkit layer spec (None: floating point, bf16)."""
    if spec is None:
        return 16.0
    if spec["bits"] == 8:
        return 8 + 16 / 4096
    return g_bits(spec["group_size"]) if spec["scheme"] == "group" else 4 + 16 / 4096


def glmkit_format(quantize: str, group_size: int | None = None, quantize_head=None, scheme: str | None = None):
    """The FORMATS tuple of `glmkit.load_model(dir, quantize=..., group_size=..., quantize_head=...)`, with its bits
    per weight from glmkit's own defaults."""
    from glmkit.quant.formats import default_spec, head_spec

    bits = 8 if quantize == "int8" else 4
    kw = {k: v for k, v in dict(quantize=quantize, group_size=group_size, quantize_head=quantize_head,
                                 scheme=scheme).items() if v is not None}
    layers = default_spec(bits, group_size, scheme)
    return ("load", kw, spec_bits(layers), spec_bits(head_spec(quantize_head, bits)))


GGML_TYPES = {"q4_0": ("fake", ggml_q4_0, 4.5, 4.5), "q4_1": ("fake", ggml_q4_1, 5.0, 5.0),
              "q8_0": ("fake", ggml_q8_0, 8.5, 8.5)}


# name -> (kind, argument, bits per weight in the layers, in the output layer / embedding)
FORMATS: dict[str, tuple[str, object, float, float]] = {
    "glmkit int4 (default)": glmkit_format("int4"),
    "ggml q8_0": ("fake", ggml_q8_0, 8.5, 8.5),
    "ggml q4_1": ("fake", ggml_q4_1, 5.0, 5.0),
    "ggml q4_0": ("fake", ggml_q4_0, 4.5, 4.5),
    "original int4 (head float)": ("fake_layers", original_rowwise, 4.0 + 16 / 4096, 16),
    "glmkit int8 (head float)": ("load", dict(quantize="int8"), 8 + 16 / 4096, 16),
    "int4 g32 + int8 head (old default)": ("load", dict(quantize="int4", group_size=32, quantize_head="int8"),
                                           g_bits(32), 8),
    "int4 g64 + int8 head": ("load", dict(quantize="int4", group_size=64, quantize_head="int8"), g_bits(64), 8),
    "int4 g128 + int8 head": ("load", dict(quantize="int4", group_size=128, quantize_head="int8"), g_bits(128), 8),
    "int4 g32 + int4 g32 head": ("load", dict(quantize="int4", group_size=32,
                                              quantize_head={"bits": 4, "group_size": 32}), g_bits(32), g_bits(32)),
    "int4 g64 + int4 g64 head": ("load", dict(quantize="int4", group_size=64,
                                              quantize_head={"bits": 4, "group_size": 64}), g_bits(64), g_bits(64)),
    "int4 g128 + int4 g128 head": ("load", dict(quantize="int4", group_size=128,
                                                quantize_head={"bits": 4, "group_size": 128}), g_bits(128),
                                   g_bits(128)),
    "int4 g128 + int4 g32 head": ("load", dict(quantize="int4", group_size=128,
                                               quantize_head={"bits": 4, "group_size": 32}), g_bits(128), g_bits(32)),
    "int4 g64 + int4 g32 head": ("load", dict(quantize="int4", group_size=64,
                                              quantize_head={"bits": 4, "group_size": 32}), g_bits(64), g_bits(32)),
    "int4 g64 MSE-fit + int4 g32 MSE-fit head": ("mse", dict(quantize="int4", group_size=64,
                                                             quantize_head={"bits": 4, "group_size": 32}),
                                                 g_bits(64), g_bits(32)),
    "int4 g64 sym + int4 g64 sym head": ("load", dict(quantize="int4", group_size=64, scheme="group-symmetric",
                                                      quantize_head={"bits": 4, "group_size": 64, "symmetric": True}),
                                         g_bits(64), g_bits(64)),
    "int4 g64 MSE-fit + same head": ("mse", dict(quantize="int4", group_size=64,
                                                 quantize_head={"bits": 4, "group_size": 64}), g_bits(64),
                                     g_bits(64)),
    "int4 g64 fp16 s/z + same head": ("fake", lambda w: fp16_group(w, 64), g_bits(64), g_bits(64)),
}


def bytes_per_token(layer_bits: float, head_bits: float, layers: int) -> float:
    """Weight bytes decode reads per token at the ChatGLM-6B shape (norms, biases, KV cache left out)."""
    return (layers * CHATGLM6B_LAYER_WEIGHTS * layer_bits + CHATGLM6B_HEAD_WEIGHTS * head_bits) / 8


def build(folder: Path, name: str, source=None, dtype: torch.dtype = torch.float32):
    """The model of format `name` (a FORMATS key or tuple) on the checkpoint in folder."""
    kind, arg, _, _ = FORMATS[name] if isinstance(name, str) else name
    if kind == "load":
        return glmkit.load_model(folder, dtype=dtype, **arg)
    if kind == "mse":
        import glmkit.quant.formats as F

        plain = F.quantize_group
        F.quantize_group = lambda w, group_size, symmetric=False: plain(w, group_size, symmetric, mse_fit=True)
        try:
            return glmkit.load_model(folder, dtype=dtype, **arg)
        finally:
            F.quantize_group = plain
    model = glmkit.load_model(folder, dtype=dtype)
    return fake_quantize(model, arg, head=(kind == "fake"), source=source)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------ glm-tiny


def heldout_texts(n: int = 300) -> list[str]:
    """The last n Tang poems: held out from glm-tiny's tokenizer and training (scripts/train_glm_tiny.sh)."""
    lines = SHARED.read_text(encoding="utf-8").splitlines()[-n:]
    return [json.loads(line)["text"] for line in lines]


def tiny_table(names, n_texts: int = 300) -> dict[str, dict]:
    """glm-tiny: per-character CE on held-out poems (delta to fp32) and logits error on 8 held-out poems. `names`:
    FORMATS keys, or a dict of name -> FORMATS-like tuple."""
    formats = names if isinstance(names, dict) else {n: FORMATS[n] for n in names}
    tok = glmkit.load_tokenizer(TINY)
    texts = heldout_texts(n_texts) if SHARED.exists() else []
    ids = poem_ids(TINY)

    def ce(model) -> float:
        return score_texts(model, tok, texts, batch_size=16, progress=False).char_ce if texts else float("nan")

    ref_model = glmkit.load_model(TINY, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(ids)
    ce0 = ce(ref_model)
    out = {}
    for name, fmt in formats.items():
        model = build(TINY, fmt)
        with torch.no_grad():
            err = rel_err(model(ids), ref)
        out[name] = {"ce_delta": ce(model) - ce0, "logits_error": err}
        print(f"  glm-tiny {name}: CE delta {out[name]['ce_delta']:+.4f}, logits error {err:.4f}", flush=True)
    out["_ce_float"] = ce0
    return out


# ------------------------------------------------------------------------------------------------ ChatGLM-6B shape


def big_checkpoint(layers: int, cache: Path, seed: int = 0) -> Path:
    """The random fp16 ChatGLM-6B-shaped checkpoint of benchmarks/vs_chatglm_cpp.py (same cache folder)."""
    from vs_chatglm_cpp import write_checkpoint

    return write_checkpoint(cache / f"chatglm-6b-shape-{layers}l-seed{seed}", layers, seed)


def big_table(folder: Path, names, tokens: int = 32, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Relative logits error of each format on the big checkpoint (reference: the float model in `dtype`). One model
    in memory at a time: the fake-quantized formats reuse one float model, restoring its weights from the fp16
    checkpoint file. `names`: FORMATS keys, or a dict of name -> FORMATS-like tuple (kind "float": the float model
    in bf16)."""
    formats = names if isinstance(names, dict) else {n: FORMATS[n] for n in names}
    from safetensors import safe_open

    from vs_chatglm_cpp import prompt_ids

    ids = torch.tensor([prompt_ids(tokens)])
    model = glmkit.load_model(folder, dtype=dtype)
    with torch.no_grad():
        ref = model(ids)[0].float()
    file = safe_open(str(folder / "model.safetensors"), framework="pt")
    by_param = {}
    names_of = {"wte.weight": "transformer.word_embeddings.weight"}
    for i in range(len(model.h)):
        p = f"transformer.layers.{i}."
        for mine, theirs in (("attn.qkv", "attention.query_key_value"), ("attn.proj", "attention.dense"),
                             ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")):
            names_of[f"h.{i}.{mine}.weight"] = p + theirs + ".weight"
    params = dict(model.named_parameters())
    for mine, theirs in names_of.items():
        by_param[id(params[mine])] = theirs

    def source(p):
        return file.get_slice(by_param[id(p)])

    out = {}
    for name, (kind, arg, _, _) in formats.items():
        if not kind.startswith("fake"):
            continue
        t = time.time()
        fake_quantize(model, arg, head=kind == "fake", source=lambda p: _Rows(source(p)))
        with torch.no_grad():
            out[name] = rel_err(model(ids)[0], ref)
        fake_quantize(model, lambda w: w, head=True, source=lambda p: _Rows(source(p)))  # back to the float weights
        print(f"  {len(model.h)} layers {name}: logits error {out[name]:.4f} ({time.time() - t:.0f} s)", flush=True)
    del model
    for name, fmt in formats.items():
        if name in out:
            continue
        t = time.time()
        model = (glmkit.load_model(folder, dtype=torch.bfloat16) if fmt[0] == "float"
                 else build(folder, fmt, dtype=dtype))
        with torch.no_grad():
            out[name] = rel_err(model(ids)[0], ref)
        del model
        print(f"  big {name}: logits error {out[name]:.4f} ({time.time() - t:.0f} s)", flush=True)
    return out


class _Rows:
    """Row slices of a safetensors tensor, read on demand in fp32."""

    def __init__(self, sl):
        self.sl = sl

    def __getitem__(self, rows):
        return self.sl[rows].float()


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated names of FORMATS")
    parser.add_argument("--big", type=int, default=0, help="also the random ChatGLM-6B-shaped checkpoint with this "
                        "many layers (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "glmkit" / "bench")
    parser.add_argument("--texts", type=int, default=300, help="held-out poems for the CE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    names = [n for n in args.formats.split(",") if n]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; known: {list(FORMATS)}")
    torch.manual_seed(0)
    tiny = tiny_table(names, args.texts)
    big = big_table(big_checkpoint(args.big, args.cache), names) if args.big else {}
    print(f"\nglm-tiny: per-character CE on {args.texts} held-out Tang poems (float fp32: {tiny['_ce_float']:.4f} nats) "
          f"and relative logits error on 8 of them; bytes/token at the ChatGLM-6B shape (weights only)")
    big_col = f" logits error, {args.big}-layer 6B shape |" if big else ""
    print(f"| format | bits/weight layers / head | GB/token 8 layers | GB/token 28 layers | CE delta | logits error |"
          f"{big_col}")
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if big else ""))
    rows = {}
    for name in names:
        _, _, lb, hb = FORMATS[name]
        rows[name] = dict(tiny[name], layer_bits=lb, head_bits=hb, gb_8=bytes_per_token(lb, hb, 8) / 1e9,
                          gb_28=bytes_per_token(lb, hb, 28) / 1e9, big_logits_error=big.get(name))
        r = rows[name]
        cell = f" {r['big_logits_error']:.4f} |" if big else ""
        print(f"| {name} | {lb:.2f} / {hb:.2f} | {r['gb_8']:.3f} | {r['gb_28']:.3f} | {r['ce_delta']:+.4f} | "
              f"{r['logits_error']:.4f} |{cell}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
