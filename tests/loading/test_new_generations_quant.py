"""INT8/INT4 for GLM-4-0414 (glm4), GLM-4.5 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite): every expert, shared expert,
dense layer and latent-attention projection quantized (the router and MLA's kv_b stay float), quantize-on-load and
`glmkit quantize` copies loading memory-mapped, on tiny random checkpoints written by transformers."""

import pytest
import torch
from torch import nn

import glmkit
from glmkit.commands.quantize import cli_main as quantize_cli
from glmkit.quant.linear import QuantizedLinear
from tests.helpers.common import rel_err
from tests.loading.test_new_generations import IDS, write_reference

pytest.importorskip("transformers")

# widths that INT4's group size (32) divides, as the published checkpoints' do
SHAPES = {"glm4": dict(intermediate_size=64),
          "glm4_moe": dict(intermediate_size=64, moe_intermediate_size=32),
          "glm4_moe_lite": dict(intermediate_size=64, moe_intermediate_size=32, q_lora_rank=32, v_head_dim=8)}
LIMITS = {"int8": 0.03, "int4": 0.3}  # relative logits error, as the other families' quantization tests allow


def quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("kind", ["glm4_moe", "glm4_moe_lite"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_moe_and_mla_close_to_float_and_round_trip(tmp_path, kind, quantize):
    _, folder = write_reference(tmp_path, kind, **SHAPES[kind])
    ref = glmkit.load_model(folder)
    model = glmkit.load_model(folder, quantize=quantize)
    names = quantized_names(model)
    floats = {n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n.startswith("h.")}
    # every linear inside the layers is quantized but latent attention's kv_b (read as a tensor by the absorbed form)
    assert names >= {n for n in floats if not n.endswith(".kv_b")}
    assert all(not n.endswith(".kv_b") for n in names)
    assert any(".mlp.experts." in n for n in names) and any(".mlp.shared." in n for n in names)
    assert "h.0.mlp.fc" in names  # the dense first layer (first_k_dense_replace)
    if kind == "glm4_moe_lite":
        assert {"h.1.attn.q_a", "h.1.attn.q_b", "h.1.attn.kv_a",
                "h.1.attn.proj"} <= names
    router = model.h[1].mlp.router
    assert router.weight.dtype == torch.float32 and type(router).__name__ == "Router"

    with torch.no_grad():
        expected, got = ref(IDS), model(IDS)
    assert rel_err(got, expected) < LIMITS[quantize]
    out = model.generate(IDS, max_new_tokens=6, eos_token_id=[])
    assert out.shape == (2, 6)
    # greedy with the KV cache = greedy recomputing everything (the cache and the routed decode path agree)
    ids = IDS
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, ids[:, IDS.shape[1]:])

    # `glmkit quantize` -> load (memory-mapped): the same tensors and logits bit for bit
    dst = tmp_path / f"{kind}-{quantize}"
    assert quantize_cli([str(folder), str(dst), "--bits", quantize[-1]]) == 0
    saved = glmkit.load_model(dst)
    assert quantized_names(saved) == names
    a, b = model.state_dict(), saved.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(saved(IDS), got)
    # save_model of the quantized model: the same again
    again = glmkit.load_model(glmkit.save_model(model, tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(IDS), got)


def test_quantized_glm4_close_to_float(tmp_path):
    _, folder = write_reference(tmp_path, "glm4", **SHAPES["glm4"])
    ref, model = glmkit.load_model(folder), glmkit.load_model(folder, quantize="int4")
    assert len(quantized_names(model)) == 4 * 2 + 2  # four linears per layer + the INT8 embedding and output layer
    with torch.no_grad():
        assert rel_err(model(IDS), ref(IDS)) < LIMITS["int4"]


def test_quantized_decode_runs_only_routed_experts(tmp_path):
    _, folder = write_reference(tmp_path, "glm4_moe", **SHAPES["glm4_moe"])
    model = glmkit.load_model(folder, quantize="int4")
    calls = []
    for layer in model.h[1:]:
        for e, expert in enumerate(layer.mlp.experts):
            expert.register_forward_hook(lambda m, i, o, e=e: calls.append(e))
    model.generate(IDS[:1], max_new_tokens=3, eos_token_id=[])
    k, moe_layers = model.config.num_experts_per_tok, len(model.h) - 1
    # the prompt runs each hit expert once; each of the 2 decode steps after it runs k experts per MoE layer
    decode_calls = calls[-2 * k * moe_layers:]
    assert len(calls) > len(decode_calls) and len(decode_calls) == 2 * k * moe_layers
