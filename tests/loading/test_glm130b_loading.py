"""GLM-130B checkpoints through glmkit.load_model, against the ORIGINAL code's outputs (tests/data/glm130b: SAT 0.2.12's
GLM130B and GLM-130B's convert_tp.py / quantization / generate.py / batch_filling_sequence, run by make_golden.py).

The checkpoints are rebuilt here byte for byte (tests.helpers.goldens.glm130b_sat_state_dict + sat_reshard, which the
golden script checked against convert_tp.py): TP=1 and TP=2, fp16 weights, INT8 and INT4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import glmkit
from glmkit.quant.quantize import QuantizedLinear
from glmkit.quant.sharded import GroupedRowwiseLinear
from tests.helpers.common import REPO, rel_err
from tests.helpers.goldens import GLM130B_DATA, GLM130B_TINY, glm130b_sat_state_dict, sat_reshard, write_sat_checkpoint

VARIANTS = [f"tp{tp}_{kind}" for kind in ("fp16", "int8", "int4") for tp in (1, 2)]


@pytest.fixture(scope="module")
def golden():
    return (json.loads((GLM130B_DATA / "golden.json").read_text(encoding="utf-8")),
            torch.load(GLM130B_DATA / "golden_logits.pt", weights_only=True))


@pytest.fixture(scope="module")
def sat_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm130b")
    sd = glm130b_sat_state_dict()
    dirs = {}
    for name in VARIANTS:
        tp, kind = int(name[2]), name.split("_")[1]
        bits = None if kind == "fp16" else int(kind[3:])
        dirs[name] = write_sat_checkpoint(root / name, sat_reshard([sd], tp, bits))
    return dirs


def check_case(model, golden, variant: str, case: str, ids, **kwargs) -> None:
    g, logits = golden
    cols = torch.tensor(g["columns"])
    with torch.no_grad():
        out = model(ids, **kwargs)
    key = f"{variant}/float32/{case}/logits"
    torch.testing.assert_close(out[..., cols], logits[key + "/columns"], atol=3e-4, rtol=0)
    torch.testing.assert_close(out.logsumexp(-1), logits[key + "/logsumexp"], atol=3e-4, rtol=0)
    assert torch.equal(out.argmax(-1), logits[key + "/argmax"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_tokens_match_the_original(sat_dirs, golden, variant):
    """Every generate.py prompt kind ([gMASK], [MASK], [sMASK], [gMASK]+[MASK]) with glmkit's own positions and
    masks, and greedy decoding through model.generate on ids ending with sop, as the original produced them."""
    g, _ = golden
    model = glmkit.load_model(sat_dirs[variant], dtype="float32")
    if variant.endswith("fp16"):
        assert isinstance(model.h[0].attn.qkv, torch.nn.Linear)
    else:
        assert isinstance(model.h[0].attn.qkv, QuantizedLinear)
        proj = model.h[0].attn.proj
        assert isinstance(proj, GroupedRowwiseLinear if variant.startswith("tp2") else QuantizedLinear)
    for case, c in g["cases"].items():
        ids = torch.tensor([c["seq"]])
        assert model.default_position_ids(ids).tolist() == c["position_ids"], case
        assert model.default_attention_mask(ids)[:, 0].long().tolist() == c["visible"], case
        check_case(model, golden, variant, case, ids)
        new = model.generate(ids, max_new_tokens=g["gen_tokens"], do_sample=False)[0].tolist()
        assert new == g["greedy"][f"{variant}/float32/{case}"], case


@pytest.mark.parametrize("variant", ["tp1_fp16", "tp2_int4"])
def test_explicit_block_diagonal_mask_and_positions_are_used_as_given(sat_dirs, golden, variant):
    """An evaluation batch (evaluation/dataset.py): several sops, choices at the mask's position, block-diagonal
    attention. glmkit takes position_ids / attention_mask exactly as given (True = may attend)."""
    g, _ = golden
    mc = g["multiple_choice"]
    model = glmkit.load_model(sat_dirs[variant], dtype="float32")
    ids = torch.tensor([mc["tokens"]])
    kwargs = {"position_ids": torch.tensor([mc["position_ids"]]),
              "attention_mask": torch.tensor(mc["visible"]).bool()[None, None]}
    check_case(model, golden, variant, "multiple_choice", ids, **kwargs)
    with torch.no_grad():
        logp = model(ids, **kwargs).log_softmax(-1)[0]
    scores = [float(logp[t, c].sum()) for c, t in zip(mc["choices"], mc["choice_targets"])]
    assert scores == pytest.approx(g["scores"][f"{variant}/float32"], abs=1e-3)


def test_float16_run_is_close_to_the_originals_fp16_run(sat_dirs, golden):
    """The original runs GLM-130B in fp16 (fp16 rotary table, fp16 scores); glmkit's fp16 model keeps the table's
    dtype chain but accumulates attention in fp32, so it agrees within fp16 rounding."""
    g, logits = golden
    model = glmkit.load_model(sat_dirs["tp1_fp16"], dtype="float16")
    assert model.config.rope_fp16 == "table"
    cols = torch.tensor(g["columns"])
    for case, c in g["cases"].items():
        with torch.no_grad():
            out = model(torch.tensor([c["seq"]]))
        ref = logits[f"tp1_fp16/float16/{case}/logits/columns"]
        assert rel_err(out[..., cols], ref) < 2e-3, case


def test_quantize_on_load_with_glmkits_schemes(sat_dirs, golden):
    float_model = glmkit.load_model(sat_dirs["tp2_fp16"], dtype="float32")
    ids = torch.tensor([golden[0]["cases"]["mask"]["seq"]])
    with torch.no_grad():
        ref = float_model(ids)
    errors = {}
    for quantize in ("int8", "int4"):  # (the INT4 group scheme needs 32+ inputs: rowwise at this toy width)
        model = glmkit.load_model(sat_dirs["tp2_fp16"], dtype="float32", quantize=quantize, quantize_head="none",
                                  scheme="rowwise")
        assert isinstance(model.h[1].mlp.fc, QuantizedLinear) and model.h[1].mlp.fc.bits == int(quantize[3:])
        with torch.no_grad():
            errors[quantize] = rel_err(model(ids), ref)
    # a 16-wide random model: INT8 ~1%, INT4 several times that
    assert errors["int8"] < 0.05 and errors["int8"] < errors["int4"] < 0.3, errors
    with pytest.raises(ValueError, match="already quantized"):
        glmkit.load_model(sat_dirs["tp2_int8"], quantize="int4")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tp2_fp16", "tp2_int4"])
def test_converted_folder_loads_to_the_same_model(sat_dirs, golden, tmp_path, variant):
    out = tmp_path / "converted"
    assert subprocess.run([sys.executable, "-m", "glmkit", "convert", str(sat_dirs[variant]), str(out),
                           "--max-shard-size", "3MB"], capture_output=True, text=True, cwd=REPO, check=False).returncode == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model = glmkit.load_model(out, dtype="float32")
    case = golden[0]["cases"]["smask"]
    check_case(model, golden, variant, "smask", torch.tensor([case["seq"]]))


@pytest.mark.slow
def test_convert_peak_memory_is_one_layer_not_the_model(tmp_path):
    """`glmkit convert` of a 4-way checkpoint of 8 layers (~100 MB of fp16): the peak RSS grows by about one
    layer's shard set and its merged copy plus the output shard, far below the checkpoint."""
    model_config = dict(GLM130B_TINY, vocab_size=1024, hidden_size=1024, num_attention_heads=8,
                        inner_hidden_size=2048, num_layers=8, max_sequence_length=64)
    sd = glm130b_sat_state_dict(model_config, std=0.02)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    layer = size / 8
    src = write_sat_checkpoint(tmp_path / "big", sat_reshard([sd], 4), model_config=model_config)
    del sd
    code = ("import torch, glmkit.core.sat as sat\n"
            "from glmkit.evaluation.bench import peak_rss_bytes\n"
            "torch.zeros(1)\n"
            "base = peak_rss_bytes()\n"
            f"sat.convert_sat_checkpoint({str(src)!r}, {str(tmp_path / 'out')!r}, max_shard_bytes={int(layer)})\n"
            "print(peak_rss_bytes() - base)\n")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                              cwd=REPO).stdout.split()[-1])
    print(f"{size / 1e6:.0f} MB checkpoint, {layer / 1e6:.0f} MB per layer: convert peak RSS +{peak / 1e6:.0f} MB")
    assert peak < 5 * layer + 30e6, f"convert raised peak RSS by {peak / 1e6:.0f} MB"
    assert peak < 0.6 * size


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_deployed_fp16_rotary_table_in_every_load_dtype(sat_dirs, golden, dtype):
    """GLM-130B was trained and is deployed only in fp16 (SAT's RotaryEmbedding, precision=torch.half): every load
    dtype uses that table, value for value, at positions beyond 256, 512 and 1024 too (bf16 would round them)."""
    from tests.helpers.reference_impls import _chatglm_rotary_table  # SAT's RotaryEmbedding is the same gpt-neox code

    model = glmkit.load_model(sat_dirs["tp1_fp16"], dtype=dtype)
    assert model.config.rope_fp16 == "table"
    positions = torch.tensor([[0, 5, 255, 300, 600, 1100, 2047]])
    cos, sin = model.rotary.cos_sin(positions)
    ref_cos, ref_sin = _chatglm_rotary_table(model.config.head_dim, 2048, fp16_table=True)
    assert torch.equal(cos[0], ref_cos[positions[0], 0].float()) and torch.equal(sin[0], ref_sin[positions[0], 0].float())
    if dtype == "bfloat16":  # glmkit's bf16 follows the fp16-table original to bf16 rounding of the activations
        g, logits = golden
        cols = torch.tensor(g["columns"])
        for case, c in g["cases"].items():
            with torch.no_grad():
                out = model(torch.tensor([c["seq"]])).float()
            ref = logits[f"tp1_fp16/float32/{case}/logits/columns"]
            rel = float((out[..., cols] - ref).norm() / ref.norm())
            assert rel < 2e-2, (case, rel)
