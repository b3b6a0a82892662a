"""Tiny GLM and GLM-130B checkpoints and the original code's outputs on them (tests/data/glm, tests/data/glm130b)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers.common import REPO


# The original GLM: tiny checkpoints its hub code wrote, and that code's outputs (tests/data/glm/make_golden.py).
GLM_DATA = REPO / "tests" / "data" / "glm"


def glm_golden() -> dict:
    """tests/data/glm/golden.json (read once)."""
    if not hasattr(glm_golden, "_cache"):
        glm_golden._cache = json.loads((GLM_DATA / "golden.json").read_text(encoding="utf-8"))
    return glm_golden._cache


def glm_logits_case(fixture: str, case: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the model inputs of a golden case, the original's logits at every 7th vocabulary column, its logsumexp)."""
    if not hasattr(glm_logits_case, "_cache"):
        glm_logits_case._cache = torch.load(GLM_DATA / "golden_logits.pt", weights_only=True)
    kwargs = {k: torch.tensor(v) for k, v in glm_golden()["fixtures"][fixture]["logits_cases"][case].items()}
    logits = glm_logits_case._cache
    return kwargs, logits[f"{fixture}/{case}/columns"], logits[f"{fixture}/{case}/logsumexp"]


# GLM-130B: tiny SwissArmyTransformer (SAT 0.2.12) checkpoints in the layout GLM-130B publishes, and the original
# code's outputs on them (tests/data/glm130b/make_golden.py, which imports the helpers below, so that the golden
# script and the tests build byte-identical checkpoints).
GLM130B_DATA = REPO / "tests" / "data" / "glm130b"
# model_config.json as SAT writes it (training/model_io.py); the vocabulary is GLM-130B's own, so that the real
# command ids ([MASK] 150000 ... eop 150005) and eos 20002 exist in the tiny model.
GLM130B_TINY = {"model_class": "GLM130B", "tokenizer_type": "icetk-glm-130B", "num_layers": 2, "hidden_size": 16,
                "num_attention_heads": 2, "vocab_size": 150528, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                "layernorm_order": "post", "inner_hidden_size": 24, "model_parallel_size": 1,
                "max_sequence_length": 64}
# GLM-130B's SEQUENTIAL_LAYERS / GLU_LAYERS / QUANTIZED_LAYERS of tools/convert_tp.py, restated (names after the
# `transformer.layers.N.` or `transformer.` prefix).
SAT_REPLICATED = {"input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                  "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
                  "attention.rotary_emb.inv_freq", "final_layernorm.weight", "final_layernorm.bias"}
SAT_GLU = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
SAT_QUANTIZED = {"attention.dense.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
                 "mlp.dense_4h_to_h.weight"}
SAT_COLUMN_DIM = {"attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1}


def glm130b_sat_state_dict(cfg: dict = GLM130B_TINY, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A random GLM-130B state dict with SAT's names and shapes at tensor-parallel degree 1, in fp16 as GLM-130B
    ships (norm weights near 1). Key order is SAT's state_dict() order."""
    g = torch.Generator().manual_seed(seed)
    h, L, V, F_ = cfg["hidden_size"], cfg["num_layers"], cfg["vocab_size"], cfg["inner_hidden_size"]
    d = h // cfg["num_attention_heads"]

    def r(*shape, base=0.0):
        return (base + torch.randn(*shape, generator=g) * std).half()

    sd = {"mixins.rotary-embedding.rotary_emb.inv_freq": (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).half(),
          "transformer.word_embeddings.weight": r(V, h)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = r(h, base=1.0), r(h)
        sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"] = r(3 * h, h), r(3 * h)
        sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"] = r(h, h), r(h)
        sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"] = r(h, base=1.0), r(h)
        sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"] = r(h, F_), r(h)
        sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"] = r(2 * F_, h), r(2 * F_)
    sd["transformer.final_layernorm.weight"], sd["transformer.final_layernorm.bias"] = r(h, base=1.0), r(h)
    return sd


def _sat_short_name(key: str) -> str:
    return ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1:])


def sat_reshard(shards: list[dict[str, torch.Tensor]], target_tp: int, bits: int | None = None
                ) -> list[dict[str, torch.Tensor]]:
    """What GLM-130B's tools/convert_tp.py writes for `target_tp` from these TP shards (restated from its code):
    replicated tensors from the first shard, the others concatenated / chunked on dim 0 (dim 1 for the two
    row-parallel weights), dense_h_to_4h by halves (GLU), and with `bits` the four linears quantized per target
    shard: scale = (max|w_row| / (2^(bits-1) - 1)).half(), q = round(w / scale) in the weights' dtype, INT4 packed two
    per byte with the even column in the high nibble."""
    src = len(shards)
    out = []
    for t in range(target_tp):
        if target_tp <= src:
            group = shards[t * (src // target_tp):(t + 1) * (src // target_tp)]
        else:
            group = [shards[t // (target_tp // src)]]
        new = {}
        for key in group[0]:
            name = _sat_short_name(key)
            if name in SAT_REPLICATED:
                new[key] = group[0][key]
                continue
            dim = SAT_COLUMN_DIM.get(name, 0)
            if target_tp <= src:
                if name in SAT_GLU and len(group) > 1:
                    halves = [s[key].chunk(2, dim=dim) for s in group]
                    w = torch.cat([a for a, _ in halves] + [b for _, b in halves], dim=dim)
                elif name in SAT_GLU:
                    w = group[0][key]
                else:
                    w = torch.cat([s[key] for s in group], dim=dim)
            else:
                n = target_tp // src
                if name in SAT_GLU:
                    parts = group[0][key].chunk(2 * n, dim=dim)
                    w = torch.cat([parts[t % n], parts[n + t % n]], dim=dim)
                else:
                    w = group[0][key].chunk(n, dim=dim)[t % n].clone()
            if bits is not None and name in SAT_QUANTIZED:
                scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
                q = torch.round(w / scale[:, None]).to(torch.int8)
                if bits == 4:
                    q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
                new[key], new[key + "_scale"] = q, scale
            else:
                new[key] = w
        out.append(new)
    return out


def write_sat_checkpoint(folder: Path, shards: list[dict[str, torch.Tensor]], iteration: str = "1000",
                         model_config: dict | None = GLM130B_TINY) -> Path:
    """A SAT checkpoint folder: `latest` naming the iteration, `<iteration>/mp_rank_XX_model_states.pt` holding
    {"module": state dict} (as convert_tp.py saves), and model_config.json when given."""
    (folder / iteration).mkdir(parents=True, exist_ok=True)
    (folder / "latest").write_text(iteration)
    for rank, sd in enumerate(shards):
        torch.save({"module": sd}, folder / iteration / f"mp_rank_{rank:02d}_model_states.pt")
    if model_config is not None:
        (folder / "model_config.json").write_text(json.dumps(dict(model_config, model_parallel_size=len(shards)),
                                                             indent=4))
    return folder
