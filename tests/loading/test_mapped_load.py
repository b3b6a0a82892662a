"""Saved quantized models load memory-mapped: `glmkit quantize` writes the CPU kernel's layout 64-byte aligned, and
load_model maps the file and takes its tensors without a copy or any quantizing; other block sizes, the portable
layout of earlier glmkit files and unaligned files still load, through a copy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import glmkit
import glmkit.quant.quantize as Q
from glmkit.commands.quantize import cli_main as quantize_command
from glmkit.core.checkpoint import iter_tensors
from glmkit.core.convert import to_thudm_state_dict
from glmkit.quant import formats, kernels
from tests.helpers.checkpoints import CHATGLM_V1_HF, int4pack_with_block, thudm_v1_state_dict, write_folder

IDS = torch.tensor([[5, 6, 7, 8, 9, 151, 154, 11, 12]])
HF = dict(CHATGLM_V1_HF, hidden_size=128, num_attention_heads=4, inner_hidden_size=256)
needs_int4pack = pytest.mark.skipif(kernels.int4pack_block_n() is None, reason="no CPU int4pack layout here")


@pytest.fixture
def saved(tmp_path):
    """(float folder, `glmkit quantize --bits 4` output, the same model quantized while loading)."""
    sd = thudm_v1_state_dict(HF, std=0.1)
    del sd["lm_head.weight"]  # tied, as ChatGLM-6B
    src = write_folder(tmp_path / "src", HF, sd, fmt="safetensors")
    assert quantize_command([str(src), str(tmp_path / "q4"), "--bits", "4"]) == 0
    return src, tmp_path / "q4", glmkit.load_model(src, quantize="int4")


@needs_int4pack
def test_saved_model_maps_without_copies_or_quantizing(saved, monkeypatch):
    _, out, reference = saved
    path = out / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:  # a standard safetensors file
        meta = json.loads(f.metadata()[Q.QUANT_KEY])
        assert meta["int4pack_block"] == kernels.int4pack_block_n() and meta["head"]["bits"] == 8
        n = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8:8 + n])
        for name in f.keys():
            begin = header[name]["data_offsets"][0]
            if name.endswith(("weight_int4pack", "word_embeddings.weight")):
                assert (8 + n + begin) % 64 == 0, name  # kernel-read tensors start 64-byte aligned
    monkeypatch.setattr(formats, "quantize_group",
                        lambda *a, **k: pytest.fail("a saved model loads without quantizing"))
    monkeypatch.setattr(kernels, "int_to_int4pack", lambda *a, **k: pytest.fail("... and without repacking"))
    model = glmkit.load_model(out)
    size = path.stat().st_size
    fc, table = model.h[1].mlp.fc, model.wte
    assert fc.layout == "int4pack" and model.lm_head is table and table.layout == "int8"
    for t in (fc.qweight, fc.scale_zero, table.qweight, model.h[0].ln_1.weight):
        assert t.untyped_storage().nbytes() == size  # a view of the one memory map of the file, not a copy
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference(IDS), rtol=0, atol=0)
    assert torch.equal(model.generate(IDS, max_new_tokens=3), reference.generate(IDS, max_new_tokens=3))


@needs_int4pack
def test_overwriting_the_folder_leaves_a_mapped_model_working(saved):
    _, out, reference = saved
    model = glmkit.load_model(out)
    Q.save_quantized(glmkit.load_model(saved[0], quantize="int8"), out)  # written beside, renamed over
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference(IDS), rtol=0, atol=0)
    assert glmkit.load_model(out).h[0].mlp.fc.bits == 8


@needs_int4pack
def test_layout_from_a_cpu_with_another_block_size_loads_through_a_copy(saved, tmp_path):
    """A file saved on an AVX2 machine (blocks of 32 rows) loaded on AVX-512 (64), or the other way round."""
    _, out, reference = saved
    block = kernels.int4pack_block_n()
    other = 32 if block == 64 else 64
    tensors, meta = {}, None
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    spec = json.loads(meta[Q.QUANT_KEY])
    k_of = {"query_key_value": HF["hidden_size"], "dense": HF["hidden_size"], "dense_h_to_4h": HF["hidden_size"],
            "dense_4h_to_h": HF["inner_hidden_size"]}
    for name in [n for n in tensors if n.endswith(".weight_int4pack")]:
        k = k_of[name.split(".")[-2]]
        packed = tensors[name]
        q = kernels.int4pack_to_int(packed, packed.shape[0], k)
        tensors[name] = int4pack_with_block(q, other)
        sz = tensors[name.replace("weight_int4pack", "weight_scale_zero")]
        rows = tensors[name].shape[0]
        if rows != sz.shape[1]:  # the padding follows the block size
            fixed = torch.zeros(sz.shape[0], rows, 2, dtype=sz.dtype)
            m = min(rows, sz.shape[1])
            fixed[:, :m] = sz[:, :m]
            tensors[name.replace("weight_int4pack", "weight_scale_zero")] = fixed
    spec["int4pack_block"] = other
    folder = tmp_path / "other-block"
    folder.mkdir()
    (folder / "config.json").write_text((out / "config.json").read_text())
    save_file(tensors, str(folder / "model.safetensors"), metadata={**meta, Q.QUANT_KEY: json.dumps(spec)})
    model = glmkit.load_model(folder)
    assert model.h[0].attn.qkv.layout == "int4pack"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference(IDS), rtol=0, atol=0)


def test_earlier_portable_files_still_load(saved, tmp_path):
    """glmkit's saved files before the kernel layout was saved: THUDM packing, no head, no block size."""
    src, _, _ = saved
    model = glmkit.load_model(src, quantize="int4", quantize_head="none")
    sd = to_thudm_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, model.config)
    spec = {"bits": 4, "scheme": "group", "group_size": 32, "symmetric": False, "layout": "glmkit"}
    folder = tmp_path / "portable"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**HF, Q.QUANT_KEY: spec}))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt", Q.QUANT_KEY: json.dumps(spec)})
    back = glmkit.load_model(folder)
    assert back.config.extra["quantization"]["head"] is None and back.lm_head.weight is back.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), model(IDS), rtol=0, atol=0)


def test_mapped_reading_equals_plain_reading_and_copies_unaligned_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).half(), "b": torch.randint(-9, 9, (7,), dtype=torch.int8,
               generator=g), "c": torch.randn(64, 64, generator=g).bfloat16(), "d": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))  # safetensors' own writer: offsets aligned only to the element size
    plain = dict(iter_tensors([path]))
    mapped = dict(iter_tensors([path], mapped=True))
    assert plain.keys() == mapped.keys() == tensors.keys()
    for name, t in tensors.items():
        assert mapped[name].dtype == t.dtype and torch.equal(mapped[name], t) and torch.equal(plain[name], t)
    mapped["c"].add_(1)  # a private mapping: writable, and the file keeps its bytes
    assert torch.equal(dict(iter_tensors([path], mapped=True))["c"], tensors["c"])
