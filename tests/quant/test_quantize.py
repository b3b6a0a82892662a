"""glmkit.quant.quantize: schemes, QuantizedLinear, loader integration (quantize-on-load, THUDM and glmkit checkpoints),
save -> load without requantizing, logits error bounds, and the peak memory of streaming quantization."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import glmkit
import glmkit.quant.quantize as Q
from glmkit.commands.quantize import cli_main as quantize_command
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from glmkit.quant import formats, kernels
from glmkit.quant.quantize import QuantizedLinear, quantization_spec
from tests.helpers.checkpoints import CHATGLM_V1_HF, thudm_v1_state_dict, write_folder
from tests.helpers.common import rel_err
from tests.helpers.reference_impls import chatglm_v1_logits

IDS = torch.tensor([[5, 6, 7, 8, 9, 151, 154, 11, 12]])  # prompt [gMASK] <sop> answer (CHATGLM_V1_HF ids)
LINEAR_KEYS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


# ------------------------------------------------------------------------------------------------ schemes


def test_rowwise_hand_made_int4_and_int8():
    w = torch.tensor([[1.4, -0.7, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = Q.quantize_rowwise(w, 4)
    assert s.dtype == torch.float16 and s[0] == torch.tensor(0.2, dtype=torch.float16) and s[1] == 0
    assert q.tolist() == [[7, -4, 1, 0], [0, 0, 0, 0]]  # -0.7 / 0.19995 = -3.5009 -> -4; zero row stays 0
    q8, s8 = Q.quantize_rowwise(torch.tensor([[1.27, -0.5]]), 8)
    assert s8[0] == torch.tensor(0.01, dtype=torch.float16) and q8.tolist() == [[127, -50]]


def test_group_hand_made_asymmetric():
    # one group of 32: values 0..31 * 0.1 -> min 0, max 3.1, scale 3.1/15, q = -8 at the min, 7 at the max
    w = (torch.arange(32, dtype=torch.float32) * 0.1)[None]
    q, s, z = Q.quantize_group(w, 32)
    assert q.shape == (1, 32) and s.shape == (1, 1) and z.shape == (1, 1)
    assert q[0, 0] == -8 and q[0, -1] == 7 and int(q.min()) >= -8 and int(q.max()) <= 7
    deq = Q.dequantize(q, s, z, 32)
    assert (deq - w).abs().max() <= s.float().item() / 2 + 1e-6


def test_plain_grid_keeps_each_groups_extremes_and_the_mse_fit_lowers_weight_error():
    """Quantize-on-load rounds on the group's own min..max grid, so its largest weights stay (up to the bf16
    rounding of scale and zero) what they were; the MSE fit (GPTQ's) clips some of them for a lower squared error."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=g)
    q, s, z = Q.quantize_group(w, 32)
    deq = Q.dequantize(q, s, z, 32).view(64, 8, 32)
    groups = w.view(64, 8, 32)
    step = s.float()[..., None]
    for pick in (torch.amax, torch.amin):
        assert ((pick(deq, dim=-1, keepdim=True) - pick(groups, dim=-1, keepdim=True)).abs() <= step / 8).all()
    qm, sm, zm = Q.quantize_group(w, 32, mse_fit=True)
    assert rel_err(Q.dequantize(qm, sm, zm, 32), w) < 0.95 * rel_err(deq.view(64, 256), w)


def test_round_trip_error_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 4096, generator=g)  # ChatGLM-6B row length
    q, s = Q.quantize_rowwise(w, 4)
    row_err = (Q.dequantize(q, s) - w).abs()
    assert (row_err <= s.float()[:, None] / 2 + 1e-6).all()  # round to nearest, nothing clipped
    row = rel_err(Q.dequantize(q, s), w)
    q8, s8 = Q.quantize_rowwise(w, 8)
    assert rel_err(Q.dequantize(q8, s8), w) < 0.01
    errs = {}
    for gs in (32, 64, 128):
        qg, sg, zg = Q.quantize_group(w, gs)
        errs[gs] = rel_err(Q.dequantize(qg, sg, zg, gs), w)
    qs, ss, _ = Q.quantize_group(w, 64, symmetric=True)
    sym = rel_err(Q.dequantize(qs, ss, None, 64), w)
    # group-wise INT4 is clearly better than ChatGLM-6B's per-row INT4 on Gaussian weights
    assert errs[32] < errs[64] < errs[128] < 0.65 * row
    assert errs[64] < 0.6 * row and errs[64] < sym < 0.75 * row


