"""Independent test-only re-implementations of ChatGLM-6B and ChatGLM2-6B forward passes, written from
shared/docs/glm-family.md (§3.2-3.4, §4) in the originals' own shape conventions ([seq, batch, hidden], per-head
qkv split, (layer+1)-scaled scores with a -10000 masked fill, fp16 rotary tables, seq-first caches).

They read THUDM-named state dicts directly, so a test can check glmkit's conversion tables and model together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _rms(x, w, eps):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (w * (x * torch.rsqrt(var + eps))).to(x.dtype)


def _chatglm_rotary_table(dim, seq_len, fp16_table=True):
    inv = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
    if fp16_table:
        t = torch.arange(seq_len, dtype=torch.half)
        freqs = torch.einsum("i,j->ij", t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]
    t = torch.arange(seq_len, dtype=torch.float)
    freqs = torch.einsum("i,j->ij", t, inv.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=x1.ndim - 1)


def _apply_index(q, k, cos, sin, pos):  # q, k [s, b, h, d]; pos [s, b]
    cos = F.embedding(pos, cos.squeeze(1)).unsqueeze(2)
    sin = F.embedding(pos, sin.squeeze(1)).unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def chatglm_v1_logits(sd, hf, input_ids, fp16_table=True, prefix_kv=None):
    """ChatGLM-6B forward without cache. hf = THUDM config.json dict. prefix_kv: per layer (k, v) [P, b, h, d]."""
    L, H, hidden = hf["num_layers"], hf["num_attention_heads"], hf["hidden_size"]
    d = hidden // H
    eps = hf.get("layernorm_epsilon", 1e-5)
    bos, gmask, mask_id = hf["bos_token_id"], hf["gmask_token_id"], hf["mask_token_id"]
    b, s = input_ids.shape
    # masks (True = blocked) and 2D positions per sequence
    masks, positions = [], []
    for seq in input_ids.tolist():
        ctx = seq.index(bos)
        m = torch.ones(s, s).tril()
        m[:, :ctx] = 1
        masks.append(m < 0.5)
        mask_tok = gmask if gmask in seq else mask_id
        mpos = seq.index(mask_tok)
        pos = torch.arange(s)
        pos[ctx:] = mpos
        block = torch.cat((torch.zeros(ctx, dtype=torch.long), torch.arange(s - ctx) + 1))
        positions.append(torch.stack((pos, block)))
    attn_mask = torch.stack(masks)[:, None]  # [b, 1, s, s]
    position_ids = torch.stack(positions)  # [b, 2, s]
    if prefix_kv is not None:
        P = prefix_kv[0][0].shape[0]
        attn_mask = torch.cat((torch.zeros(b, 1, s, P, dtype=torch.bool), attn_mask), dim=3)
    x = F.embedding(input_ids, sd["transformer.word_embeddings.weight"]).transpose(0, 1)  # [s, b, h]
    # modeling_chatglm.py: GLMBlock(..., num_layers=28) is a default argument that ChatGLMModel.get_layer never
    # passes, so alpha = (2 * self.num_layers) ** 0.5 is sqrt(56) whatever config.num_layers says.
    alpha = (2 * 28) ** 0.5
    cos, sin = _chatglm_rotary_table(d // 2, int(position_ids.max()) + 1, fp16_table)
    for i in range(L):
        p = f"transformer.layers.{i}."
        a = _ln(x, sd, p + "input_layernorm.", eps)
        qkv = F.linear(a, sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"])
        qkv = qkv.view(s, b, H, 3 * d)
        q, k, v = torch.split(qkv, d, dim=-1)
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        pos, blk = position_ids[:, 0, :].transpose(0, 1), position_ids[:, 1, :].transpose(0, 1)
        q1, k1 = _apply_index(q1, k1, cos, sin, pos)
        q2, k2 = _apply_index(q2, k2, cos, sin, blk)
        q, k = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
        if prefix_kv is not None:
            k = torch.cat((prefix_kv[i][0], k), dim=0)
            v = torch.cat((prefix_kv[i][1], v), dim=0)
        coeff = float(i + 1)
        q = q / (math.sqrt(d) * coeff)
        sk = k.shape[0]
        scores = torch.bmm(q.reshape(s, b * H, d).transpose(0, 1), k.reshape(sk, b * H, d).transpose(0, 1).transpose(1, 2))
        scores = scores.view(b, H, s, sk)
        scores = scores.masked_fill(attn_mask, -10000.0).float() * coeff
        probs = F.softmax(scores, dim=-1).view(b * H, s, sk)
        ctx_layer = torch.bmm(probs, v.reshape(sk, b * H, d).transpose(0, 1)).view(b, H, s, d)
        ctx_layer = ctx_layer.permute(2, 0, 1, 3).reshape(s, b, hidden)
        attn_out = F.linear(ctx_layer, sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"])
        hdn = a * alpha + attn_out
        m = _ln(hdn, sd, p + "post_attention_layernorm.", eps)
        y = F.linear(m, sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"])
        y = 0.5 * y * (1.0 + torch.tanh(0.7978845608028654 * y * (1.0 + 0.044715 * y * y)))
        y = F.linear(y, sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"])
        x = m * alpha + y
    x = _ln(x, sd, "transformer.final_layernorm.", eps)
    return F.linear(x, sd["lm_head.weight"]).transpose(0, 1)


def chatglm_v2_logits(sd, hf, input_ids, prefix_kv=None):
    """ChatGLM2/3 / GLM-4 (THUDM layout) forward without cache, causal; prefix_kv per layer (k, v) [P, b, g, d]."""
    L, H = hf["num_layers"], hf["num_attention_heads"]
    d = hf.get("kv_channels") or hf["hidden_size"] // H
    g = hf["multi_query_group_num"] if hf.get("multi_query_attention") else H
    eps = hf.get("layernorm_epsilon", 1e-5)
    base = 10000.0 * hf.get("rope_ratio", 1.0)
    b, s = input_ids.shape
    n_elem = d // 2
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx = torch.outer(torch.arange(s, dtype=torch.float), theta)
    cache = torch.stack([idx.cos(), idx.sin()], dim=-1)  # [s, n/2, 2]

    def rope(x):  # [s, b, h, d]
        rot = cache.shape[-2] * 2
        xr, xp = x[..., :rot], x[..., rot:]
        xs = xr.reshape(s, -1, x.shape[2], rot // 2, 2)
        c = cache.view(s, 1, 1, rot // 2, 2)
        out = torch.stack([xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
                           xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1).flatten(3)
        return torch.cat((out, xp), dim=-1)

    x = F.embedding(input_ids, sd["transformer.embedding.word_embeddings.weight"]).transpose(0, 1)
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        a = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(a, sd[p + "self_attention.query_key_value.weight"], sd.get(p + "self_attention.query_key_value.bias"))
        q, k, v = qkv.split([H * d, g * d, g * d], dim=-1)
        q, k, v = q.view(s, b, H, d), k.view(s, b, g, d), v.view(s, b, g, d)
        q, k = rope(q), rope(k)
        if prefix_kv is not None:
            k = torch.cat((prefix_kv[i][0], k), dim=0)
            v = torch.cat((prefix_kv[i][1], v), dim=0)
        sk = k.shape[0]
        k = k.unsqueeze(-2).expand(-1, -1, -1, H // g, -1).reshape(sk, b, H, d)
        v = v.unsqueeze(-2).expand(-1, -1, -1, H // g, -1).reshape(sk, b, H, d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        allowed = torch.ones(s, s, dtype=torch.bool).tril()
        if sk > s:
            allowed = torch.cat((torch.ones(s, sk - s, dtype=torch.bool), allowed), dim=1)
        y = F.scaled_dot_product_attention(q, k, v, allowed)
        y = y.permute(2, 0, 1, 3).reshape(s, b, H * d)
        y = F.linear(y, sd[p + "self_attention.dense.weight"], sd.get(p + "self_attention.dense.bias"))
        x = x + y
        m = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        h = F.linear(m, sd[p + "mlp.dense_h_to_4h.weight"], sd.get(p + "mlp.dense_h_to_4h.bias"))
        h0, h1 = h.chunk(2, dim=-1)
        h = F.silu(h0) * h1
        x = x + F.linear(h, sd[p + "mlp.dense_4h_to_h.weight"], sd.get(p + "mlp.dense_4h_to_h.bias"))
    x = _rms(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return F.linear(x, sd["transformer.output_layer.weight"]).transpose(0, 1)
