"""GLM-130B's SwissArmyTransformer checkpoints: tensor-parallel merge/split (GLU halves, per-shard quantization
scales), reading folders and their model_config.json, and the conversion to one safetensors folder."""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.core.checkpoint import CheckpointError
from glmkit.core.config import ConfigError
from glmkit.core.sat import (
    convert_sat_checkpoint,
    is_sat_checkpoint,
    iter_sat_tensors,
    local_tensor,
    merge_tensor,
    needed_shards,
    read_sat_config,
    sat_shard_files,
    split_tensor,
)
from tests.helpers.goldens import GLM130B_TINY, glm130b_sat_state_dict, sat_reshard, write_sat_checkpoint

L0 = "transformer.layers.0."


@pytest.fixture(scope="module")
def sd():
    return glm130b_sat_state_dict()


def test_merge_inverts_convert_tp_split_for_every_tensor(sd):
    """Splitting as convert_tp.py does (tests.helpers.goldens.sat_reshard, checked against the original by the golden
    script) and merging with glmkit gives back every tensor; glmkit's split gives convert_tp's shards."""
    for tp in (2, 4):
        shards = sat_reshard([sd], tp)
        for key, full in sd.items():
            if "inv_freq" in key:
                continue
            assert torch.equal(merge_tensor(key, [s[key] for s in shards]), full), key
            for r in range(tp):
                assert torch.equal(split_tensor(key, full, tp, r), shards[r][key]), (key, tp, r)


def test_glu_split_takes_each_ranks_slice_of_both_halves():
    key = L0 + "mlp.dense_h_to_4h.weight"
    full = torch.arange(8.0)[:, None].expand(8, 2)  # rows 0-3 = x1, rows 4-7 = x2
    r0, r1 = split_tensor(key, full, 2, 0), split_tensor(key, full, 2, 1)
    assert r0[:, 0].tolist() == [0, 1, 4, 5] and r1[:, 0].tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_tensor(key, [r0, r1]), full)
    # a plain row split would give rank 0 all of x1: the GLU split must differ from it
    assert not torch.equal(r0, full[:4])


def test_per_shard_scales_of_row_parallel_layers_merge_into_groups(sd):
    """convert_tp.py quantizes each shard alone: a row-parallel weight merged from 2 shards has [out, 2] scales,
    each the absmax of its shard's slice of the input; column-parallel scales stay one per row."""
    q2 = sat_reshard([sd], 2, bits=8)
    key = L0 + "attention.dense.weight_scale"
    merged = merge_tensor(key, [s[key] for s in q2])
    w = sd[L0 + "attention.dense.weight"]
    assert merged.shape == (16, 2)
    for g in range(2):
        assert torch.equal(merged[:, g], (w[:, g * 8:(g + 1) * 8].abs().max(dim=-1).values / 127).half())
    qkv = L0 + "attention.query_key_value.weight_scale"
    assert merge_tensor(qkv, [s[qkv] for s in q2]).shape == (48,)
    # dealt back out: 2 groups over 2 ranks -> one [out] scale each; over 4 ranks, both halves of a group share it
    assert torch.equal(split_tensor(key, merged, 2, 1), q2[1][key])
    assert torch.equal(split_tensor(key, merged, 4, 3), q2[1][key])
    # packed INT4 columns: each shard's bytes side by side
    q4 = sat_reshard([sd], 2, bits=4)
    wkey = L0 + "mlp.dense_4h_to_h.weight"
    assert merge_tensor(wkey, [s[wkey] for s in q4]).shape == (16, 12)


def test_resharding_reads_only_the_needed_shards(sd):
    assert needed_shards(8, 2, 1) == [4, 5, 6, 7]
    assert needed_shards(2, 4, 3) == [1]
    assert needed_shards(4, 1, 0) == [0, 1, 2, 3]
    with pytest.raises(CheckpointError, match="cannot be merged 3 ways"):
        needed_shards(4, 3, 0)
    four = sat_reshard([sd], 4)
    two = sat_reshard([sd], 2)
    for key in two[1]:
        if "inv_freq" in key:
            continue
        got = local_tensor(key, [four[r][key] for r in needed_shards(4, 2, 1)], 4, 2, 1)
        assert torch.equal(got, two[1][key]), key
        got = local_tensor(key, [two[r][key] for r in needed_shards(2, 4, 2)], 2, 4, 2)
        assert torch.equal(got, four[2][key]), key


