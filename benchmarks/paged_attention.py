"""Decode attention on CPU: the paged KV cache (core.paged_cache) against the contiguous one (core.model.KVCache).

    python benchmarks/paged_attention.py                 # ChatGLM-6B's attention shape (32 heads x 128), fp32
    python benchmarks/paged_attention.py --heads 32 --kv-heads 2 --dtype bfloat16   # ChatGLM2/3, GLM-4 (GQA)

One layer's decode step (one new token per row): writing its key/value into the cache and attending over every
cached key (SDPA, as core.model.Attention runs it), for batch sizes x cached lengths; rows in the paged batch have
the given length each, their blocks scattered through the pool. Prints ms per step and the ratio paged/contiguous.

Then rows of mixed lengths (--mixed, log-uniform over the given range, as a serving batch holds them): the
contiguous cache and the paged one padded to the longest row, against the paged cache attending in length groups
(PagedLayerCache.attend, what the continuous engine runs).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from glmkit.core import paged_cache

from glmkit.core.config import GLMConfig
from glmkit.core.model import KVCache
from glmkit.core.paged_cache import BlockPool, PagedLayerCache


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def measure(config: GLMConfig, B: int, S: int, block_size: int, dtype: torch.dtype, repeats: int):
    """(contiguous ms, paged ms) of one decode step of one layer: B rows with S cached tokens each."""
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k_new, v_new = torch.randn(B, K, 1, D, dtype=dtype), torch.randn(B, K, 1, D, dtype=dtype)
    pos = torch.tensor([S])
    cache = KVCache(B, S + 1, K, D, dtype, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    blocks_per_row = -(-(S + 1) // block_size)
    pool = BlockPool(config, B * blocks_per_row + 7, block_size, dtype=dtype)
    order = torch.randperm(pool.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables = [order[b * blocks_per_row:(b + 1) * blocks_per_row] for b in range(B)]  # scattered blocks
    pool.k[0].normal_()
    pool.v[0].normal_()
    pool.bind(torch.stack([pool.slots(t, S, S + 1) for t in tables]),  # (B, 1) written
              torch.stack([pool.slots(t, 0, S + 1) for t in tables]))  # (B, S + 1) read
    paged_cache = PagedLayerCache(pool, 0)

    def step(layer_cache):  # as core.model.Attention runs decode attention on CPU
        k, v = layer_cache.update(pos, k_new, v_new)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=K != H)

    assert step(cache).shape == step(paged_cache).shape
    return best_ms(lambda: step(cache), repeats), best_ms(lambda: step(paged_cache), repeats)


def measure_mixed(config: GLMConfig, lengths: list[int], block_size: int, dtype: torch.dtype, repeats: int):
    """(contiguous ms, paged padded ms, paged grouped ms, groups) of one decode step of one layer over rows of
    the given cached lengths."""
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    B, S = len(lengths), max(lengths)
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k_new, v_new = torch.randn(B, K, 1, D, dtype=dtype), torch.randn(B, K, 1, D, dtype=dtype)
    mask = (torch.arange(S + 1)[None] < torch.tensor(lengths)[:, None] + 1)[:, None, None]  # (B, 1, 1, S + 1)
    cache = KVCache(B, S + 1, K, D, dtype, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    pos = torch.tensor([S])
    need = [-(-(n + 1) // block_size) for n in lengths]
    pool = BlockPool(config, sum(need) + 7, block_size, dtype=dtype)
    order = torch.randperm(pool.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n])
        at += n
    pool.k[0].normal_()
    pool.v[0].normal_()
    write = torch.stack([pool.slots(t, n, n + 1) for t, n in zip(tables, lengths)])
    read = torch.nn.utils.rnn.pad_sequence([pool.slots(t, 0, n + 1) for t, n in zip(tables, lengths)],
                                           batch_first=True)
    layer = PagedLayerCache(pool, 0)

    def sdpa(rows, q_rows, k, v):
        m = mask if rows is None else mask[rows]
        return F.scaled_dot_product_attention(q_rows.float(), k.float(), v.float(), attn_mask=m[..., :k.shape[2]],
                                              enable_gqa=K != H)

    def contiguous():
        k, v = cache.update(pos, k_new, v_new)
        return sdpa(None, q, k, v)

    pool.bind(write, read)
    padded = best_ms(lambda: layer.attend(pos, q, k_new, v_new, sdpa), repeats)
    reference = layer.attend(pos, q, k_new, v_new, sdpa)
    pool.bind(write, read, [n + 1 for n in lengths])
    grouped = best_ms(lambda: layer.attend(pos, q, k_new, v_new, sdpa), repeats)
    torch.testing.assert_close(layer.attend(pos, q, k_new, v_new, sdpa), reference, rtol=1e-4, atol=1e-4)
    return best_ms(contiguous, repeats), padded, grouped, len(pool.groups or [None])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="grouped KV heads (default: = heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--mixed", default="32,2048", help="MIN,MAX: rows of log-uniform lengths in this range "
                                                           "for the mixed-length table ('' to skip)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    H, D = args.heads, args.head_dim
    K = args.kv_heads or H
    dtype = getattr(torch, args.dtype)
    config = GLMConfig.from_name("chatglm2-6b", num_layers=1, num_heads=H, num_kv_heads=K, head_dim=D,
                                 hidden_size=H * D)
    print(f"| batch | cached tokens | contiguous (ms) | paged (ms) | paged / contiguous |   ({H} heads, {K} kv heads, "
          f"dim {D}, {args.dtype}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        for S in (int(s) for s in args.lengths.split(",")):
            c, p = measure(config, B, S, args.block_size, dtype, args.repeats)
            print(f"| {B} | {S} | {c:.3f} | {p:.3f} | {p / c:.2f} |", flush=True)
    if args.mixed:
        low, high = (int(x) for x in args.mixed.split(","))
        print(f"\n| batch | lengths | contiguous (ms) | paged, padded (ms) | paged, in length groups (ms) | groups | "
              f"grouped / contiguous |   (group cost {paged_cache.GROUP_COST_BYTES // 1024} KiB)")
        print("|---|---|---|---|---|---|---|")
        for B in (int(b) for b in args.batches.split(",")):
            if B < 2:
                continue
            g = torch.Generator().manual_seed(B)
            lengths = [int(low * (high / low) ** float(u)) for u in torch.rand(B, generator=g)]
            c, p, grouped, n = measure_mixed(config, lengths, args.block_size, dtype, args.repeats)
            print(f"| {B} | {min(lengths)}-{max(lengths)} (mean {sum(lengths) // B}) | {c:.3f} | {p:.3f} | "
                  f"{grouped:.3f} | {n} | {grouped / c:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
