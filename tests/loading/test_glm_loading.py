"""The original GLM through glmkit.load_model's plug-ins: quantize-on-load, LoRA and P-tuning adapters, and the
whole-checkpoint tools (merge-lora, quantize), on the hub-written tiny checkpoints of tests/data/glm."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit.adapters.lora import apply_lora, merge_lora, save_lora_adapter
from glmkit.adapters.ptuning import attach_prefix, save_ptuning_checkpoint
from glmkit.loading.checkpoint_ops import merge_lora_checkpoint, quantize_checkpoint
from tests.helpers.common import rel_err
from tests.helpers.goldens import GLM_DATA, glm_logits_case


def _inputs(fixture: str = "gpt2", case: str = "seq2seq_batch"):
    kwargs, _, _ = glm_logits_case(fixture, case)
    kwargs["attention_mask"] = kwargs["attention_mask"].bool()
    return kwargs


@pytest.fixture(scope="module")
def reference():
    model = glmkit.load_model(GLM_DATA / "gpt2")
    with torch.no_grad():
        return model(**_inputs())


@pytest.mark.parametrize("quantize,bound", [("int8", 0.05), ("int4", 0.35)])
def test_quantize_while_loading(reference, quantize, bound, tmp_path):
    model = glmkit.load_model(GLM_DATA / "gpt2", quantize=quantize)
    assert type(model.h[0].attn.qkv).__name__ == "QuantizedLinear"
    with torch.no_grad():
        out = model(**_inputs())
    assert rel_err(out, reference) < bound
    # written as a quantized checkpoint and read back: the same model
    saved = quantize_checkpoint(GLM_DATA / "gpt2", tmp_path / quantize, 8 if quantize == "int8" else 4)
    with torch.no_grad():
        again = glmkit.load_model(saved)(**_inputs())
    torch.testing.assert_close(again, out, atol=1e-4, rtol=0)


def test_lora_adapter_and_merge(reference, tmp_path):
    model = glmkit.load_model(GLM_DATA / "gpt2")
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules="all")
    with torch.no_grad():  # a LoRA update that changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        tuned = model(**_inputs())
    assert rel_err(tuned, reference) > 1e-3
    adapter = save_lora_adapter(model, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(glmkit.load_model(GLM_DATA / "gpt2", adapter=adapter)(**_inputs()), tuned,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(merge_lora(model)(**_inputs()), tuned, atol=1e-5, rtol=0)
    merged = merge_lora_checkpoint(GLM_DATA / "gpt2", adapter, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(glmkit.load_model(merged)(**_inputs()), tuned, atol=1e-4, rtol=0)


def test_ptuning_prefix_round_trip(tmp_path):
    model = glmkit.load_model(GLM_DATA / "chinese")
    attach_prefix(model, pre_seq_len=3)
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(0, 0.5)
    model.eval()
    inputs = _inputs("chinese", "fill_prompt")
    with torch.no_grad():
        prefixed = model(**inputs)
        plain = glmkit.load_model(GLM_DATA / "chinese")(**inputs)
    assert rel_err(prefixed, plain) > 1e-3
    folder = save_ptuning_checkpoint(model, tmp_path / "pt")
    with torch.no_grad():
        torch.testing.assert_close(glmkit.load_model(GLM_DATA / "chinese", adapter=folder)(**inputs), prefixed,
                                   atol=1e-5, rtol=0)
