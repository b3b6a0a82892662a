"""ChatGLM-6B / ChatGLM2 semantics from the spec, checked against independent reference implementations."""

from __future__ import annotations

import json

import pytest
import torch

import glmkit
import glmkit.core.model
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig
from tests.helpers.checkpoints import (
    CHATGLM_V1_HF,
    CHATGLM_V2_HF,
    thudm_v1_state_dict,
    thudm_v2_state_dict,
    write_folder,
)
from tests.helpers.reference_impls import chatglm_v1_logits, chatglm_v2_logits

BOS, GMASK, MASK = CHATGLM_V1_HF["bos_token_id"], CHATGLM_V1_HF["gmask_token_id"], CHATGLM_V1_HF["mask_token_id"]


def test_chatglm_v1_logits_match_reference(chatglm_v1_dir):
    model = glmkit.load_model(chatglm_v1_dir).eval()
    assert model.config.rope_fp16 == "inv_freq"  # an fp32 original is a .float()-ed one: fp16 inv_freq, fp32 table
    sd = torch.load(chatglm_v1_dir / "pytorch_model.bin")
    ids = torch.tensor([[5, 17, 33, 8, GMASK, BOS, 40, 41, 42], [9, 10, MASK, 12, 13, GMASK, BOS, 60, 61]])
    ref = chatglm_v1_logits(sd, CHATGLM_V1_HF, ids, fp16_table=False)
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_chatglm_v1_fp16_rotary_table(chatglm_v1_dir):
    """As published (fp16 buffers), positions x inv_freq and cos/sin are computed in fp16."""
    assert glmkit.load_model(chatglm_v1_dir, dtype="float16").config.rope_fp16 == "table"
    # bf16 is glmkit's speed choice, not the original's .bfloat16(): it keeps the published fp16 table (issue 22)
    assert glmkit.load_model(chatglm_v1_dir, dtype="bfloat16").config.rope_fp16 == "table"
    model = glmkit.load_model(chatglm_v1_dir)
    model.config.rope_fp16 = "table"
    sd = torch.load(chatglm_v1_dir / "pytorch_model.bin")
    ids = torch.tensor([[5, 17, 33, 8, GMASK, BOS, 40, 41]])
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours, chatglm_v1_logits(sd, CHATGLM_V1_HF, ids, fp16_table=True),
                                   atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours, chatglm_v1_logits(sd, CHATGLM_V1_HF, ids, fp16_table=False), atol=1e-6)


def test_chatglm_v1_positions_and_mask():
    model = GLMForCausalLM(GLMConfig.from_hf_config(CHATGLM_V1_HF))
    ids = torch.tensor([[5, 6, MASK, 7, GMASK, BOS, 20, 21]])
    pos = model.default_position_ids(ids)
    # [gMASK] wins over [MASK]; Part B (from <sop>) frozen at its index, block ids 1, 2, 3 from <sop>
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert pos[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3]
    ids2 = torch.tensor([[5, MASK, 7, BOS, 20]])
    assert model.default_position_ids(ids2)[0].tolist() == [[0, 1, 2, 1, 1], [0, 0, 0, 1, 2]]
    mask = model.default_attention_mask(ids)[0, 0]
    ctx = 5
    assert mask[:, :ctx].all()  # everything before <sop> is visible to everyone
    for i in range(8):
        for j in range(ctx, 8):
            assert bool(mask[i, j]) == (j <= i)  # causal from <sop> on


def test_prefix_lm_is_bidirectional_before_sop_and_causal_after(chatglm_v1_dir):
    model = glmkit.load_model(chatglm_v1_dir)
    a = torch.tensor([[5, 6, 7, GMASK, BOS, 30, 31, 32]])
    b = a.clone()
    b[0, 2] = 99  # a later Part A token changes the logits of earlier Part A positions
    c = a.clone()
    c[0, 7] = 99  # a Part B token never changes earlier positions
    with torch.no_grad():
        la, lb, lc = model(a), model(b), model(c)
    assert not torch.allclose(la[0, 0], lb[0, 0])
    torch.testing.assert_close(la[0, :7], lc[0, :7])


