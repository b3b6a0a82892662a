"""GLMForCausalLM: the model plus the familiar methods (generate, stream_generate, chat, stream_chat).

The methods are thin delegates to glmkit.core.generate, glmkit.core.chat and glmkit.core.paged_cache, so the model
file stays free of them. The cache methods are model calls so that tensor-parallel ranks can mirror them
(glmkit.distributed.tp).
Loading and saving are glmkit.load_model / glmkit.save_model (glmkit.loading), which also apply quantization and
adapters, layers above this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glmkit.core.chat import chat, stream_chat
from glmkit.core.generate import generate, generate_stream
from glmkit.core.model import GLM
from glmkit.core.paged_cache import BlockPool, PagedLayerCache


class GLMForCausalLM(GLM):
    name_or_path: str = ""

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """New token ids [B, N] (see glmkit.core.generate.generate_stream for the arguments)."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def stream_generate(self, input_ids, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        return generate_stream(self, input_ids, attention_mask, **kwargs)

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """response, history = model.chat(tokenizer, query, history), as ChatGLM does it."""
        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        return stream_chat(self, tokenizer, query, history, **kwargs)

    def setup_paged_cache(self, num_blocks: int, block_size: int) -> BlockPool:
        """Makes a paged KV cache of num_blocks blocks (glmkit.core.paged_cache.BlockPool, in the model's dtype and
        on its device) the cache of every layer and returns it; `bind_paged_cache` before every forward,
        `clear_cache` removes it."""
        pool = BlockPool(self.config, num_blocks, block_size, dtype=self.dtype, device=self.device,
                         num_kv_heads=self.h[0].attn.n_kv_heads)
        pool.attach(self)
        return pool

    def bind_paged_cache(self, write: torch.Tensor, read: torch.Tensor, lengths: list[int] | None = None) -> None:
        """The slots of the next forward over the paged cache (BlockPool.bind)."""
        cache = self.h[0].attn.kv_cache
        if not isinstance(cache, PagedLayerCache):
            raise RuntimeError("no paged KV cache is set up: call setup_paged_cache first")
        cache.pool.bind(write, read, lengths)
