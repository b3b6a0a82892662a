"""GLMForCausalLM: the model plus the familiar methods (generate, stream_generate, chat, stream_chat).

The methods are thin delegates to glmkit.core.generate and glmkit.core.chat, so the model file stays free of them.
Loading and saving are glmkit.load_model / glmkit.save_model (glmkit.loading), which also apply quantization and
adapters, layers above this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glmkit.core.chat import chat, stream_chat
from glmkit.core.generate import generate, generate_stream
from glmkit.core.model import GLM


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
