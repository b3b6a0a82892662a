"""A paged KV cache: fixed-size blocks of key/value slots handed out from one pool, for continuous batching.

Instead of one contiguous [B, K, S_max, D] cache per batch (core.model.KVCache), every layer owns a pool of
`num_blocks * block_size` slots [K, slots, D]; a sequence holds a list of blocks (its block table) and its token at
position p lives in slot `blocks[p // block_size] * block_size + p % block_size`. Rows of one forward pass can then
have any lengths, join and leave between steps, and give their blocks back when they end.

It plugs into the core model through the KV cache contract of core.model.Attention (core.model.LayerCache:
`update(input_pos, k, v) -> (k, v)` and `attend(input_pos, q, k, v, attention)`): `attach(model)` puts a PagedLayerCache on every layer;
before each forward the caller `bind`s the slots the new tokens are written to ([B, T]), the slots each row reads
([B, S], padded) and, for decoding, each row's length; it passes a bool mask [B, 1, T, S] over those read slots
(False on the padding), explicit position ids, and input_pos = arange(S - T, S) (the model only uses its last value,
to cut the mask at S). Everything the model does around the cache (2D positions, the prefix-LM mask, grouped KV
heads, P-tuning prefixes prepended to the keys) is unchanged.

Keys are gathered from the pages before attention (there is no paged-attention kernel in torch), so a step reads
each row's keys twice; and a batch pads every row to the longest. With lengths bound, `attend` splits the rows into
groups of similar length (at most MAX_GROUPS, where the padding saved outweighs a group's fixed cost) and gathers
and attends group by group: rows of 50 and 2000 tokens no longer both cost 2000.
"""

from __future__ import annotations

import torch
from torch import nn

from glmkit.core.config import GLMConfig
from glmkit.core.model import LayerCache

MAX_GROUPS = 4  # length groups per decode step
GROUP_COST_BYTES = 256 * 1024  # a group's fixed cost (a gather and an SDPA call), in key/value bytes read instead


