"""GLM-4.5's multi-token-prediction layers kept (load_model(mtp=True)) and used for self-speculative decoding: the
greedy tokens equal plain decoding's. A tiny random glm4_moe checkpoint written by transformers, with an MTP layer
added in the hub's names (transformers itself does not build MTP layers; vLLM's glm4_moe_mtp.py reads these)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit.core.speculative import generate_mtp
from tests.loading.test_new_generations import IDS, write_reference

pytest.importorskip("transformers")


def with_mtp_layer(tmp_path, seed=0):
    """The glm4_moe reference (3 layers, num_nextn_predict_layers=1) plus random `model.layers.3.*`: a MoE decoder
    layer shaped like layer 2, enorm/hnorm/eh_proj, shared_head.{norm,head} and its embedding copy."""
    _, folder = write_reference(tmp_path, "glm4_moe", seed=seed)
    sd = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    hidden, vocab = sd["model.embed_tokens.weight"].shape[1], sd["model.embed_tokens.weight"].shape[0]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    for name in [n for n in sd if n.startswith("model.layers.2.")]:
        sd[name.replace("model.layers.2.", "model.layers.3.")] = rand(*sd[name].shape).to(sd[name].dtype)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        sd[f"model.layers.3.{norm}.weight"] = 1 + rand(hidden)
    sd["model.layers.3.eh_proj.weight"] = rand(hidden, 2 * hidden)
    sd["model.layers.3.shared_head.head.weight"] = rand(vocab, hidden)
    sd["model.layers.3.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, sd


def test_mtp_layer_kept_and_computes_vllm_formula(tmp_path):
    folder, sd = with_mtp_layer(tmp_path)
    plain = glmkit.load_model(folder)
    assert plain.mtp is None and plain.config.extra["mtp_tensors_skipped"] > 0
    model = glmkit.load_model(folder, mtp=True)
    layer = model.mtp[0]
    assert torch.equal(layer.eh_proj.weight, sd["model.layers.3.eh_proj.weight"])
    assert torch.equal(layer.head.weight, sd["model.layers.3.shared_head.head.weight"])
    assert torch.equal(layer.block.mlp.experts[5].proj.weight, sd["model.layers.3.mlp.experts.5.down_proj.weight"])
    assert layer.block.mlp.router.weight.dtype == torch.float32
    # the main model is unchanged by keeping the MTP layers
    with torch.no_grad():
        assert torch.equal(model(IDS), plain(IDS))
        # the MTP layer by hand: x = eh_proj([enorm(embed(t+1)) | hnorm(h_t)]), embed zero at position 0
        _, h = model(IDS, return_hidden=True)
        nxt = IDS[:, 1:]
        pos = torch.arange(IDS.shape[1] - 1)[None].expand(2, -1)
        logits, _ = model.mtp_forward(0, nxt, h[:, :-1], pos, None)
        e = model.wte(nxt)
        e[:, 0] = 0
        x = layer.eh_proj(torch.cat((layer.enorm(e), layer.hnorm(h[:, :-1])), dim=-1))
        causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
        x = layer.block(x, model.rotary.cos_sin(pos), causal)
        torch.testing.assert_close(logits, layer.head(layer.head_norm(x)).float())


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_mtp_speculative_greedy_equals_plain(tmp_path, draft_tokens):
    folder, _ = with_mtp_layer(tmp_path)
    model = glmkit.load_model(folder, mtp=True)
    for row in IDS:
        expected = model.generate(row[None], max_new_tokens=20, eos_token_id=[])
        got, stats = generate_mtp(model, row[None], max_new_tokens=20, eos_token_id=[], draft_tokens=draft_tokens)
        assert torch.equal(got, expected)
        assert stats.steps >= 1 and stats.drafted == stats.steps * draft_tokens
        assert stats.steps + stats.accepted == 19  # every token after the prefill's came from a verify step


def test_mtp_speculative_stops_at_eos_and_quantized(tmp_path):
    folder, _ = with_mtp_layer(tmp_path)
    model = glmkit.load_model(folder, mtp=True, quantize="int8")  # the MTP layer stays float
    assert type(model.mtp[0].eh_proj).__name__ == "Linear"
    plain = model.generate(IDS[:1], max_new_tokens=12, eos_token_id=[])
    eos = int(plain[0, 5])
    got, _ = generate_mtp(model, IDS[:1], max_new_tokens=12, eos_token_id=[eos])
    assert torch.equal(got, model.generate(IDS[:1], max_new_tokens=12, eos_token_id=[eos]))
    assert int(got[0, -1]) == eos


def test_mtp_needs_mtp_layers(tmp_path):
    _, folder = write_reference(tmp_path, "glm4")
    with pytest.raises(ValueError, match="no multi-token-prediction layers"):
        glmkit.load_model(folder, mtp=True)
    with pytest.raises(ValueError, match="mtp=True"):
        generate_mtp(glmkit.load_model(folder), IDS[:1])
