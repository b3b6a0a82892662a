"""core.paged_cache: a model running on pool blocks (chunked prefill, then batched decode of rows of different
lengths, in one padded batch or in groups of similar length) gives the logits of a plain full forward pass, for every
family: ChatGLM-6B's 2D positions and prefix-LM mask, grouped KV heads, the original GLM's learned tables, GLM-130B,
and a P-tuning prefix."""

from __future__ import annotations

import pytest
import torch

from glmkit.adapters.ptuning import attach_prefix
from glmkit.core import paged_cache
from glmkit.core.config import GLMConfig
from glmkit.core.model import GLM
from glmkit.core.paged_cache import BlockPool, bytes_per_block, length_groups

TINY = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 48,
        "max_seq_len": 64, "torch_dtype": "float32"}


def tiny(preset: str, ptuning: bool = False) -> GLM:
    extra = {"num_kv_heads": 2, "head_dim": 8} if preset in ("chatglm2-6b", "glm-4-9b-chat") else {}
    if preset in ("chatglm-6b", "glm-130b"):
        extra = {"bos_token_id": 60, "mask_token_id": 61, "gmask_token_id": 62, "eos_token_id": 63,
                 "pad_token_id": 3}
    if preset == "glm-130b":
        extra.update(smask_token_id=59, eos_token_id=[63])
    config = GLMConfig.from_name(preset, **TINY, **extra)
    model = GLM(config)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    if ptuning:
        attach_prefix(model, 3)
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval()


def prompts(model: GLM) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(5, 58, (n,), generator=g).tolist() for n in (11, 5, 17)]
    if model.config.attention == "prefix_lm":  # ... [gMASK] <sop>: a bidirectional context before <sop>
        rows = [r + [62, 60] for r in rows]
    return rows


@pytest.mark.parametrize("preset,ptuning", [("chatglm-6b", False), ("chatglm2-6b", False), ("glm-4-9b-chat", False),
                                            ("glm-10b", False), ("glm-130b", False), ("chatglm2-6b", True),
                                            ("chatglm-6b", True)])
@pytest.mark.parametrize("grouped", [False, True])
def test_paged_prefill_and_decode_match_full_forward(preset, ptuning, grouped, monkeypatch):
    if grouped:  # every row its own group: no fixed cost per group
        monkeypatch.setattr(paged_cache, "GROUP_COST_BYTES", 0)
    model = tiny(preset, ptuning)
    block = 4
    pool = BlockPool(model.config, num_blocks=40, block_size=block, dtype=torch.float32)
    rows = prompts(model)
    with torch.no_grad():  # the reference: each prompt's last logits from a full forward pass without cache
        expected = [model(torch.tensor([row]))[0, -1] for row in rows]
    pool.attach(model)
    tables, positions = [], []
    try:
        with torch.no_grad():
            for row in rows:  # each prompt prefilled in chunks of 4 (the 2D context in one piece), one row at a time
                ids = torch.tensor([row])
                pos = model.default_position_ids(ids)  # (1, T) or (1, 2, T)
                ctx = row.index(60) if model.config.attention == "prefix_lm" else 0
                blocks = pool.allocate(pool.blocks_for(len(row)))
                tables.append(blocks)
                positions.append(pos)
                start = 0
                while start < len(row) - 1:
                    end = max(min(start + 4, len(row) - 1), ctx)
                    q, k = torch.arange(start, end)[:, None], torch.arange(end)[None]
                    pool.bind(pool.slots(blocks, start, end)[None], pool.slots(blocks, 0, end)[None])
                    model(ids[:, start:end], pos[..., start:end], ((k <= q) | (k < ctx))[None, None],
                          input_pos=torch.arange(start, end))
                    start = end
            # every row's last prompt token in one decode batch: rows of lengths 11/5/17 (+2), padded read slots
            S = max(len(r) for r in rows)
            read = torch.zeros(len(rows), S, dtype=torch.long)
            for b, (row, blocks) in enumerate(zip(rows, tables)):
                read[b, : len(row)] = pool.slots(blocks, 0, len(row))
            write = torch.stack([pool.slots(blocks, len(r) - 1, len(r)) for r, blocks in zip(rows, tables)])
            lengths = torch.tensor([len(r) for r in rows])
            mask = (torch.arange(S)[None] < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
            ids = torch.tensor([[r[-1]] for r in rows])
            pos = torch.stack([p[..., -1:] for p in positions]).squeeze(1)  # (B, 1) or (B, 2, 1)
            pool.bind(write, read, lengths.tolist() if grouped else None)
            assert (pool.groups is not None and len(pool.groups) == 3) == grouped
            logits = model(ids, pos, mask, input_pos=torch.arange(S - 1, S))
        for b in range(len(rows)):
            torch.testing.assert_close(logits[b, -1], expected[b], rtol=1e-4, atol=1e-4)
    finally:
        BlockPool.detach(model)


def test_length_groups_split_rows_where_padding_outweighs_a_group():
    assert length_groups([10, 500, 12, 480, 11], group_cost=100) == [[1, 3], [2, 4, 0]]  # longest first
    assert length_groups([10, 500, 12, 480, 11], group_cost=10_000) == [[1, 3, 2, 4, 0]]
    assert length_groups([7, 7, 7], group_cost=0) == [[0, 1, 2]]  # nothing to save: one group
    assert length_groups([100, 90, 80, 70, 60, 50], group_cost=0, max_groups=2) == [[0, 1, 2], [3, 4, 5]]
    # many rows: groups start only at a few evenly spaced places, still covering every row once
    lengths = [int(v) for v in torch.randint(10, 2000, (40,), generator=torch.Generator().manual_seed(0))]
    groups = length_groups(lengths, group_cost=50, max_cuts=8)
    assert 1 < len(groups) <= 4 and sorted(sum(groups, [])) == list(range(40))
    assert all(len(group) % 5 == 0 for group in groups)  # cuts every 40 / 8 = 5 rows
    assert all(min(lengths[r] for r in g) >= max(lengths[r] for r in h) for g, h in zip(groups, groups[1:]))


def test_pool_hands_out_and_takes_back_blocks():
    config = GLMConfig.from_name("chatglm2-6b", **TINY, num_kv_heads=2, head_dim=8)
    pool = BlockPool(config, num_blocks=5, block_size=4, dtype=torch.float32)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 2 and pool.allocate(3) is None
    assert pool.slots(a, 3, 6).tolist() == [3, 4, 5] and pool.blocks_for(9) == 3
    scattered = [4, 0, 3]
    assert pool.block_slots(scattered).tolist() == pool.slots(scattered, 0, 12).tolist() == [16, 17, 18, 19, 0, 1, 2,
                                                                                              3, 12, 13, 14, 15]
    pool.free(a)
    assert pool.num_free == 5 and a == []
    assert bytes_per_block(config, 4, torch.float32) == 2 * 2 * 4 * 2 * 8 * 4
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(config, num_blocks=0, dtype=torch.float32)