def test_specs_and_bad_input():
    assert Q.default_spec(4) == {"bits": 4, "scheme": "group", "group_size": 32, "symmetric": False,
                                 "layout": "glmkit"}
    assert Q.default_spec(8)["scheme"] == "rowwise"
    assert Q.default_spec(4, scheme="group-symmetric")["symmetric"] is True
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        Q.default_spec(3)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Q.default_spec(4, group_size=48)
    with pytest.raises(ValueError, match="INT4 only"):
        Q.default_spec(8, scheme="group")
    assert Q.effective_group_size(96, 64) == 32 and Q.effective_group_size(4096, 128) == 128
    with pytest.raises(ValueError, match="rowwise"):
        Q.effective_group_size(40, 64)


def test_quantization_spec_detection():
    assert quantization_spec({"model_type": "chatglm"}, None) is None
    assert quantization_spec({"quantization_bit": 0}, {"format": "pt"}) is None
    thudm = quantization_spec({"quantization_bit": 4}, None)
    assert thudm == {"bits": 4, "scheme": "rowwise", "group_size": None, "symmetric": True, "layout": "thudm"}
    assert quantization_spec({"quantization_bit": 8}, None)["bits"] == 8
    ours = Q.default_spec(4, 128)
    # the safetensors metadata drives it, even without the config key, and wins over a stale THUDM marker
    assert quantization_spec({"quantization_bit": 8}, {Q.QUANT_KEY: json.dumps(ours)})["group_size"] == 128
    assert quantization_spec({Q.QUANT_KEY: ours}, None)["scheme"] == "group"
    with pytest.raises(ValueError, match="quantization_bit must be 4 or 8"):
        quantization_spec({"quantization_bit": 5}, None)
    with pytest.raises(ValueError, match="not valid JSON"):
        quantization_spec({}, {Q.QUANT_KEY: "{bits"})
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantization_spec({Q.QUANT_KEY: {"bits": 2}}, None)


# ------------------------------------------------------------------------------------------------ the module

CONFIGS = [(8, "rowwise", None), (4, "rowwise", None), (4, "group", 64), (4, "group", 32)]


@pytest.mark.parametrize("bits,scheme,gs", CONFIGS)
@pytest.mark.parametrize("shape", [(128, 256), (96, 128)])  # int4pack layout and portable layout
def test_quantized_linear_forward_matches_dequantized_weight(bits, scheme, gs, shape):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0])
    m = QuantizedLinear.from_linear(lin, bits, scheme, gs)
    w = m.dequantized_weight()
    assert rel_err(w, lin.weight) < (0.01 if bits == 8 else 0.1)
    for rows in (1, 3, 70):  # fused kernels, and dequantize + GEMM
        x = torch.randn(2, rows, shape[1])
        ref = x @ w.t() + lin.bias
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # fp32: exact dequantization
        yb = m(x.bfloat16())
        assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) < 2e-2
        yh = m(x.half())
        assert yh.dtype == torch.float16 and rel_err(yh, ref) < 2e-3


