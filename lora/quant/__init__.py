"""QLoRA's 4-bit NormalFloat base, from scratch in torch: see docs/qlora.md.

lora.quantize(model, "nf4")     # frozen base Linear weights -> NF4 (embeddings, head stay 16-bit)
lora.inject(model, config)      # LoRA A/B train in bf16/fp32 on top, as on any base
lora.merge_and_unload(model)    # dequantises to 16 bits, then merges: a normal checkpoint

checkpoint(keep_decoded_on_recompute(layer), x, ...)   # 2 decodes a step under checkpointing, not 3
"""

from .model import (
    METHODS,
    QuantizationError,
    check_method,
    dequantize,
    quantize,
    quantize_shardable,
    quantized_modules,
    quantizing_assign,
)
from .nf4 import (
    BLOCK_SIZE,
    SCALE_BLOCK_SIZE,
    NF4Data,
    dequantize_nf4,
    nf4_code_book,
    pack_4bit,
    quantize_blocks,
    quantize_nf4,
    quantize_scales,
    unpack_4bit,
)
from .weight import (
    FrozenWeightError,
    NF4LinearFunction,
    NF4Weight,
    is_quantized,
    keep_decoded_on_recompute,
    nf4_linear,
)

__all__ = [
    "METHODS",
    "BLOCK_SIZE",
    "SCALE_BLOCK_SIZE",
    "QuantizationError",
    "FrozenWeightError",
    "NF4Data",
    "NF4Weight",
    "NF4LinearFunction",
    "nf4_linear",
    "nf4_code_book",
    "quantize_nf4",
    "quantize_blocks",
    "quantize_scales",
    "dequantize_nf4",
    "pack_4bit",
    "unpack_4bit",
    "quantize",
    "dequantize",
    "quantized_modules",
    "quantizing_assign",
    "quantize_shardable",
    "is_quantized",
    "check_method",
    "keep_decoded_on_recompute",
]
