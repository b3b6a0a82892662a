"""GLMConfig: presets, serialisation and every published config.json layout."""

from __future__ import annotations

import pytest

from glmkit.core.config import ConfigError, GLMConfig
from glmkit.core.convert import to_hf_config
from glmkit.core.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = GLMConfig.from_name(name)
    assert GLMConfig.from_dict(cfg.to_dict()) == cfg
    back = GLMConfig.from_hf_config(to_hf_config(cfg))
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "ffn_hidden_size", "norm", "residual", "mlp", "rope", "rope_base", "attention", "qkv_bias"):
        assert getattr(back, field) == getattr(cfg, field), field


def test_chatglm6b_shape_is_6_2b_parameters():
    import torch

    from glmkit.core.model import GLM

    with torch.device("meta"):
        model = GLM(GLMConfig.from_name("chatglm-6b"))
    # 6.2B as advertised counts one 130528x4096 embedding; the separate lm_head adds 0.53B
    assert 6.1e9 < model.num_parameters() - model.lm_head.weight.numel() < 6.3e9


def test_published_config_layouts():
    v1 = GLMConfig.from_hf_config({"model_type": "chatglm", "hidden_size": 4096, "num_layers": 28,
                                   "num_attention_heads": 32, "vocab_size": 130528, "inner_hidden_size": 16384,
                                   "position_encoding_2d": True, "pre_seq_len": 128})
    assert (v1.rope, v1.residual, v1.mlp, v1.pre_seq_len, v1.deepnorm_alpha) == ("2d", "deepnorm", "gelu", 128, 56 ** 0.5)
    v2 = GLMConfig.from_hf_config({"model_type": "chatglm", "hidden_size": 4096, "num_layers": 28,
                                   "num_attention_heads": 32, "kv_channels": 128, "ffn_hidden_size": 13696,
                                   "padded_vocab_size": 65024, "multi_query_attention": True,
                                   "multi_query_group_num": 2, "rmsnorm": True, "add_qkv_bias": True})
    assert (v2.num_kv_heads, v2.rotary_dim, v2.family, v2.qkv_bias, v2.proj_bias) == (2, 64, "chatglm2", True, False)
    g4 = GLMConfig.from_hf_config({"model_type": "chatglm", "hidden_size": 4096, "num_layers": 40,
                                   "num_attention_heads": 32, "kv_channels": 128, "ffn_hidden_size": 13696,
                                   "padded_vocab_size": 151552, "multi_query_attention": True,
                                   "multi_query_group_num": 2, "rmsnorm": True, "rope_ratio": 500})
    assert (g4.rope_base, g4.family) == (5e6, "glm4")
    hf = GLMConfig.from_hf_config({"model_type": "glm", "hidden_size": 64, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                   "intermediate_size": 80, "vocab_size": 100, "partial_rotary_factor": 0.5,
                                   "rope_theta": 500.0})
    assert (hf.rotary_dim, hf.rope_base, hf.proj_bias) == (8, 500.0, False)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="unsupported model_type"):
        GLMConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ConfigError, match="lacks required fields"):
        GLMConfig.from_hf_config({"model_type": "chatglm", "position_encoding_2d": True})
    with pytest.raises(ConfigError, match="unknown preset"):
        GLMConfig.from_name("gpt-5")
    with pytest.raises(ConfigError, match="not a multiple"):
        GLMConfig(num_heads=32, num_kv_heads=3)
    with pytest.raises(ConfigError, match="rope_type"):
        GLMConfig.from_hf_config({"model_type": "glm", "hidden_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "intermediate_size": 80, "vocab_size": 100,
                                  "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