@pytest.mark.parametrize("bits,scheme,gs", CONFIGS)
def test_gradient_flows_to_the_input(bits, scheme, gs):
    torch.manual_seed(1)
    lin = nn.Linear(128, 64)
    m = QuantizedLinear.from_linear(lin, bits, scheme, gs)
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 64)
    (m(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ m.dequantized_weight(), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in m.parameters())
    # a trainable module in front of the frozen quantized layer gets its gradient (P-tuning / LoRA on INT4)
    pre = nn.Linear(128, 128)
    m(pre(torch.randn(2, 128))).square().sum().backward()
    assert pre.weight.grad is not None and pre.weight.grad.abs().sum() > 0


def test_load_weight_tensor_any_order_and_errors():
    torch.manual_seed(2)
    lin = nn.Linear(64, 64)
    ref = QuantizedLinear.from_linear(lin, 4, "group", 32)
    tensors = ref.export()
    assert set(tensors) == {"weight", "weight_scale", "weight_zero", "bias"}
    assert tensors["weight"].shape == (64, 32) and tensors["weight_scale"].shape == (64, 2)
    m = QuantizedLinear(64, 64, bits=4, scheme="group", group_size=32)
    assert not m.is_loaded and m.qweight.is_meta
    for name in ("bias", "weight_zero", "weight_scale", "weight"):  # scale before weight, bias first
        m.load_weight_tensor(name, tensors[name])
    assert m.is_loaded
    torch.testing.assert_close(m.dequantized_weight(), ref.dequantized_weight(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already loaded"):
        m.load_weight_tensor("weight", tensors["weight"])
    fresh = QuantizedLinear(64, 64, bits=4, scheme="group", group_size=32)
    with pytest.raises(ValueError, match="no checkpoint tensor 'qweight'"):
        fresh.load_weight_tensor("qweight", tensors["weight"])
    with pytest.raises(ValueError, match="float weight shape"):
        fresh.load_weight_tensor("weight", torch.zeros(64, 32))
    with pytest.raises(ValueError, match="bias shape"):
        fresh.load_weight_tensor("bias", torch.zeros(3))
    bad = QuantizedLinear(64, 64, bits=4, scheme="rowwise")
    bad.load_weight_tensor("weight_scale", torch.ones(64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"int8 \[64, 32\]"):
        bad.load_weight_tensor("weight", torch.zeros(64, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="before its weights were loaded"):
        QuantizedLinear(64, 64)(torch.zeros(1, 64))


def test_device_and_dtype_moves_keep_quantized_storage():
    torch.manual_seed(3)
    m = QuantizedLinear.from_linear(nn.Linear(128, 64), 4, "rowwise")
    w = m.dequantized_weight()
    scale_dtype = m.weight_scale.dtype
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16 and m.weight_scale.dtype == scale_dtype  # fp16 scales are not touched
    m.float()
    torch.testing.assert_close(m.dequantized_weight(), w, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,scheme,gs", CONFIGS)
def test_cuda_path_matches_cpu(bits, scheme, gs):
    torch.manual_seed(4)
    m = QuantizedLinear.from_linear(nn.Linear(256, 128), bits, scheme, gs)
    x = torch.randn(5, 256, requires_grad=True)
    ref = m(x)
    m.cuda()
    assert m.layout in ("int8", "packed") and m.qweight.is_cuda  # an fp32 layer: the exact path
    xc = x.detach().cuda().requires_grad_()
    y = m(xc)
    torch.testing.assert_close(y.cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), torch.ones(5, 128) @ m.dequantized_weight().cpu(), rtol=1e-4,
                               atol=1e-4)
    assert rel_err(m(xc.half()).float().cpu(), ref.detach()) < 5e-3
    m.cpu()
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ models


def tiny_model(std: float = 0.1, dtype: torch.dtype = torch.float32, seed: int = 0) -> GLMForCausalLM:
    cfg = GLMConfig.from_hf_config(dict(CHATGLM_V1_HF, hidden_size=128, num_attention_heads=4,
                                        inner_hidden_size=256))
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    model = GLMForCausalLM(cfg)
    model.init_weights(std, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def test_prepare_model_swaps_the_four_linears_without_allocating():
    cfg = GLMConfig.from_hf_config(CHATGLM_V1_HF)
    with torch.device("meta"):
        model = GLMForCausalLM(cfg)
    Q.prepare_model(model, Q.default_spec(4, group_size=64))
    for i, block in enumerate(model.h):
        for mod in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            assert isinstance(mod, QuantizedLinear) and not mod.is_loaded
            assert all(t.is_meta for t in list(mod.parameters()) + list(mod.buffers()))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantizedLinear)
    assert model.h[0].mlp.fc.group_size == 64
    assert model.h[0].mlp.proj.group_size == 32  # inner size 96: largest allowed group dividing it
    with pytest.raises(ValueError, match="already quantized"):
        Q.prepare_model(model, Q.default_spec(4))


def test_logits_error_bounds_on_a_tiny_model():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 151, 154, 13, 14, 15]])
    with torch.no_grad():
        ref = model(ids)
        errs = {}
        for name, kw in {"int8": dict(bits=8), "int4-rowwise": dict(bits=4, scheme="rowwise"),
                         "int4-g64": dict(bits=4, group_size=64), "int4-g32": dict(bits=4)}.items():
            q = Q.quantize_model(copy.deepcopy(model), head="none", **kw)  # the layers' schemes alone
            errs[name] = rel_err(q(ids), ref)
    assert errs["int8"] < 0.01, errs
    assert errs["int4-rowwise"] < 0.3, errs
    assert errs["int4-g32"] < errs["int4-g64"] < 0.8 * errs["int4-rowwise"], errs
    assert errs["int8"] < 0.1 * errs["int4-rowwise"], errs


def test_quantize_on_load_matches_quantize_model(tmp_path):
    hf = dict(CHATGLM_V1_HF)
    folder = write_folder(tmp_path / "fp32", hf, thudm_v1_state_dict(hf, std=0.1), fmt="safetensors")
    float_model = glmkit.load_model(folder)
    for quantize in ("int4", "int8"):
        loaded = glmkit.load_model(folder, quantize=quantize)
        assert isinstance(loaded.h[1].mlp.fc, QuantizedLinear) and loaded.h[1].mlp.fc.bits == int(quantize[-1])
        expected = Q.quantize_model(copy.deepcopy(float_model), int(quantize[-1]))
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS), expected(IDS), rtol=1e-5, atol=1e-5)
            assert rel_err(loaded(IDS), float_model(IDS)) < (0.3 if quantize == "int4" else 0.03)


