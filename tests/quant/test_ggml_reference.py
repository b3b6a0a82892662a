"""benchmarks/quant_formats.py's vectorised ggml quantizers against a scalar transcription of ggml-quants.c's
quantize_row_q4_0_ref / q4_1_ref / q8_0_ref and dequantize_row_* (numpy float32 arithmetic, one value at a time),
on Gaussian weights plus blocks of ties, halves and zeros."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
f = np.float32


def _module():
    spec = importlib.util.spec_from_file_location("quant_formats", ROOT / "benchmarks" / "quant_formats.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fp16(x):
    return np.float16(x).astype(f)


def q4_0(x):
    out = []
    for b in x.reshape(-1, 32):
        amax, mx = f(0), f(0)
        for v in b:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = f(mx / f(-8))
        inv = f(f(1) / d) if d else f(0)
        out += [f((min(15, int(f(f(v * inv) + f(8.5)))) - 8) * _fp16(d)) for v in b]
    return np.array(out)


def q4_1(x):
    out = []
    for b in x.reshape(-1, 32):
        mn, mx = b.min(), b.max()
        d = f(f(mx - mn) / f(15))
        inv = f(f(1) / d) if d else f(0)
        out += [f(f(min(15, int(f(f(f(v - mn) * inv) + f(0.5)))) * _fp16(d)) + _fp16(mn)) for v in b]
    return np.array(out)


def q8_0(x):
    out = []
    for b in x.reshape(-1, 32):
        d = f(np.abs(b).max() / f(127))
        inv = f(f(1) / d) if d else f(0)
        for v in b:
            t = np.float64(f(v * inv))
            out.append(f(np.sign(t) * np.floor(abs(t) + 0.5) * _fp16(d)))  # roundf: halves away from zero
    return np.array(out)


def test_ggml_reference_quantizers_match_a_scalar_transcription():
    qf = _module()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    x[0, :32] = torch.arange(32) * 0.01 - 0.16  # |min| = max + step: the signed extreme decides q4_0's scale
    x[1, :32] = 0  # d = 0
    x[2, :32] = torch.tensor([0.5, -0.5] * 16)  # ties of |v|: the first one wins
    x[2, 32:64] = torch.arange(32) * (1 / 254)  # q8_0 halves
    for fn, ref in ((qf.ggml_q4_0, q4_0), (qf.ggml_q4_1, q4_1), (qf.ggml_q8_0, q8_0)):
        np.testing.assert_array_equal(fn(x).numpy().reshape(-1), ref(x.numpy()), err_msg=fn.__name__)
    # 4.5 / 5 / 8.5 bits per weight: the bytes each format's decode reads
    assert [qf.GGML_TYPES[t][2] for t in ("q4_0", "q4_1", "q8_0")] == [4.5, 5.0, 8.5]