def bytes_per_block(config: GLMConfig, block_size: int, dtype: torch.dtype) -> int:
    """Memory of one block across every layer: keys and values of block_size tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * itemsize


class BlockPool:
    """Key/value slots for every layer plus the free list of their blocks.

    k[layer], v[layer]: [K, num_blocks * block_size, D]. `allocate(n)` hands out n blocks (or None when fewer are
    free), `free(blocks)` takes them back. Not thread-safe: one decoding thread owns it. num_kv_heads: the KV heads
    this process computes (default all; a tensor-parallel rank holds its share).
    """

    def __init__(self, config: GLMConfig, num_blocks: int, block_size: int = 16, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_kv_heads: int | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.config, self.num_blocks, self.block_size = config, num_blocks, block_size
        # (K, slots, D): a gathered row is then [S, D]-contiguous per head, as in the contiguous cache, which is
        # what keeps CPU decode attention over it fast (a slot-major pool made SDPA ~5x slower)
        shape = (num_kv_heads or config.num_kv_heads, num_blocks * block_size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block ids are handed out first
        self.write: torch.Tensor | None = None  # [B * T] slots of this forward's new tokens
        self.read: torch.Tensor | None = None  # [B, S] slots each row attends to (padding: any valid slot)
        self.groups: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None  # (rows, S_g, their read slots)
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def block_slots(self, blocks: list[int]) -> torch.Tensor:
        """Slot indices of every position the blocks hold, in order ([len(blocks) * block_size]): a sequence's
        table, so positions [start, end) are table[start:end]."""
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[:, None] * self.block_size + torch.arange(self.block_size)).reshape(-1)

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of positions [start, end) of a sequence holding `blocks` ([end - start] long)."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def gather_buffers(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reused buffers of `numel` elements for the gathered keys/values of one layer (the layers run one
        after another, so one pair serves them all). Reusing them matters: gathering into fresh memory every step
        costs page faults that made CPU decode attention several times slower."""
        if self._gathered is None or self._gathered[0].numel() < numel:
            size = 1 << max(numel - 1, 1).bit_length()  # grow in powers of two
            self._gathered = (torch.empty(size, dtype=like.dtype, device=like.device),
                              torch.empty(size, dtype=like.dtype, device=like.device))
        return self._gathered[0][:numel], self._gathered[1][:numel]

    def bind(self, write: torch.Tensor, read: torch.Tensor, lengths: list[int] | None = None) -> None:
        """The slots of the next forward: write [B, T] (new tokens), read [B, S] (keys of each row, padded) and, if
        given, each row's count of real (unpadded) read slots, which lets attention group rows by length."""
        device = self.k[0].device
        self.write = write.reshape(-1).to(device)
        self.read = read.to(device)
        self.groups = None
        if lengths is not None and len(lengths) > 1:
            per_token = 2 * self.k[0].shape[0] * self.k[0].shape[2] * self.k[0].element_size()
            split = length_groups(lengths, max(1, GROUP_COST_BYTES // per_token))
            if len(split) > 1:
                self.groups = []
                for rows in split:
                    s_g = max(lengths[r] for r in rows)
                    index = torch.tensor(rows, dtype=torch.long, device=device)
                    self.groups.append((index, s_g, self.read[index, :s_g].reshape(-1)))

    def attach(self, model: nn.Module) -> None:
        """Makes this pool the KV cache of every layer of `model` (a core.model.GLM)."""
        for i, block in enumerate(model.h):
            block.attn.kv_cache = PagedLayerCache(self, i)

    @staticmethod
    def detach(model: nn.Module) -> None:
        for block in model.h:
            block.attn.kv_cache = None


def length_groups(lengths: list[int], group_cost: int, max_groups: int = MAX_GROUPS,
                  max_cuts: int = 32) -> list[list[int]]:
    """Rows split into at most max_groups groups of similar length, minimising the padded work: the sum over
    groups of group_cost + rows x the group's longest length (a group attends at its longest row's length).
    Returns lists of row indices (longest rows first). Groups start at one of max_cuts + 1 evenly spaced places
    in the sorted order (every place up to that many rows), so a step's split costs the same at any batch size."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    n = len(order)
    if n < 2 or (lengths[order[0]] - lengths[order[-1]]) * n <= group_cost:
        return [order]  # splitting cannot save a group's cost
    cuts = sorted({round(j * n / max_cuts) for j in range(max_cuts + 1)}) if n > max_cuts else list(range(n + 1))
    m = len(cuts) - 1
    # best[g][j]: least cost of the rows before cuts[j] as g groups; a group [cuts[i], cuts[j]) costs group_cost +
    # its rows x the length of its first (longest) row
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    back = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, m + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + group_cost + (cuts[j] - cuts[i]) * lengths[order[cuts[i]]]
                if cost < best[g][j]:
                    best[g][j], back[g][j] = cost, i
    g = min(range(1, max_groups + 1), key=lambda g: best[g][m])
    groups, j = [], m
    while g > 0:
        i = back[g][j]
        groups.append(order[cuts[i]:cuts[j]])
        j, g = i, g - 1
    return groups[::-1]


class PagedLayerCache(LayerCache):
    """One layer's view of a BlockPool (core.model.LayerCache): `update` writes and gathers every row's keys,
    `attend` gathers and attends group by group when the rows are bound by length."""

    def __init__(self, pool: BlockPool, layer: int) -> None:
        super().__init__()
        self.pool, self.layer = pool, layer

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, K, T, D) written at the bound write slots; returns every row's keys/values (B, K, S, D)."""
        self._write(k, v)
        return self._gather(self.pool.read.reshape(-1), k.shape[0], self.pool.read.shape[1])

    def attend(self, input_pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention) -> torch.Tensor:
        """Writes k, v (B, K, T, D) like `update`, then q (B, H, T, D) attends: attention(rows, q[rows], keys,
        values) per group of rows bound by length (rows None and every row at once when there is one group)."""
        if self.pool.groups is None:
            return attention(None, q, *self.update(input_pos, k, v))
        self._write(k, v)
        out = torch.empty_like(q)
        for rows, s_g, slots in self.pool.groups:
            keys, values = self._gather(slots, len(rows), s_g)
            out[rows] = attention(rows, q[rows], keys, values).to(out.dtype)
        return out

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        pool = self.pool
        if pool.write is None or pool.read is None:
            raise RuntimeError("bind the paged cache's slots (BlockPool.bind) before running the model")
        B, K, T, D = k.shape
        if pool.write.numel() != B * T:
            raise ValueError(f"{pool.write.numel()} write slots bound for {B}x{T} new tokens")
        kp, vp = pool.k[self.layer], pool.v[self.layer]  # (K, slots, D)
        kp.index_copy_(1, pool.write, k.transpose(0, 1).reshape(K, B * T, D).to(kp.dtype))
        vp.index_copy_(1, pool.write, v.transpose(0, 1).reshape(K, B * T, D).to(vp.dtype))

    def _gather(self, slots: torch.Tensor, B: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of `slots` (B * S of them, row-major) as (B, K, S, D) views of the reused buffers."""
        kp, vp = self.pool.k[self.layer], self.pool.v[self.layer]
        K, D = kp.shape[0], kp.shape[2]
        keys, values = self.pool.gather_buffers(K * B * S * D, kp)
        keys, values = keys.view(K, B * S, D), values.view(K, B * S, D)
        torch.index_select(kp, 1, slots, out=keys)
        torch.index_select(vp, 1, slots, out=values)
        return keys.view(K, B, S, D).transpose(0, 1), values.view(K, B, S, D).transpose(0, 1)  # (B, K, S, D)
