"""LoRA on glmkit models through the PEFT library, adapter-only checkpoints, and `glmkit merge-lora`.

PEFT's layers are injected straight into the plain nn.Module (`peft.inject_adapter_in_model`), so the model keeps
its own forward/generate/chat. Adapters are saved exactly as `PeftModel.save_pretrained` saves them
(adapter_config.json + adapter_model.safetensors with `base_model.model.<module>.lora_{A,B}.weight` keys), so
`PeftModel.from_pretrained(glmkit_model, dir)` loads them, and `load_lora_adapter` loads PEFT-written ones.

Targets are glmkit module-name suffixes (`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`); ChatGLM's names
(`query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`) are accepted too. On quantized bases
(glmkit.quant.linear.QuantizedLinear) the LoRA update runs in floating point beside the frozen integer weights.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from glmkit.core.atomic import atomic_dir
from glmkit.core.extras import require_extra
from glmkit.quant.linear import QuantizedLinear

DEFAULT_TARGETS = ("attn.qkv",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before each module name
_THUDM_NAMES = {"query_key_value": "attn.qkv", "dense": "attn.proj", "dense_h_to_4h": "mlp.fc",
                "dense_4h_to_h": "mlp.proj"}
_GLMKIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head",
                   "attn.q_a", "attn.q_b", "attn.kv_a")  # the last three: GLM-4.7-Flash's latent attention
# kv_b is no target: latent attention reads its weight directly (the absorbed form), which would skip a LoRA delta
MLA_TARGETS = ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.proj")


def parse_targets(targets: str | Iterable[str] | None) -> list[str]:
    """'attn.qkv,mlp.fc' / ['query_key_value'] / 'all' -> glmkit module-name suffixes."""
    if targets is None:
        return list(DEFAULT_TARGETS)
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if items == ["all"]:
        return ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    out = []
    for t in items:
        t = _THUDM_NAMES.get(t, t)
        if t not in _GLMKIT_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; use any of {', '.join(_GLMKIT_TARGETS)} "
                             f"(or ChatGLM's {', '.join(_THUDM_NAMES)}), comma-separated, or 'all'")
        out.append(t)
    if not out:
        raise ValueError("--lora_target is empty; name at least one module, e.g. attn.qkv")
    return out


def lora_config(rank: int = 8, alpha: float = 32.0, dropout: float = 0.1,
                target_modules: str | Iterable[str] | None = None):
    """A peft.LoraConfig for glmkit module names."""
    require_extra("train", "peft", what="LoRA")
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"--lora_rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=parse_targets(target_modules),
                        bias="none")
    _register_quantized(config)
    return config


def _register_quantized(config) -> None:
    """Lets PEFT wrap glmkit's QuantizedLinear: PEFT's dense LoRA layer only needs in/out features and a base
    forward that accepts float inputs, which QuantizedLinear provides."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not issubclass(QuantizedLinear, nn.Linear):
        config._register_custom_module({QuantizedLinear: LoraLinear})


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 32.0, dropout: float = 0.1,
               target_modules: str | Iterable[str] | None = None) -> nn.Module:
    """Injects fresh LoRA layers (B = 0, so the output is unchanged) and freezes everything else. In place."""
    if has_lora(model):
        raise ValueError("this model already has LoRA layers; merge_lora() it first or load the base again")
    config = lora_config(rank, alpha, dropout, target_modules)
    _check_targets(model, config.target_modules)
    _inject(config, model)
    mark_only_lora_as_trainable(model)
    return model


def _check_targets(model: nn.Module, targets) -> None:
    """Latent attention (GLM-4.7-Flash) has no fused attn.qkv, and the other families have no MLA projections."""
    mla = bool(getattr(getattr(model, "config", None), "kv_lora_rank", None))
    wrong = [t for t in targets if (t == "attn.qkv" if mla else t in MLA_TARGETS[:3])]
    if wrong:
        kind = "multi-head latent attention (GLM-4.7-Flash)" if mla else "this model's attention"
        hint = ", ".join(MLA_TARGETS if mla else ("attn.qkv", "attn.proj"))
        raise ValueError(f"LoRA targets {wrong} do not exist in {kind}; its attention targets are {hint} (plus "
                         "mlp.fc, mlp.proj for its dense layers)")


def _inject(config, model: nn.Module) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # QuantizedLinear is registered on purpose (see _register_quantized)
        warnings.filterwarnings("ignore", message="Unsupported layer type .*QuantizedLinear")
        inject_adapter_in_model(config, model)


def has_lora(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no LoRA layer can exist before PEFT is imported (and it is an extra)
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under the key names PeftModel.save_pretrained writes."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding targets, and "auto" would probe the base path (even the Hub)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_lora_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (only LoRA weights), as PEFT does."""
    from safetensors.torch import save_file

    config = _model_lora_config(model)
    config = copy.deepcopy(config)  # saving must not change the live config
    config.inference_mode = True
    config.base_model_name_or_path = base_model_name_or_path
    with atomic_dir(out_dir) as out:  # out_dir stays the previous complete adapter until this one is
        config.save_pretrained(str(out))
        save_file(lora_state_dict(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def _model_lora_config(model: nn.Module):
    configs = getattr(model, "peft_config", None)
    if not configs or "default" not in configs:
        raise ValueError("the model has no LoRA adapter; call glmkit.adapters.lora.apply_lora(model, ...) first")
    return configs["default"]


def load_lora_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Injects the adapter described by `adapter_dir/adapter_config.json` and loads its weights. In place.

    Reads folders written by save_lora_adapter or by PeftModel.save_pretrained (safetensors or .bin).
    """
    require_extra("train", "peft", what="a LoRA adapter")
    from peft import LoraConfig, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}; is this a LoRA adapter folder?")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != "LORA" and str(config.peft_type) != "PeftType.LORA":
        raise ValueError(f"{adapter_dir} holds a {config.peft_type} adapter; glmkit loads LoRA adapters")
    config.target_modules = parse_targets(config.target_modules)
    config.inference_mode = not trainable
    _register_quantized(config)
    weights = _read_adapter_weights(adapter_dir)
    _check_targets(model, config.target_modules)
    _inject(config, model)
    state = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in weights.items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(f"adapter in {adapter_dir} does not fit this model: missing {missing[:4]}, "
                         f"unexpected {list(getattr(result, 'unexpected_keys', []))[:4]}")
    if trainable:
        mark_only_lora_as_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st, binf = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binf.is_file():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or corrupt: name the file
        from glmkit.core.checkpoint import CheckpointError

        raise CheckpointError(f"cannot read the adapter weights in {adapter_dir}: {type(e).__name__}: {e}") from None
    raise FileNotFoundError(f"{adapter_dir} has {ADAPTER_CONFIG} but neither {ADAPTER_WEIGHTS} nor adapter_model.bin")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA layer into its base weight (W += scale·B·A) and puts the plain base layer back. In place."""
    require_extra("train", "peft", what="merging LoRA")
    from peft.tuners.lora import LoraLayer

    found = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"cannot merge LoRA into {name} ({type(base).__name__}); merge into a floating-point "
                             "base (load it without quantize=) and quantize the merged model afterwards")
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
        found = True
    if not found:
        raise ValueError("the model has no LoRA layers to merge")
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    return model
