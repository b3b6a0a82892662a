"""Tiny THUDM-layout checkpoints written by hand (key names spelled out, not taken from glmkit), and aten's CPU
int4pack layout written out."""

from __future__ import annotations

import json
from pathlib import Path

import torch


# ChatGLM-6B tiny: vocab ids laid out like the slim checkpoint (mask/gmask/bos/eos near the top).
CHATGLM_V1_HF = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 160, "hidden_size": 64,
    "num_layers": 3, "num_attention_heads": 4, "inner_hidden_size": 96, "max_sequence_length": 128,
    "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": 154, "eos_token_id": 155,
    "mask_token_id": 150, "gmask_token_id": 151, "pad_token_id": 3, "torch_dtype": "float32",
}

CHATGLM_V2_HF = {
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "padded_vocab_size": 120, "hidden_size": 64,
    "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 80, "seq_length": 256,
    "layernorm_epsilon": 1e-5, "rmsnorm": True, "multi_query_attention": True, "multi_query_group_num": 2,
    "add_bias_linear": False, "add_qkv_bias": True, "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
}


def thudm_v1_state_dict(hf: dict, seed: int = 0, std: float = 0.2, pre_seq_len: int | None = None,
                        prefix_projection: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, L, V, ffn = hf["hidden_size"], hf["num_layers"], hf["vocab_size"], hf["inner_hidden_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.word_embeddings.weight": r(V, h)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(h)
        sd[p + "input_layernorm.bias"] = r(h)
        sd[p + "attention.query_key_value.weight"] = r(3 * h, h)
        sd[p + "attention.query_key_value.bias"] = r(3 * h)
        sd[p + "attention.dense.weight"] = r(h, h)
        sd[p + "attention.dense.bias"] = r(h)
        sd[p + "attention.rotary_emb.inv_freq"] = (1.0 / (10000 ** (torch.arange(0, h // hf["num_attention_heads"] // 2, 2).float() / (h // hf["num_attention_heads"] // 2)))).half()
        sd[p + "post_attention_layernorm.weight"] = 1 + r(h)
        sd[p + "post_attention_layernorm.bias"] = r(h)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(ffn, h)
        sd[p + "mlp.dense_h_to_4h.bias"] = r(ffn)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(h, ffn)
        sd[p + "mlp.dense_4h_to_h.bias"] = r(h)
    sd["transformer.final_layernorm.weight"] = 1 + r(h)
    sd["transformer.final_layernorm.bias"] = r(h)
    sd["lm_head.weight"] = r(V, h)
    if pre_seq_len:
        sd.update(prefix_weights(pre_seq_len, 2 * L * h, h, prefix_projection, g, embed_dim=h))
    return sd


def prefix_weights(P, kv_size, hidden, projection, g, embed_dim):
    if not projection:
        return {"transformer.prefix_encoder.embedding.weight": torch.randn(P, kv_size, generator=g) * 0.5}
    return {
        "transformer.prefix_encoder.embedding.weight": torch.randn(P, embed_dim, generator=g),
        "transformer.prefix_encoder.trans.0.weight": torch.randn(hidden, embed_dim, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.0.bias": torch.randn(hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.2.weight": torch.randn(kv_size, hidden, generator=g) * 0.2,
        "transformer.prefix_encoder.trans.2.bias": torch.randn(kv_size, generator=g) * 0.2,
    }


def thudm_v2_state_dict(hf: dict, seed: int = 0, std: float = 0.2, pre_seq_len: int | None = None,
                        prefix_projection: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, L, V, ffn = hf["hidden_size"], hf["num_layers"], hf["padded_vocab_size"], hf["ffn_hidden_size"]
    H, d, kv = hf["num_attention_heads"], hf["kv_channels"], hf["multi_query_group_num"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.embedding.word_embeddings.weight": r(V, h),
          "transformer.rotary_pos_emb.inv_freq": torch.ones(d // 4)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(h)
        sd[p + "self_attention.query_key_value.weight"] = r((H + 2 * kv) * d, h)
        sd[p + "self_attention.query_key_value.bias"] = r((H + 2 * kv) * d)
        sd[p + "self_attention.dense.weight"] = r(h, H * d)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(h)
        sd[p + "mlp.dense_h_to_4h.weight"] = r(2 * ffn, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = r(h, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = 1 + r(h)
    sd["transformer.output_layer.weight"] = r(V, h)
    if pre_seq_len:
        kv_size = 2 * L * kv * d
        sd.update(prefix_weights(pre_seq_len, kv_size, h, prefix_projection, g, embed_dim=kv_size))
    return sd


def write_folder(path: Path, hf: dict, sd: dict, fmt: str = "bin", shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    keys = list(sd)
    chunks = [keys[i::shards] for i in range(shards)]
    if fmt == "bin":
        if shards == 1:
            torch.save(sd, path / "pytorch_model.bin")
        else:
            wm = {}
            for j, ks in enumerate(chunks, 1):
                name = f"pytorch_model-{j:05d}-of-{shards:05d}.bin"
                torch.save({k: sd[k] for k in ks}, path / name)
                wm.update({k: name for k in ks})
            (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        from safetensors.torch import save_file

        if shards == 1:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
        else:
            wm = {}
            for j, ks in enumerate(chunks, 1):
                name = f"model-{j:05d}-of-{shards:05d}.safetensors"
                save_file({k: sd[k].contiguous() for k in ks}, str(path / name))
                wm.update({k: name for k in ks})
            (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def int4pack_with_block(q: torch.Tensor, block: int) -> torch.Tensor:
    """aten's CPU int4pack layout for a given block size, written out: [N/B, K, B/2] bytes, row r of a block in the
    low nibble and row r + B/2 in the high one, values u = q + 8, N padded to whole blocks with q = 0. (64 rows
    per block on AVX-512, 32 on AVX2: a file saved on one machine and loaded on the other.)"""
    n, k = q.shape
    n_pad = -(-n // block) * block
    u = torch.full((n_pad, k), 8, dtype=torch.uint8)
    u[:n] = (q.to(torch.int16) + 8).to(torch.uint8)
    v = u.view(n_pad // block, block, k).permute(0, 2, 1)  # [NB, K, B]
    return (v[..., : block // 2] | (v[..., block // 2:] << 4)).contiguous().view(n_pad, k // 2)