def test_chatglm_v2_logits_match_reference(chatglm_v2_dir):
    model = glmkit.load_model(chatglm_v2_dir)
    from safetensors.torch import load_file  # noqa: F401  (bin fixture)

    sd = torch.load(chatglm_v2_dir / "pytorch_model.bin")
    ids = torch.tensor([[64, 65, 5, 6, 7, 8, 9], [64, 65, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), chatglm_v2_logits(sd, CHATGLM_V2_HF, ids), atol=1e-4, rtol=1e-4)


def test_glm4_rope_ratio(tmp_path):
    hf = dict(CHATGLM_V2_HF, rope_ratio=500.0)
    sd = thudm_v2_state_dict(hf, seed=3)
    model = glmkit.load_model(write_folder(tmp_path / "g", hf, sd))
    assert model.config.rope_base == 5e6
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), chatglm_v2_logits(sd, hf, ids), atol=1e-4, rtol=1e-4)


def _check_cache_equals_full(model, ids):
    new = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    seq = torch.cat([ids, new], dim=1)
    with torch.no_grad():
        full = model(seq)
    # greedy with cache equals greedy over full forwards
    assert torch.equal(full[0, ids.shape[1] - 1:-1].argmax(-1), new[0])
    # and the cached step logits equal the full forward's, position by position
    steps = []
    model.setup_cache(1, seq.shape[1])
    try:
        pos = model.default_position_ids(seq)
        T = ids.shape[1]
        mask = torch.zeros(1, 1, T, seq.shape[1], dtype=torch.bool)
        mask[..., :T] = model.default_attention_mask(ids)
        with torch.no_grad():
            steps.append(model(ids, pos[..., :T], mask, input_pos=torch.arange(T))[:, -1])
            for t in range(T, seq.shape[1]):
                m = torch.zeros(1, 1, 1, seq.shape[1], dtype=torch.bool)
                m[..., : t + 1] = True
                steps.append(model(seq[:, t:t + 1], pos[..., t:t + 1], m, input_pos=torch.tensor([t]))[:, -1])
    finally:
        model.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1)[0], full[0, ids.shape[1] - 1:], atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward(chatglm_v1_dir, chatglm_v2_dir):
    _check_cache_equals_full(glmkit.load_model(chatglm_v1_dir), torch.tensor([[5, 6, 7, GMASK, BOS]]))
    _check_cache_equals_full(glmkit.load_model(chatglm_v2_dir), torch.tensor([[64, 65, 5, 6, 7]]))


def test_bf16_decode_attention_on_cpu_runs_in_fp32():
    """Decode steps (<= DECODE_ROWS query rows) compute CPU attention in fp32 on the bf16 values; a layer's output
    then equals fp32 SDPA on those values, rounded once to bf16."""
    from glmkit.core.config import GLMConfig
    from glmkit.core.model import DECODE_ROWS, GLM

    cfg = GLMConfig.from_name("chatglm2-6b", vocab_size=64, hidden_size=64, num_layers=1, num_heads=4,
                              num_kv_heads=2, ffn_hidden_size=96, max_seq_len=64)
    model = GLM(cfg)
    model.init_weights(0.2, torch.Generator().manual_seed(0))
    attn = model.to(torch.bfloat16).h[0].attn
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    pos = torch.arange(5)[None]
    cos_sin = model.rotary.cos_sin(pos)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    seen = {}
    attn.proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("y", args[0]))
    with torch.no_grad():
        attn(x, cos_sin, mask)
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = attn.qkv(x).split([H * D, K * D, K * D], dim=-1)
        q, k = (glmkit.core.model.apply_rotary_interleaved(t.view(1, 5, -1, D), *cos_sin) for t in (q, k))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(1, 5, K, D).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                               enable_gqa=True).to(torch.bfloat16)
    assert 5 <= DECODE_ROWS
    assert torch.equal(seen["y"], ref.transpose(1, 2).reshape(1, 5, H * D))