def test_rowwise_quantize_on_load_writes_the_originals_integers(tmp_path):
    """INT8 (and INT4 --scheme rowwise) are ChatGLM-6B's quantize() bit for bit, so the logits error is the
    original's: scale = (absmax / qmax).half(), q = round(w / scale), written here from the original's formula."""
    hf = dict(CHATGLM_V1_HF)
    sd = thudm_v1_state_dict(hf, std=0.1)
    folder = write_folder(tmp_path / "fp32", hf, sd, fmt="safetensors")
    for bits in (8, 4):
        model = glmkit.load_model(folder, quantize=f"int{bits}", scheme="rowwise")
        for i in range(hf["num_layers"]):
            w = sd[f"transformer.layers.{i}.mlp.dense_h_to_4h.weight"]
            scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
            q = torch.round(w / scale[:, None]).to(torch.int8)
            exported = model.h[i].mlp.fc.export()
            assert exported["weight_scale"].equal(scale)
            stored = exported["weight"] if bits == 8 else kernels.unpack_int4(exported["weight"])
            assert stored.equal(q)


def test_save_then_load_without_requantizing(tmp_path, monkeypatch):
    hf = dict(CHATGLM_V1_HF)
    src = write_folder(tmp_path / "src", hf, thudm_v1_state_dict(hf, std=0.1), fmt="safetensors")
    (src / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    (src / "ice_text.model").write_bytes(b"spm")
    assert quantize_command([str(src), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 0
    model = glmkit.load_model(src, quantize="int4", group_size=32)
    Q.save_quantized(model, tmp_path / "q4b", src_dir=src)
    for out in (tmp_path / "q4", tmp_path / "q4b"):
        assert (out / "tokenizer_config.json").exists() and (out / "ice_text.model").exists()
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
        assert json.loads(meta[Q.QUANT_KEY])["group_size"] == 32
        # THUDM names; INT4 layers in the CPU kernel's layout as it is (else the portable form), the INT8 head
        expected = ("weight_int4pack", "weight_scale_zero") if kernels.int4pack_block_n() else ("weight_zero",)
        for attr in expected:
            assert f"transformer.layers.0.attention.query_key_value.{attr}" in keys
        assert {"transformer.word_embeddings.weight", "transformer.word_embeddings.weight_scale"} <= keys
        assert json.loads(meta[Q.QUANT_KEY])["head"]["bits"] == 8
        config = json.loads((out / "config.json").read_text())
        assert config[Q.QUANT_KEY]["bits"] == 4 and "quantization_bit" not in config

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(formats, "quantize_group", no_requantizing)
    monkeypatch.setattr(formats, "quantize_rowwise", no_requantizing)
    reloaded = glmkit.load_model(tmp_path / "q4")
    assert isinstance(reloaded.h[0].attn.qkv, QuantizedLinear) and reloaded.h[0].attn.qkv.group_size == 32
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already quantized"):
        glmkit.load_model(tmp_path / "q4", quantize="int8")


def test_quantize_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        quantize_command(["--help"])
    assert e.value.code == 0 and "--group-size" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ THUDM layout


def _original_int_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ChatGLM-6B's QuantizedLinear does to an fp16 weight, spelled out with numpy: fp16 absmax / (2^(b-1)-1)
    as the fp16 scale, fp16 division, round half to even, int8; INT4 packs (even << 4) | (odd & 0xF)."""
    wh = w.half().numpy()
    scale = (np.abs(wh).max(axis=-1) / np.float16(2 ** (bits - 1) - 1)).astype(np.float16)
    q = np.round(wh / scale[:, None]).astype(np.int8)
    if bits == 4:
        u = q.astype(np.uint8)
        q = ((u[:, 0::2] << 4) | (u[:, 1::2] & 0xF)).astype(np.uint8).view(np.int8)
    return torch.from_numpy(q.copy()), torch.from_numpy(scale)


def _original_dequant(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The original CPU kernels (extract_int{4,8}_weight_to_float): float(scale[i]) * value, high nibble first."""
    qn = q.numpy()
    if bits == 4:
        high = qn >> 4
        low = (qn.astype(np.uint8) << 4).view(np.int8) >> 4
        qn = np.stack([high, low], axis=-1).reshape(qn.shape[0], -1)
    return torch.from_numpy(qn.astype(np.float32) * scale.float().numpy()[:, None])


@pytest.mark.parametrize("saved", ["float16", "float32"])  # float32: saved after model.float(), as run on CPU
@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_quantized_checkpoint_reproduces_the_original(tmp_path, bits, saved):
    hf = dict(CHATGLM_V1_HF, hidden_size=128, num_attention_heads=4, inner_hidden_size=256,
              quantization_bit=bits, torch_dtype=saved)
    sd = {k: v.half() for k, v in thudm_v1_state_dict(hf, std=0.1).items()}
    reference = {k: v.float() for k, v in sd.items()}  # the original on CPU runs model.float()
    for i in range(hf["num_layers"]):
        for key in LINEAR_KEYS:
            name = f"transformer.layers.{i}.{key}.weight"
            q, scale = _original_int_quantize(sd[name], bits)
            sd[name], sd[name + "_scale"] = q, scale
            reference[name] = _original_dequant(q, scale, bits)
    if saved == "float32":  # every float tensor, the fp16 scales included, cast to fp32 before saving
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    folder = write_folder(tmp_path / f"thudm-int{bits}-{saved}", hf, sd, fmt="bin")
    model = glmkit.load_model(folder, dtype="float32")
    assert isinstance(model.h[0].mlp.fc, QuantizedLinear) and model.h[0].mlp.fc.scheme == "rowwise"
    assert model.h[0].mlp.fc.bits == bits
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 151, 154]])
    with torch.no_grad():
        ours = model(ids)[0]
    theirs = chatglm_v1_logits(reference, hf, ids, fp16_table=False)[0]
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    # greedy continuation: the same tokens as greedy decoding on the original's logits
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[])[0].tolist()
    seq = ids
    for _ in range(4):
        nxt = chatglm_v1_logits(reference, hf, seq, fp16_table=False)[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert out == seq[0, ids.shape[1]:].tolist()
    # and the exported tensors are exactly the original's
    exported = model.h[1].attn.qkv.export()
    assert torch.equal(exported["weight"], sd["transformer.layers.1.attention.query_key_value.weight"])
    assert torch.equal(exported["weight_scale"], sd["transformer.layers.1.attention.query_key_value.weight_scale"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_int8_is_at_least_as_accurate_as_the_originals_quantize8(tmp_path, seed):
    """quantize="int8" on a random ChatGLM-6B-layout fp16 checkpoint: its logits error against the float model is at
    most that of the original's quantize(8) (per-row INT8 of the four linears; embedding and output layer in
    floating point), both run as the original runs on CPU (model.float()). The quantized head is an opt-in that
    costs accuracy, which is why it is not the default."""
    hf = dict(CHATGLM_V1_HF, vocab_size=1024, hidden_size=256, num_attention_heads=4, inner_hidden_size=1024,
              num_layers=4, torch_dtype="float16")
    sd = {k: v.half() for k, v in thudm_v1_state_dict(hf, seed=seed, std=0.12).items()}
    folder = write_folder(tmp_path / "fp16", hf, sd, fmt="safetensors")
    reference = {k: v.float() for k, v in sd.items()}
    original = dict(reference)
    for i in range(hf["num_layers"]):
        for key in LINEAR_KEYS:
            name = f"transformer.layers.{i}.{key}.weight"
            original[name] = _original_dequant(*_original_int_quantize(sd[name], 8), 8)
    ids = torch.randint(0, 150, (2, 24), generator=torch.Generator().manual_seed(seed))
    ids[:, 16], ids[:, 17] = CHATGLM_V1_HF["gmask_token_id"], CHATGLM_V1_HF["bos_token_id"]
    float_logits = chatglm_v1_logits(reference, hf, ids, fp16_table=False)
    original_err = rel_err(chatglm_v1_logits(original, hf, ids, fp16_table=False), float_logits)
    with torch.no_grad():
        default = glmkit.load_model(folder, quantize="int8", dtype="float32")
        assert isinstance(default.lm_head, nn.Linear) and isinstance(default.wte, nn.Embedding)
        err = rel_err(default(ids), float_logits)
        head_err = rel_err(glmkit.load_model(folder, quantize="int8", dtype="float32", quantize_head="int8")(ids),
                           float_logits)
    assert err <= original_err * (1 + 1e-4) + 1e-6, (err, original_err)
    assert head_err > err, (head_err, err)
    # the original's integers: an fp16 weight divided by its fp16 scale in fp16 (in the CPU default bf16 load too)
    q, scale = _original_int_quantize(sd["transformer.layers.1.mlp.dense_h_to_4h.weight"], 8)
    exported = glmkit.load_model(folder, quantize="int8").h[1].mlp.fc.export()
    assert torch.equal(exported["weight"], q) and torch.equal(exported["weight_scale"], scale)


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.slow
def test_streaming_quantization_peak_memory(tmp_path):
    """Quantize-on-load of a ~300 MB fp32 checkpoint in 12 shards: the peak RSS stays near the INT4 model plus one
    shard, far below the float model. The shards use torch's legacy (non-mmap) format, so each one is read into
    memory and released as it is consumed; this measures glmkit's quantization path, not the page cache."""
    hf = dict(CHATGLM_V1_HF, hidden_size=1024, num_attention_heads=8, inner_hidden_size=4096, num_layers=6,
              vocab_size=1000, bos_token_id=994, eos_token_id=995, mask_token_id=990, gmask_token_id=991)
    sd = thudm_v1_state_dict(hf, std=0.02)
    SHARDS = 12
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    keys = list(sd)
    weight_map = {}
    for j in range(SHARDS):
        name = f"pytorch_model-{j + 1:05d}-of-{SHARDS:05d}.bin"
        part = {k: sd[k] for k in keys[j::SHARDS]}
        torch.save(part, folder / name, _use_new_zipfile_serialization=False)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    size = sum(t.numel() * t.element_size() for t in sd.values())
    shard = size / SHARDS
    del sd
    def peak_delta(quantize):
        code = (
            "import torch, glmkit, glmkit.core.causal_lm, glmkit.loading.loader\n"
            "from glmkit.evaluation.bench import peak_rss_bytes\n"
            "from glmkit.quant.quantize import QuantizedLinear\n"
            # one-time costs (thread pools, per-thread malloc arenas, kernels) are not the loader's: pay them first
            "QuantizedLinear.from_linear(torch.nn.Linear(4096, 1024), 4)(torch.zeros(1, 4096))\n"
            "torch.nn.Linear(4096, 1024)(torch.zeros(1, 4096))\n"
            "base = peak_rss_bytes()\n"
            f"m = glmkit.load_model({str(folder)!r}, quantize={quantize!r})\n"
            "print(peak_rss_bytes() - base)\n"
        )
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])

    int4, float32 = peak_delta("int4"), peak_delta(None)
    layer_params = 6 * (4 * 1024 * 1024 + 2 * 1024 * 4096)
    quantized = layer_params * (0.5 + 4 / 64) + (size - 4 * layer_params)  # INT4 + scales, the rest stays fp32
    print(f"{size / 1e6:.0f} MB checkpoint: peak RSS +{int4 / 1e6:.0f} MB as INT4 ({quantized / 1e6:.0f} MB "
          f"quantized, {shard / 1e6:.0f} MB shards), +{float32 / 1e6:.0f} MB as float")
    # never the float model at once: the quantized model, the shard being read (the legacy format reads a shard
    # whole, and its bytes twice over) and one layer's temporaries (< 64 MB)
    assert int4 < quantized + 3 * shard + 100e6, f"INT4 load raised peak RSS by {int4 / 1e6:.0f} MB"
    assert int4 < 0.6 * float32


def _load_rss(folder, quantize: str | None) -> tuple[int, int]:
    """(final, peak) RSS growth of a fresh process loading `folder`. Allocations of 128 KB and more are mmap'ed
    (MALLOC_MMAP_THRESHOLD_), so freed temporaries leave RSS at once and the peak measures the loader, not
    malloc's caching, which otherwise moves it by +-40 MB from run to run."""
    code = (
        "import re, torch, glmkit\n"
        "from glmkit.evaluation.bench import peak_rss_bytes\n"
        "from glmkit.quant.quantize import QuantizedLinear\n"
        # one-time costs (thread pools, kernels) are not the loader's: pay them first
        "QuantizedLinear.from_linear(torch.nn.Linear(16384, 1024), 4)(torch.zeros(1, 16384))\n"
        "base = peak_rss_bytes()\n"
        f"m = glmkit.load_model({str(folder)!r}, quantize={quantize!r})\n"
        "rss = int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "print(rss - base, peak_rss_bytes() - base)\n"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    final, peak = out.stdout.split()[-2:]
    return int(final), int(peak)


@pytest.mark.slow
def test_safetensors_weights_are_quantized_a_block_of_rows_at_a_time(tmp_path):
    """From safetensors, a layer's float weight is read a block of rows at a time while it is quantized: the
    peak stays below the INT4 model plus one float weight (64 MB here), which a whole-tensor read would exceed."""
    hf = dict(CHATGLM_V1_HF, hidden_size=1024, num_attention_heads=8, inner_hidden_size=16384, num_layers=2,
              vocab_size=1000, bos_token_id=994, eos_token_id=995, mask_token_id=990, gmask_token_id=991)
    sd = thudm_v1_state_dict(hf, std=0.02)
    folder = write_folder(tmp_path / "st", hf, sd, fmt="safetensors")
    weight_bytes = 16384 * 1024 * 4
    layer_params = 2 * (4 * 1024 * 1024 + 2 * 1024 * 16384)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    quantized = layer_params * (0.5 + 4 / 64) + (size - 4 * layer_params)
    del sd
    from glmkit.core.checkpoint import CheckpointRows, iter_tensors, weight_files

    rows = dict(iter_tensors(weight_files(folder), lambda name: name.endswith("dense_4h_to_h.weight")))
    deferred = rows["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    assert isinstance(deferred, CheckpointRows) and deferred.shape == (1024, 16384)
    assert isinstance(rows["transformer.layers.1.mlp.dense_h_to_4h.weight"], torch.Tensor)
    full = dict(iter_tensors(weight_files(folder)))["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    assert deferred[100:300].equal(full[100:300]) and deferred[:].equal(full)
    with pytest.raises(TypeError):
        deferred[::2]
    del rows, deferred, full

    final, peak = _load_rss(folder, "int4")
    print(f"{size / 1e6:.0f} MB checkpoint as INT4: RSS +{final / 1e6:.0f} MB at the end, +{peak / 1e6:.0f} MB at "
          f"the peak ({quantized / 1e6:.0f} MB of weights)")
    # read whole, the 64 MB float weight alone would lift the peak that far above the end state (~95 MB measured)
    assert peak - final < 0.75 * weight_bytes, f"peak {peak / 1e6:.0f} MB vs final {final / 1e6:.0f} MB"


def test_state_dict_round_trip():
    model = Q.quantize_model(tiny_model(), 4)
    sd = model.state_dict()
    assert sd["h.0.attn.qkv.weight"].dtype == torch.int8 and "h.0.attn.qkv.weight_zero" in sd
    other = Q.quantize_model(tiny_model(seed=1), 4)
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)
    del sd["h.1.mlp.fc.weight_scale"]
    with pytest.raises(RuntimeError, match="h.1.mlp.fc.weight_scale"):
        Q.quantize_model(tiny_model(), 4).load_state_dict(sd)


# ------------------------------------------------------------------------------------------------ bench


def test_bench_builds_each_precision_and_prints_one_table(capsys):
    from glmkit.commands.bench import cli_main as bench_command
    from glmkit.evaluation import bench

    sizes = {}
    for precision in bench.PRECISIONS:
        for head in ("none", "int8", None):  # the output layer in bf16, INT8, or as load_model does by default
            model = bench._build_model(precision, 2, None, preset="glm-tiny", head=head)
            kinds = {type(m.attn.qkv).__name__ for m in model.h}
            assert kinds == ({"Linear"} if precision == "bf16" else {"QuantizedLinear"})
            assert model.lm_head is model.wte or model.lm_head.weight is model.wte.weight  # tied, as ChatGLM-6B
            sizes[precision, head] = bench.weight_bytes_per_token(model)
    cfg = GLMConfig.from_name("glm-tiny")
    head = cfg.vocab_size * cfg.hidden_size * 2  # the tied table, read whole by the output layer
    layer_weights = 2 * (cfg.qkv_out_features * cfg.hidden_size + cfg.hidden_size ** 2
                         + 2 * cfg.hidden_size * cfg.ffn_hidden_size)
    # 2 bytes -> 1 byte (+ scales) per layer weight; the INT8 head: 2 bytes -> 1 per table entry (+ scales)
    assert sizes["bf16", "none"] - sizes["int8", "none"] == pytest.approx(layer_weights, rel=0.02)
    assert sizes["int8", "none"] - sizes["int8", "int8"] == head // 2 - 4 * cfg.vocab_size  # fp16 + bf16 row scales
    assert sizes["bf16", None] == sizes["bf16", "none"]
    # by default INT8 layers keep the head in floating point (the original's quantize(8)), INT4 ones make it INT8
    assert sizes["int8", None] == sizes["int8", "none"] and sizes["int4", None] == sizes["int4", "int8"]
    assert head < sizes["int4", "none"] < sizes["int8", "none"] < sizes["bf16", "none"]
    assert sizes["int4", "int8"] < sizes["int8", "int8"] < sizes["bf16", None]
    assert bench_command(["--model", "glm-tiny", "--layers", "1", "--prompt-tokens", "8", "--decode-tokens", "2",
                           "--precisions", "int4", "--repeats", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "best of 2 interleaved rounds" in out[0]
    assert out[1].split()[:4] == ["precision", "weights/token", "GB", "prefill"] and out[3].startswith("int4")
    best = bench._best_round([{"prefill_tok_s": 5, "decode_tok_s": 2, "peak_rss": 9, "threads": 2},
                              {"prefill_tok_s": 4, "decode_tok_s": 3, "peak_rss": 8, "threads": 2}])
    assert (best["prefill_tok_s"], best["decode_tok_s"], best["peak_rss"]) == (5, 3, 9)
    assert bench.measure_bandwidth(gib=0.125, repeats=2) > 1e8


@pytest.mark.parametrize("quantize,head", [(None, None), ("int8", None), ("int8", "int8"), ("int4", None), ("int4", "int4"),
                                           ("int4", "none")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_modes_mix_in_any_order_after_generate(quantize, head, dtype):
    """inference_mode (generate), no_grad, plain calls and a training step, in several orders, prefill-sized (128
    rows) and decode-sized (1 row) inputs: scratch buffers first made under inference_mode must not break the rest.
    The quantized output layer / embedding (INT8 by default, INT4, or kept in floating point) included."""
    from glmkit.quant import kernels

    kernels._WORKSPACE.clear()  # the first dequantization below runs under inference_mode (generate's prefill)
    model = glmkit.load_model("glm-tiny", quantize=quantize, dtype=dtype, quantize_head=head)
    default = {"int8": "none", "int4": "int8"}.get(quantize)  # the head's default under those layers
    assert isinstance(model.lm_head, QuantizedLinear) == (quantize is not None and (head or default) != "none")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 9000, (1, 128), generator=g)
    one = prompt[:, :1]
    first = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        no_grad_logits = model(prompt)
        model(one)
    plain = model(prompt)
    with torch.inference_mode():
        inference_logits = model(prompt)
    torch.testing.assert_close(plain.detach(), no_grad_logits)
    torch.testing.assert_close(inference_logits, no_grad_logits)
    # a training step: gradients reach the float parameters through the quantized layers (and output layer)
    model.train()
    model(prompt).float().logsumexp(-1).mean().backward()
    first_norm = model.h[0].ln_1.weight.grad
    assert first_norm is not None and torch.isfinite(first_norm).all() and first_norm.abs().sum() > 0
    if quantize is None or head == "none":
        assert model.wte.weight.grad is not None and torch.isfinite(model.wte.weight.grad).all()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), no_grad_logits)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), first)
    with torch.inference_mode():
        model(one)
    model(one).sum().backward()
