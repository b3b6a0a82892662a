"""LoRA through PEFT on glmkit models: identity at init, frozen base, adapter-only files PEFT loads, merging."""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.adapters.lora import (
    apply_lora,
    has_lora,
    load_lora_adapter,
    lora_state_dict,
    merge_lora,
    parse_targets,
    save_lora_adapter,
)
from glmkit.core.causal_lm import GLMForCausalLM
from glmkit.core.config import GLMConfig


def tiny_model(family: str = "chatglm", seed: int = 0) -> GLMForCausalLM:
    if family == "chatglm":
        cfg = GLMConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=64,
                        bos_token_id=90, eos_token_id=91, pad_token_id=3, mask_token_id=88, gmask_token_id=89)
    else:
        cfg = GLMConfig.from_name("chatglm2-6b", vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8, ffn_hidden_size=48, max_seq_len=64,
                                  torch_dtype="float32")
    torch.manual_seed(seed)
    model = GLMForCausalLM(cfg)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 80, (2, 10), generator=g)
    ids[:, 6], ids[:, 7] = 89, 90  # [gMASK] <sop> (ChatGLM-6B's prefix-LM boundary)
    return ids


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for s in range(steps):
        ids = batch(10 + s)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def perturb_lora_b(model, seed: int = 3) -> None:
    """B starts at zero; give it values so the adapter changes the output (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_lora_at_init_equals_base(family):
    model = tiny_model(family)
    ids = batch()
    before = model(ids)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all")
    assert has_lora(model)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def test_frozen_weights_unchanged_after_optimizer_steps():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=["attn.qkv", "mlp.proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train_steps(model)
    after = model.state_dict()
    for name, value in base.items():  # PEFT moves the base weight to <module>.base_layer.<attr>
        key = name if name in after else name.replace("attn.qkv.", "attn.qkv.base_layer.").replace(
            "mlp.proj.", "mlp.proj.base_layer.")
        assert torch.equal(after[key], value), f"frozen weight {name} changed"
    lora_after = lora_state_dict(model)
    assert any(not torch.equal(lora_after[k], lora_before[k]) for k in lora_before), "LoRA weights did not train"


def test_saved_adapter_holds_only_lora_weights(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="attn.qkv,mlp.fc")
    save_lora_adapter(model, tmp_path, base_model_name_or_path="glm-tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    expected = {f"base_model.model.h.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc")
                for ab in "AB"}
    assert keys == expected
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["attn.qkv", "mlp.fc"]
    assert cfg["base_model_name_or_path"] == "glm-tiny"


def test_peft_loads_glmkit_lora(tmp_path):
    from peft import PeftModel

    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    perturb_lora_b(model)
    ids = batch()
    expected = model(ids)
    assert not torch.allclose(expected, tiny_model()(ids))  # the adapter matters
    save_lora_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids), expected)

    # and PEFT's lower-level loader, on glmkit's own injection
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    fresh = tiny_model()
    apply_lora(fresh, rank=4, alpha=8, dropout=0.0)
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    set_peft_model_state_dict(fresh, state)
    torch.testing.assert_close(fresh(ids), expected)


def test_load_lora_adapter_reads_peft_written_folders(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["attn.proj"]))
    perturb_lora_b(peft_model)
    peft_model.eval()
    ids = batch()
    expected = peft_model(ids)
    peft_model.save_pretrained(str(tmp_path))

    model = load_lora_adapter(tiny_model(), tmp_path)
    torch.testing.assert_close(model(ids), expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_loader_applies_lora_adapter(tmp_path):
    from glmkit.loading.loader import load_model, save_model

    base = tiny_model()
    save_model(base, tmp_path / "base")
    apply_lora(base, rank=4, alpha=8, dropout=0.0)
    perturb_lora_b(base)
    save_lora_adapter(base, tmp_path / "adapter")
    ids = batch()
    loaded = load_model(tmp_path / "base", adapter=tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids), base(ids))


def test_merge_folds_lora_into_the_base():
    model = tiny_model()
    w = model.h[0].attn.qkv.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    perturb_lora_b(model)
    layer = model.h[0].attn.qkv
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8 / 4)
    ids = batch()
    expected = model(ids)
    merge_lora(model)
    assert not has_lora(model)
    assert type(model.h[0].attn.qkv) is torch.nn.Linear
    torch.testing.assert_close(model.h[0].attn.qkv.weight, w + delta)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(model)


def test_merge_lora_cli_writes_a_loadable_model(tmp_path):
    from glmkit.commands.merge_lora import cli_main
    from glmkit.loading.loader import load_model, save_model

    base = tiny_model()
    save_model(base, tmp_path / "base")
    apply_lora(base, rank=4, alpha=8, dropout=0.0, target_modules="all")
    perturb_lora_b(base)
    save_lora_adapter(base, tmp_path / "adapter")
    ids = batch()
    expected = base(ids)
    assert cli_main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert not has_lora(merged)
    torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)


def test_targets():
    assert parse_targets(None) == ["attn.qkv"]
    assert parse_targets("query_key_value,dense_4h_to_h") == ["attn.qkv", "mlp.proj"]
    assert parse_targets("all") == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    with pytest.raises(ValueError, match="unknown LoRA target"):
        parse_targets("q_proj")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(tiny_model()))


def test_lora_on_a_quantized_base(tmp_path):
    from glmkit.loading.loader import load_model, save_model

    save_model(tiny_model(), tmp_path / "base")
    model = load_model(tmp_path / "base", quantize="int8")
    qkv_type = type(model.h[0].attn.qkv)
    assert qkv_type.__name__ == "QuantizedLinear"
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batch()
    before = model(ids)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="attn.qkv,mlp.fc")
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    train_steps(model)
    after = model.state_dict()
    for k, v in frozen.items():  # integer weights, scales, biases, norms: all untouched
        key = k if k in after else k.replace("attn.qkv.", "attn.qkv.base_layer.").replace("mlp.fc.",
                                                                                          "mlp.fc.base_layer.")
        assert torch.equal(after[key], v), f"frozen {k} changed"
    tuned = model(ids)
    assert not torch.allclose(tuned, before)
    save_lora_adapter(model, tmp_path / "adapter")
    reloaded = load_lora_adapter(load_model(tmp_path / "base", quantize="int8"), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids), tuned)
    with pytest.raises(ValueError, match="floating-point base"):
        merge_lora(reloaded)