def test_padded_batch_equals_rows_alone(chatglm_v1_dir, chatglm_v2_dir):
    for folder, rows, pad in [
        (chatglm_v1_dir, [[5, 6, 7, 8, 9, GMASK, BOS], [11, 12, GMASK, BOS]], 3),
        (chatglm_v2_dir, [[64, 65, 5, 6, 7, 8, 9], [64, 65, 10]], 0),
    ]:
        model = glmkit.load_model(folder)
        T = max(map(len, rows))
        ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
        am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            batch_logits = model(ids, attention_mask=am)
            for b, r in enumerate(rows):
                alone = model(torch.tensor([r]))
                torch.testing.assert_close(batch_logits[b, T - len(r):], alone[0], atol=1e-5, rtol=1e-5)
        batch_out = model.generate(ids, am, max_new_tokens=5, eos_token_id=[])
        for b, r in enumerate(rows):
            assert batch_out[b].tolist() == model.generate(torch.tensor([r]), max_new_tokens=5, eos_token_id=[])[0].tolist()


def test_generate_stops_at_eos_and_pads_finished_rows(chatglm_v2_dir):
    model = glmkit.load_model(chatglm_v2_dir)
    ids = torch.tensor([[64, 65, 5, 6, 7], [64, 65, 8, 9, 10]])
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 1])  # make row 0's second token the eos
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 1] == eos and (out[0, 2:] == 0).all()
    assert eos not in free[1].tolist()  # row 1 never emits it, so it runs to the end as before
    assert out.shape[1] == 6 and out[1].tolist() == free[1].tolist()


def test_max_length_counts_prompt(chatglm_v2_dir):
    model = glmkit.load_model(chatglm_v2_dir)
    ids = torch.tensor([[64, 65, 5, 6, 7]])
    assert model.generate(ids, max_length=9, eos_token_id=[]).shape == (1, 4)
    assert model.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 3)


def test_sampling_is_seeded_and_streaming_matches(chatglm_v2_dir):
    model = glmkit.load_model(chatglm_v2_dir)
    ids = torch.tensor([[64, 65, 5, 6, 7]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, top_k=20, seed=7, eos_token_id=[])
    a, b = model.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(a, b)
    streamed = torch.stack(list(model.stream_generate(ids, **kw)), 1)
    assert torch.equal(streamed, a)


def test_zero_length_prefix_equals_base(chatglm_v1_dir):
    from glmkit.adapters.ptuning import attach_prefix

    model = glmkit.load_model(chatglm_v1_dir)
    ids = torch.tensor([[5, 6, 7, GMASK, BOS, 9]])
    with torch.no_grad():
        base = model(ids)
        attach_prefix(model, 0)
        torch.testing.assert_close(model(ids), base)


def test_ptuned_v1_matches_reference(tmp_path):
    from glmkit.adapters.ptuning import PrefixEncoder  # noqa: F401

    for projection in (False, True):
        sd = thudm_v1_state_dict(CHATGLM_V1_HF, pre_seq_len=4, prefix_projection=projection)
        hf = dict(CHATGLM_V1_HF, pre_seq_len=4, prefix_projection=projection)
        model = glmkit.load_model(write_folder(tmp_path / f"p{projection}", hf, sd))
        ids = torch.tensor([[5, 6, 7, GMASK, BOS, 9, 10]])
        kv = _reference_prefix(sd, hf, ids.shape[0], projection, heads=hf["num_attention_heads"])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), chatglm_v1_logits(sd, hf, ids, fp16_table=False, prefix_kv=kv),
                                       atol=1e-4, rtol=1e-4)


