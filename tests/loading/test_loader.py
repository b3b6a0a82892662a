"""Loading: layouts, shards, adapters, transformers' GLM parity, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import glmkit
from glmkit.core.checkpoint import CheckpointError
from tests.helpers.checkpoints import (
    CHATGLM_V1_HF,
    CHATGLM_V2_HF,
    thudm_v1_state_dict,
    thudm_v2_state_dict,
    write_folder,
)

IDS_V1 = torch.tensor([[5, 6, 7, 151, 154, 9, 10]])
IDS_V2 = torch.tensor([[64, 65, 5, 6, 7, 8]])


@pytest.mark.parametrize("fmt,shards", [("bin", 1), ("bin", 3), ("safetensors", 1), ("safetensors", 2)])
def test_all_file_layouts_load_the_same(tmp_path, fmt, shards):
    sd = thudm_v1_state_dict(CHATGLM_V1_HF)
    ref = glmkit.load_model(write_folder(tmp_path / "ref", CHATGLM_V1_HF, sd))
    other = glmkit.load_model(write_folder(tmp_path / "x", CHATGLM_V1_HF, sd, fmt=fmt, shards=shards))
    with torch.no_grad():
        assert torch.equal(ref(IDS_V1), other(IDS_V1))


def test_torch_dtype_and_dtype_override(tmp_path):
    hf = dict(CHATGLM_V2_HF, torch_dtype="bfloat16")
    folder = write_folder(tmp_path / "m", hf, thudm_v2_state_dict(hf))
    assert glmkit.load_model(folder).wte.weight.dtype == torch.bfloat16
    assert glmkit.load_model(folder, dtype="float32").wte.weight.dtype == torch.float32


def test_adapter_folder_equals_merged_checkpoint(tmp_path):
    full = thudm_v1_state_dict(CHATGLM_V1_HF, pre_seq_len=5, prefix_projection=True)
    hf_p = dict(CHATGLM_V1_HF, pre_seq_len=5, prefix_projection=True)
    merged = glmkit.load_model(write_folder(tmp_path / "merged", hf_p, full))
    base_sd = {k: v for k, v in full.items() if not k.startswith("transformer.prefix_encoder.")}
    base = write_folder(tmp_path / "base", CHATGLM_V1_HF, base_sd)
    adapter = write_folder(tmp_path / "adapter", hf_p,
                           {k: v for k, v in full.items() if k.startswith("transformer.prefix_encoder.")})
    tuned = glmkit.load_model(base, adapter=adapter)
    with torch.no_grad():
        torch.testing.assert_close(tuned(IDS_V1), merged(IDS_V1))
        assert not torch.allclose(glmkit.load_model(base)(IDS_V1), merged(IDS_V1))
    assert torch.equal(tuned.generate(IDS_V1, max_new_tokens=5, eos_token_id=[]),
                       merged.generate(IDS_V1, max_new_tokens=5, eos_token_id=[]))


def test_ptuning_checkpoint_round_trip(tmp_path):
    from glmkit.adapters.ptuning import attach_prefix, save_ptuning_checkpoint

    base = write_folder(tmp_path / "base", CHATGLM_V2_HF, thudm_v2_state_dict(CHATGLM_V2_HF))
    model = glmkit.load_model(base)
    attach_prefix(model, 4, prefix_projection=False)
    torch.nn.init.normal_(model.prefix_encoder.embedding.weight)
    out = save_ptuning_checkpoint(model, tmp_path / "ckpt")
    saved = torch.load(out / "pytorch_model.bin")
    assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]
    assert json.loads((out / "config.json").read_text())["pre_seq_len"] == 4
    again = glmkit.load_model(base, adapter=out)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS_V2), model(IDS_V2))


def test_transformers_glm_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GlmConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=64, pad_token_id=0, eos_token_id=[1])
    ref = transformers.GlmForCausalLM(cfg).eval()
    for p in ref.parameters():  # larger weights than the default init make the comparison meaningful
        torch.nn.init.normal_(p, std=0.2)
    ref.save_pretrained(tmp_path / "glm")
    ours = glmkit.load_model(tmp_path / "glm")
    ids = torch.randint(2, 99, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)
    theirs = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, max_new_tokens=8, eos_token_id=[]), theirs)
    # quantize-on-load: q/k/v are fused before quantizing, the other weights are read a block of rows at a time
    from glmkit.quant.quantize import quantize_model

    q8 = glmkit.load_model(tmp_path / "glm", quantize="int8")
    with torch.no_grad():
        torch.testing.assert_close(q8(ids), quantize_model(ours, 8)(ids), atol=1e-5, rtol=1e-5)


def test_save_model_round_trip_and_thudm_names(tmp_path):
    sd = thudm_v2_state_dict(CHATGLM_V2_HF)
    model = glmkit.load_model(write_folder(tmp_path / "a", CHATGLM_V2_HF, sd))
    out = glmkit.save_model(model, tmp_path / "b", max_shard_bytes=50_000)
    from safetensors import safe_open

    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert names == set(sd) - {"transformer.rotary_pos_emb.inv_freq"}
    again = glmkit.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(IDS_V2), model(IDS_V2))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        glmkit.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        glmkit.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CHATGLM_V1_HF))
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        glmkit.load_model(tmp_path / "empty")


def test_corrupt_files(tmp_path):
    folder = write_folder(tmp_path / "m", CHATGLM_V1_HF, thudm_v1_state_dict(CHATGLM_V1_HF), fmt="safetensors")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        glmkit.load_model(folder)
    folder2 = write_folder(tmp_path / "n", CHATGLM_V1_HF, thudm_v1_state_dict(CHATGLM_V1_HF))
    (folder2 / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        glmkit.load_model(folder2)
    (folder2 / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        glmkit.load_model(folder2)


def test_unknown_architecture(tmp_path):
    from glmkit.core.config import ConfigError

    folder = write_folder(tmp_path / "m", dict(CHATGLM_V1_HF, model_type="llama", architectures=["LlamaForCausalLM"]),
                          {"x": torch.zeros(1)})
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        glmkit.load_model(folder)


def test_missing_unexpected_and_mismatched_weights(tmp_path):
    sd = thudm_v1_state_dict(CHATGLM_V1_HF)
    missing = dict(sd)
    del missing["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*h\.1\.mlp\.proj\.weight"):
        glmkit.load_model(write_folder(tmp_path / "a", CHATGLM_V1_HF, missing))
    extra = dict(sd, **{"transformer.layers.0.attention.extra_thing": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected weight 'transformer.layers.0.attention.extra_thing'"):
        glmkit.load_model(write_folder(tmp_path / "b", CHATGLM_V1_HF, extra))
    more_layers = thudm_v1_state_dict(dict(CHATGLM_V1_HF, num_layers=4))
    with pytest.raises(CheckpointError, match="unexpected weight 'transformer.layers.3"):
        glmkit.load_model(write_folder(tmp_path / "c", CHATGLM_V1_HF, more_layers))
    wrong = thudm_v1_state_dict(dict(CHATGLM_V1_HF, inner_hidden_size=80))
    with pytest.raises(CheckpointError, match="shape mismatch for h.0.mlp.fc.weight"):
        glmkit.load_model(write_folder(tmp_path / "d", CHATGLM_V1_HF, wrong))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not fetch 'THUDM/chatglm-6b'"):
        glmkit.load_model("THUDM/chatglm-6b")


@pytest.mark.slow
def test_streaming_load_peak_memory(tmp_path):
    """A ~200 MB checkpoint loads with peak RSS well below twice its size (meta build + streamed tensors)."""
    hf = dict(CHATGLM_V2_HF, hidden_size=1024, num_attention_heads=8, kv_channels=128, ffn_hidden_size=2816,
              num_layers=6, padded_vocab_size=1000)
    folder = write_folder(tmp_path / "big", hf, thudm_v2_state_dict(hf, std=0.02), fmt="safetensors", shards=3)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    code = (
        "import re, torch, glmkit\n"
        "def hwm():  # peak RSS of this process (VmHWM), in bytes\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "base = hwm()\n"
        f"m = glmkit.load_model({str(folder)!r})\n"
        "print(base, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak = map(int, out)
    # final weights + one shard's worth of slack + allocator slack (15%); an eager loader
    # holding a state dict and a model would need 2x the size
    largest_shard = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert peak - base < 1.15 * size + largest_shard + 64e6, \
        f"loading {size / 1e6:.0f} MB raised peak RSS by {(peak - base) / 1e6:.0f} MB"


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_float16_checkpoints_load_in_bfloat16_on_cpu_by_default(tmp_path, quantize):
    from glmkit.core.checkpoint import default_dtype
    from glmkit.loading.checkpoint_ops import load_chat_model

    hf = dict(CHATGLM_V1_HF, torch_dtype="float16")
    sd = {k: v.half() for k, v in thudm_v1_state_dict(hf).items()}
    folder = write_folder(tmp_path / "fp16", hf, sd, fmt="safetensors")
    assert default_dtype("float16", "cpu") == torch.bfloat16
    assert default_dtype("float16", "cuda") == torch.float16
    assert default_dtype("float32", "cpu") == torch.float32  # fp32 checkpoints keep their dtype
    # the library default, with no dtype=: the fast bf16 path (the quantized kernels included)
    model = glmkit.load_model(folder, quantize=quantize)
    assert model.dtype == torch.bfloat16 and model.config.torch_dtype == "bfloat16"
    assert model.wte(torch.tensor([[1, 2]])).dtype == torch.bfloat16  # the (quantized, if so) embedding's rows too
    assert model.config.rope_fp16 == "table"  # the published fp16 table, not a bf16 one (issue 22)
    assert glmkit.load_model("glm-tiny", quantize=quantize).dtype == torch.float32
    # an explicit dtype wins
    assert glmkit.load_model(folder, quantize=quantize, dtype="float16").dtype == torch.float16
    with pytest.raises(FileNotFoundError):
        load_chat_model(str(tmp_path / "missing"), device="cpu")
