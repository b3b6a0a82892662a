"""GLMForCausalLM: the model plus the familiar methods (generate, stream_generate, chat, stream_chat).

The methods are thin delegates to glmkit.generate and glmkit.chat, so the model file stays free of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glmkit.model import GLM


class GLMForCausalLM(GLM):
    name_or_path: str = ""

    @classmethod
    def from_pretrained(cls, path_or_id: str, **kwargs) -> GLMForCausalLM:
        from glmkit.loader import load_model

        return load_model(path_or_id, **kwargs)

    def save_pretrained(self, out_dir: str, tokenizer=None, **kwargs):
        from glmkit.loader import save_model

        return save_model(self, out_dir, tokenizer=tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """New token ids [B, N] (see glmkit.generate.generate_stream for the arguments)."""
        from glmkit.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def stream_generate(self, input_ids, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        from glmkit.generate import generate_stream

        return generate_stream(self, input_ids, attention_mask, **kwargs)

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        """response, history = model.chat(tokenizer, query, history), as ChatGLM does it."""
        from glmkit.chat import chat

        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        from glmkit.chat import stream_chat

        return stream_chat(self, tokenizer, query, history, **kwargs)