def test_ptuned_v2_matches_reference(tmp_path):
    sd = thudm_v2_state_dict(CHATGLM_V2_HF, pre_seq_len=3, prefix_projection=True)
    hf = dict(CHATGLM_V2_HF, pre_seq_len=3, prefix_projection=True)
    model = glmkit.load_model(write_folder(tmp_path / "p", hf, sd, fmt="safetensors"))
    ids = torch.tensor([[64, 65, 5, 6, 7, 8]])
    kv = _reference_prefix(sd, hf, 1, True, heads=hf["multi_query_group_num"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), chatglm_v2_logits(sd, hf, ids, prefix_kv=kv), atol=1e-4, rtol=1e-4)


def _reference_prefix(sd, hf, batch, projection, heads):
    """THUDM get_prompt: embedding (-> trans) -> view (b, P, 2L, heads, d) -> permute [2,1,0,3,4] -> split(2)."""
    import torch.nn.functional as F

    P = hf["pre_seq_len"]
    x = sd["transformer.prefix_encoder.embedding.weight"][torch.arange(P)]
    if projection:
        x = F.linear(x, sd["transformer.prefix_encoder.trans.0.weight"], sd["transformer.prefix_encoder.trans.0.bias"])
        x = F.linear(torch.tanh(x), sd["transformer.prefix_encoder.trans.2.weight"], sd["transformer.prefix_encoder.trans.2.bias"])
    L = hf["num_layers"]
    x = x[None].expand(batch, -1, -1).reshape(batch, P, 2 * L, heads, -1).permute(2, 1, 0, 3, 4).split(2)
    return [(t[0], t[1]) for t in x]


def test_glm_config_validation():
    import pytest

    from glmkit.core.config import ConfigError

    with pytest.raises(ConfigError):
        GLMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        GLMConfig.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError):
        GLMForCausalLM(GLMConfig.from_hf_config(CHATGLM_V1_HF))(torch.tensor([[1000]]))


@pytest.mark.parametrize("depth", [1, 3, 6, 28])
def test_chatglm_v1_alpha_is_sqrt56_at_every_depth(tmp_path, depth):
    """ChatGLM-6B's GLMBlock takes num_layers=28 as a default argument that the model never passes: α = √56 for a
    checkpoint of any depth (logits and greedy tokens as the original computes them)."""
    hf = dict(CHATGLM_V1_HF, num_layers=depth, hidden_size=32, num_attention_heads=2, inner_hidden_size=48)
    sd = thudm_v1_state_dict(hf, seed=depth)
    model = glmkit.load_model(write_folder(tmp_path / f"d{depth}", hf, sd)).eval()
    assert model.config.deepnorm_alpha == 56 ** 0.5
    ids = torch.tensor([[5, 17, 33, 8, GMASK, BOS]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), chatglm_v1_logits(sd, hf, ids, fp16_table=False), atol=1e-4, rtol=1e-4)
    new = model.generate(ids, max_new_tokens=6, do_sample=False)[0].tolist()
    seq = ids
    for _ in range(6):  # greedy with the reference's full forward at every step
        nxt = chatglm_v1_logits(sd, hf, seq, fp16_table=False)[0, -1].argmax()
        if int(nxt) == hf["eos_token_id"]:
            break
        seq = torch.cat((seq, nxt.view(1, 1)), dim=1)
    assert new[:seq.shape[1] - ids.shape[1]] == seq[0, ids.shape[1]:].tolist()


def test_deepnorm_alpha_follows_its_config_field():
    assert GLMConfig.from_name("chatglm-6b", num_layers=3).deepnorm_alpha == 56 ** 0.5
    assert GLMConfig.from_name("chatglm-6b", num_layers=3, alpha_num_layers=None).deepnorm_alpha == 6 ** 0.5
    assert GLMConfig.from_name("chatglm2-6b").deepnorm_alpha == 1.0  # pre-norm residuals have no α