def test_iter_sat_tensors_merges_a_layer_at_a_time(tmp_path, sd):
    folder = write_sat_checkpoint(tmp_path / "tp2", sat_reshard([sd], 2))
    got = dict(iter_sat_tensors(folder))
    assert not any("inv_freq" in k for k in got)
    assert set(got) == {k for k in sd if "inv_freq" not in k}
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    rank1 = dict(iter_sat_tensors(folder, world=2, rank=1))
    assert rank1[L0 + "mlp.dense_h_to_4h.weight"].shape == (24, 16)


def test_read_config_from_model_config_json_and_tensors(tmp_path, sd):
    folder = write_sat_checkpoint(tmp_path / "q", sat_reshard([sd], 2, bits=4))
    assert is_sat_checkpoint(folder) and len(sat_shard_files(folder)) == 2
    c = read_sat_config(folder)
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size) == (
        "glm130b", 2, 16, 2, 24, 150528)
    assert (c.mlp, c.rope, c.residual, c.tie_word_embeddings, c.torch_dtype) == ("geglu", "1d", "deepnorm", True,
                                                                                 "float16")
    assert c.deepnorm_alpha == 2.0  # sqrt(2 * 2 layers): SAT computes it from its own layer count
    assert c.extra["sat_quantization"] == {"bits": 4, "row_parallel_groups": 2}
    assert c.eos_token_ids == [150005, 20002] and c.smask_token_id == 150002


def test_newer_sat_config_leaves_defaults_out(tmp_path, sd):
    """Newer SAT writes only non-default optional arguments (no layernorm_epsilon, head size, inner size)."""
    cfg = {k: v for k, v in GLM130B_TINY.items() if k not in ("inner_hidden_size", "hidden_dropout",
                                                                "attention_dropout")}
    folder = write_sat_checkpoint(tmp_path / "new", [sd], model_config=cfg)
    c = read_sat_config(folder)
    assert (c.ffn_hidden_size, c.norm_eps, c.head_dim) == (24, 1e-5, 8)
    (folder / "model_config.json").write_text(json.dumps(dict(cfg, layernorm_epsilon=1e-6)))
    assert read_sat_config(folder).norm_eps == 1e-6


def test_bad_folders_get_clear_errors(tmp_path, sd):
    folder = write_sat_checkpoint(tmp_path / "a", sat_reshard([sd], 2))
    with pytest.raises(ConfigError, match="num_layers 3"):
        (folder / "model_config.json").write_text(json.dumps(dict(GLM130B_TINY, num_layers=3)))
        read_sat_config(folder)
    (folder / "model_config.json").unlink()
    with pytest.raises(ConfigError, match="published hyper-parameters"):  # no config: GLM-130B's own shapes
        read_sat_config(folder)
    (folder / "model_config.json").write_text(json.dumps(dict(GLM130B_TINY, model_class="ChatGLMModel")))
    with pytest.raises(ConfigError, match="not GLM130B"):
        read_sat_config(folder)
    (folder / "1000" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"shards \[0\] are missing"):
        sat_shard_files(folder)
    (folder / "latest").write_text("2000")
    with pytest.raises(CheckpointError, match="does not exist"):
        sat_shard_files(folder)
    bad = tmp_path / "bad"
    (bad / "1").mkdir(parents=True)
    (bad / "latest").write_text("1")
    torch.save({"weights": {}}, bad / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="'module'"):
        list(iter_sat_tensors(bad))


def test_convert_writes_sharded_safetensors(tmp_path, sd):
    folder = write_sat_checkpoint(tmp_path / "tp2", sat_reshard([sd], 2, bits=8))
    out = convert_sat_checkpoint(folder, tmp_path / "out", max_shard_bytes=2_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "glmkit" and hf["family"] == "glm130b"
    assert hf["extra"]["sat_quantization"] == {"bits": 8, "row_parallel_groups": 2}
    from safetensors.torch import load_file

    merged = {}
    for f in files:
        merged.update(load_file(out / f))
    assert merged[L0 + "attention.dense.weight_scale"].shape == (16, 2)
    assert merged[L0 + "attention.query_key_value.weight"].dtype == torch.int8
