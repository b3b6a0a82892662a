"""INT8/INT4 weight-only quantization, the names users import: ``from glmkit.quant.quantize import ...``.

The code lives in one module per job, and new code inside glmkit imports from those:

* glmkit.quant.formats: the specs (`default_spec`, `head_spec`, `quantization_spec`) and each scheme's math
  (`quantize_rowwise`, `quantize_group`, `dequantize`);
* glmkit.quant.linear: `QuantizedLinear` / `QuantizedEmbedding` and their runtime layouts;
* glmkit.quant.transform: quantized layers put into a model (`prepare_model`, `quantize_model`, `quantize_head`);
* glmkit.quant.saving: `save_quantized` (the folder `glmkit quantize` writes), over glmkit.core.safetensors_io;
* glmkit.quant.calibrate (GPTQ), glmkit.quant.kernels (the matmul paths), glmkit.quant.sharded (GLM-130B's files).
"""

from glmkit.quant.formats import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_HEAD,
    GROUP_SIZES,
    HEADS,
    MSE_CLIP_RATIOS,
    MSE_REFIT_ROUNDS,
    QUANT_KEY,
    SCHEMES,
    default_head,
    default_spec,
    dequantize,
    effective_group_size,
    head_spec,
    quantization_spec,
    quantize_group,
    quantize_rowwise,
    saved_layout_is_native,
)
from glmkit.quant.kernels import release_freed_memory
from glmkit.quant.linear import QuantizedEmbedding, QuantizedLinear
from glmkit.quant.saving import quantized_state_dict, save_quantized
from glmkit.quant.transform import (
    QUANTIZED_LINEARS,
    model_spec,
    prepare_model,
    quantize_head,
    quantize_model,
    tie_quantized_head,
)

__all__ = [
    "DEFAULT_GROUP_SIZE", "DEFAULT_HEAD", "GROUP_SIZES", "HEADS", "MSE_CLIP_RATIOS", "MSE_REFIT_ROUNDS", "QUANT_KEY",
    "QUANTIZED_LINEARS", "SCHEMES", "QuantizedEmbedding", "QuantizedLinear", "default_head", "default_spec", "dequantize",
    "effective_group_size", "head_spec", "model_spec", "prepare_model", "quantization_spec", "quantize_group",
    "quantize_head", "quantize_model", "quantize_rowwise", "quantized_state_dict", "release_freed_memory",
    "save_quantized", "saved_layout_is_native", "tie_quantized_head",
]