def test_non_chatglm_alpha_saves_in_glmkit_layout_and_round_trips(tmp_path):
    """A DeepNorm α the original code cannot express is written with glmkit's own config, never silently as √56."""
    config = GLMConfig.from_name("chatglm-6b", vocab_size=160, hidden_size=32, num_layers=2, num_heads=2,
                                 ffn_hidden_size=48, alpha_num_layers=2, bos_token_id=154, eos_token_id=155,
                                 mask_token_id=150, gmask_token_id=151, torch_dtype="float32")
    model = GLMForCausalLM(config)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    out = glmkit.save_model(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "glmkit"
    loaded = glmkit.load_model(out)
    assert loaded.config.deepnorm_alpha == 2.0
    model.config.rope_fp16 = loaded.config.rope_fp16  # the loader picks the rotary table of the load dtype
    ids = torch.tensor([[5, 6, GMASK, BOS, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


LONG = (300, 600, 1100, 2047)  # beyond 256, 512 and 1024: bf16 would round these, fp16 holds every integer to 2048


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_chatglm_v1_rotary_table_at_long_positions_in_every_dtype(tmp_path, dtype):
    """The table the loader picks is the original's, value for value, at positions bf16 cannot represent: the
    `.float()`-ed model's fp32 table for fp32, the published fp16 table for fp16 and for glmkit's bf16."""
    from tests.helpers.reference_impls import _chatglm_rotary_table

    hf = dict(CHATGLM_V1_HF, max_sequence_length=2048, torch_dtype="float16")
    folder = write_folder(tmp_path / "m", hf, {k: v.half() for k, v in thudm_v1_state_dict(hf).items()})
    model = glmkit.load_model(folder, dtype=dtype)
    cos, sin = model.rotary.cos_sin(torch.tensor([LONG]))
    ref_cos, ref_sin = _chatglm_rotary_table(model.rotary.dim, 2048, fp16_table=dtype != "float32")
    idx = torch.tensor(LONG)
    assert torch.equal(cos[0], ref_cos[idx, 0].float()) and torch.equal(sin[0], ref_sin[idx, 0].float())
    if dtype == "bfloat16":  # what a bf16 table gives instead: positions 300, 600, 1100 rounded to 300, 600, 1104
        model.config.rope_fp16 = "table_bf16"
        assert not torch.equal(model.rotary.cos_sin(torch.tensor([LONG]))[0][0], cos[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_chatglm_v1_logits_beyond_1024_positions_in_every_dtype(tmp_path, dtype):
    """An fp16 checkpoint read as the original reads it, 1100 tokens long: logits at positions 0-255, 256-511,
    512-1023 and 1024+ equal the original's (fp32: its `.float()` model; fp16 and bf16: the fp16-table model on the
    same rounded weights) to the rounding of the load dtype's activations."""
    hf = dict(CHATGLM_V1_HF, max_sequence_length=2048, torch_dtype="float16")
    sd16 = {k: v.half() for k, v in thudm_v1_state_dict(hf).items()}
    folder = write_folder(tmp_path / "m", hf, sd16, fmt="safetensors")
    ids = torch.randint(0, 150, (1, 1100), generator=torch.Generator().manual_seed(0))
    ids[0, -10], ids[0, -9] = GMASK, BOS  # Part A reaches position 1090; Part B sits there with block ids 1..9
    weights = {k: v.to(getattr(torch, dtype)).float() for k, v in sd16.items()}
    ref = chatglm_v1_logits(weights, hf, ids, fp16_table=dtype != "float32")[0]
    model = glmkit.load_model(folder, dtype=dtype)
    with torch.no_grad():
        out = model(ids).float()[0]
    bound = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}[dtype]
    for a, b in ((0, 256), (256, 512), (512, 1024), (1024, 1100)):
        rel = float((out[a:b] - ref[a:b]).norm() / ref[a:b].norm())
        assert rel < bound, (dtype, a, b, rel)
    if dtype == "bfloat16":  # the bf16 table this replaced is several times further off
        model.config.rope_fp16 = "table_bf16"
        with torch.no_grad():
            off = model(ids).float()[0]
        assert float((off[256:] - ref[256:]).norm() / ref[256:].norm()) > 3 * bound
