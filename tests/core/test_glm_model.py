"""The original GLM (glm-large-chinese / glm-2b / glm-10b / glm-10b-chinese) against its hub code's own outputs.

tests/data/glm holds two tiny checkpoints THUDM's hub code wrote (GLMForConditionalGeneration names in one
pytorch_model.bin; GLMModel names in shards) and that code's logits for explicit, default and GLM-specific positions
and masks (tests/data/glm/make_golden.py; transformers 4.26.1, torch 2.13)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import glmkit
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import ConfigError, GLMConfig
from glmkit.core.convert import ORIGINAL_GLM, OriginalGLMConverter
from tests.helpers.goldens import GLM_DATA, glm_golden, glm_logits_case

FIXTURES = ("chinese", "gpt2")
CASES = ("seq2seq_batch", "fill_prompt", "multiple_choice", "default", "positions_only", "sep", "key_mask_2d")
ATOL = 3e-4


@pytest.fixture(scope="module")
def models():
    return {name: glmkit.load_model(GLM_DATA / name) for name in FIXTURES}


def _glmkit_inputs(kwargs: dict, case: str) -> dict:
    """The hub inputs in glmkit's conventions: 0/1 [B, 1, T, T] masks as bool; the hub reads a [B, T] 0/1 mask as
    a key mask for every row, which glmkit takes as the explicit [B, 1, T, T] mask it means."""
    out = dict(kwargs)
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        out["attention_mask"] = mask.bool()
    if case == "key_mask_2d":
        B, T = mask.shape
        out["attention_mask"] = mask.bool()[:, None, None, :].expand(B, 1, T, T)
    return out


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_the_hub_code(models, fixture, case):
    kwargs, columns, lse = glm_logits_case(fixture, case)
    with torch.no_grad():
        logits = models[fixture](**_glmkit_inputs(kwargs, case))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[..., ::7], columns, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), lse, atol=ATOL, rtol=0)


def test_default_positions_and_mask_are_the_hub_defaults(models):
    """model(ids) = positions 0.., block 0, causal: the same as passing them explicitly."""
    model = models["gpt2"]
    ids = torch.tensor([[5, 80, 3, 44, 9, 100], [7, 7, 7, 1, 2, 3]])
    T = ids.shape[1]
    pos = torch.stack((torch.arange(T), torch.zeros(T, dtype=torch.long)))[None].expand(2, -1, -1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(2, 1, T, T)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, pos, causal), atol=0, rtol=0)
        # GLM's own `sep` form: every row sees the first sep tokens, the rest causally
        sep = torch.tensor([4, 2])
        allowed = causal.clone()
        for b, s in enumerate(sep.tolist()):
            allowed[b, :, :, :s] = True
        torch.testing.assert_close(model(ids, pos, sep), model(ids, pos, allowed), atol=0, rtol=0)


def test_fully_masked_rows_average_all_values(models):
    """The hub's S·M - 65504·(1 - M): a row that sees no key weighs every value equally; the golden multiple-choice
    case has such rows (the collate pads whole rows), so attending to all keys by score would miss it."""
    model = models["chinese"]
    kwargs, columns, _ = glm_logits_case("chinese", "multiple_choice")
    inputs = _glmkit_inputs(kwargs, "multiple_choice")
    assert (~inputs["attention_mask"].any(-1)).any(), "the case must hold fully masked rows"
    model.config.masked_row = "all"
    try:
        with torch.no_grad():
            wrong = model(**inputs)[..., ::7]
    finally:
        model.config.masked_row = "uniform"
    assert (wrong - columns).abs().max() > 1e-2


def test_checkpoint_layouts_load_alike(tmp_path):
    """One file with `glm.` names, shards with GLMModel's names, and safetensors written by glmkit: one model."""
    a = glmkit.load_model(GLM_DATA / "gpt2")
    keys = json.loads((GLM_DATA / "gpt2" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert not any(k.startswith("glm.") for k in keys) and len(set(keys.values())) > 1
    sd = torch.load(GLM_DATA / "chinese" / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("glm.") for k in sd) and "glm.transformer.block_position_embeddings.weight" in sd
    # the chinese fixture, its names stripped of `glm.`: the same logits
    plain = tmp_path / "plain"
    shutil.copytree(GLM_DATA / "chinese", plain)
    torch.save({k.removeprefix("glm."): v for k, v in sd.items()}, plain / "pytorch_model.bin")
    ids = torch.tensor([[640, 5, 17, 643, 9, 641]])
    with torch.no_grad():
        torch.testing.assert_close(glmkit.load_model(plain)(ids), glmkit.load_model(GLM_DATA / "chinese")(ids),
                                   atol=0, rtol=0)
    assert a.config.family == "glm" and a.lm_head.weight is a.wte.weight  # tied


def test_table_rows_and_tied_head(models):
    model = models["chinese"]
    c = model.config
    assert model.wpe.weight.shape == (c.max_seq_len + 1, c.hidden_size) == model.wbe.weight.shape
    assert c.mlp == "gelu_erf" and c.qkv_layout == "grouped" and c.residual == "prenorm" and c.norm_eps == 1e-5
    with pytest.raises(ValueError, match=r"position ids must lie in \[0, 40\]"):
        model(torch.tensor([[1, 2]]), torch.tensor([[[0, 41], [0, 0]]]))
    with pytest.raises(ValueError, match=r"position_ids \[B, 2, T\]"):
        model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))


def test_kv_cache_decoding_equals_full_recompute(models):
    model = models["gpt2"]
    ids = torch.tensor([[522, 100, 200, 523, 50, 519, 520]])
    pos = torch.tensor([[[0, 1, 2, 3, 4, 5, 3], [0, 0, 0, 0, 0, 0, 1]]])
    from glmkit.core.blank import BlankInfillingView
    from glmkit.core.generate import generate

    view = BlankInfillingView(model, pos, torch.tensor([6]))
    cached = generate(view, ids, max_new_tokens=6, eos_token_id=[], use_cache=True)
    full = generate(view, ids, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert cached.tolist() == full.tolist()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads(dtype, models):
    kwargs, _, _ = glm_logits_case("chinese", "seq2seq_batch")
    inputs = _glmkit_inputs(kwargs, "seq2seq_batch")
    half = glmkit.load_model(GLM_DATA / "chinese", dtype=dtype)
    assert half.wte.weight.dtype == getattr(torch, dtype)
    with torch.no_grad():
        ref, out = models["chinese"](**inputs), half(**inputs)
    assert ((out - ref).norm() / ref.norm()) < 0.03


def test_save_model_writes_the_hub_layout(tmp_path, models):
    out = glmkit.save_model(models["gpt2"], tmp_path / "saved", tokenizer=glmkit.load_tokenizer(GLM_DATA / "gpt2"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GLMForConditionalGeneration"]
    assert cfg["block_position_encoding"] and cfg["output_predict"] and cfg["max_sequence_length"] == 40
    assert cfg["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_glm.GLMForConditionalGeneration"
    from safetensors.torch import load_file

    keys = set(load_file(out / "model.safetensors"))
    assert "glm.transformer.position_embeddings.weight" in keys and not any("lm_head" in k for k in keys)
    assert {"vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    kwargs, columns, _ = glm_logits_case("gpt2", "fill_prompt")
    with torch.no_grad():
        torch.testing.assert_close(glmkit.load_model(out)(**_glmkit_inputs(kwargs, "fill_prompt"))[..., ::7],
                                   columns, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ config.json
def test_config_reader_tells_the_two_glm_model_types_apart():
    hub = json.loads((GLM_DATA / "chinese" / "config.json").read_text())
    c = GLMConfig.from_hf_config(hub)
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.max_seq_len, c.vocab_size) == \
        ("glm", 2, 32, 4, 40, 650)
    assert c.position_embedding == "learned_2d" and c.rope == "none" and c.tie_word_embeddings
    glm4 = {"model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100,
            "head_dim": 16}
    assert GLMConfig.from_hf_config(glm4).family == "glm4"
    with pytest.raises(ConfigError, match="neither THUDM's original GLM .* nor transformers' GLM-4"):
        GLMConfig.from_hf_config({"model_type": "glm", "hidden_size": 64})
    with pytest.raises(ConfigError, match="output_predict=false"):
        GLMConfig.from_hf_config({**hub, "output_predict": False})
    with pytest.raises(ConfigError, match="block_position_encoding=false"):
        GLMConfig.from_hf_config({**hub, "block_position_encoding": False})
    with pytest.raises(ConfigError, match="num_layers"):
        GLMConfig.from_hf_config({k: v for k, v in hub.items() if k != "num_layers"})


@pytest.mark.parametrize("name,layers,hidden,heads,vocab", [
    ("glm-large-chinese", 24, 1024, 16, 50048), ("glm-2b", 36, 2048, 32, 50304), ("glm-10b", 48, 4096, 64, 50304),
    ("glm-10b-chinese", 48, 4096, 64, 50048)])
def test_presets_of_the_published_sizes(name, layers, hidden, heads, vocab):
    c = GLMConfig.from_name(name)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.vocab_size, c.max_seq_len) == (layers, hidden, heads, vocab,
                                                                                        1024)
    assert c.ffn_hidden_size == 4 * hidden and c.family == "glm" and c.position_embedding == "learned_2d"
    with torch.device("meta"):
        model = GLMForCausalLM(c)
    assert model.wpe.weight.shape[0] == 1025
    if name == "glm-10b":  # the advertised 10B
        assert 9.5e9 < sum(p.numel() for p in model.parameters() if p is not model.lm_head.weight) < 10.5e9


def test_unknown_weight_is_an_error(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(GLM_DATA / "chinese", bad)
    sd = torch.load(bad / "pytorch_model.bin", weights_only=True)
    sd["glm.transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.zeros(4)
    torch.save(sd, bad / "pytorch_model.bin")
    with pytest.raises(Exception, match="unexpected weight"):
        glmkit.load_model(bad)
    assert OriginalGLMConverter().map_name("glm.transformer.layers.3.mlp.dense_4h_to_h.bias") == "h.3.mlp.proj.bias"
    assert OriginalGLMConverter().map_name("word_embeddings.weight") == "wte.weight"
    assert all(v is not None for v in ORIGINAL_GLM.values())  # nothing of the hub's checkpoints is dropped
    assert glm_golden()["transformers"] == "4.26.1"
