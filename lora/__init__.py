"""lora: low-rank adaptation for PyTorch.

A drop-in for loralib (``import lora`` where code says ``import loralib as lora``), plus model
surgery, PEFT-format adapter files and a Phi-3 fine-tuning tool. See docs/.
"""

from .adapters import AdapterError, load_adapter, save_adapter
from .config import LoRAConfig
from .layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    Embedding,
    Linear,
    LoRALayer,
    MergedLinear,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge,
    unmerge,
)
from .multi import (
    active_adapter,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disabled,
    mixed_batch,
    set_adapter,
)
from .quant import QuantizationError, dequantize, quantize
from .surgery import (
    InjectionError,
    SavedTargetWarning,
    fused_splits,
    inject,
    merge_and_unload,
    print_trainable_parameters,
    trainable_parameters,
)
from .targets import lora_layer_for

__version__ = "0.1.0"

__all__ = [
    "LoRALayer",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge",
    "unmerge",
    "LoRAConfig",
    "inject",
    "merge_and_unload",
    "fused_splits",
    "lora_layer_for",
    "trainable_parameters",
    "print_trainable_parameters",
    "InjectionError",
    "SavedTargetWarning",
    "save_adapter",
    "load_adapter",
    "AdapterError",
    "set_adapter",
    "active_adapter",
    "adapter_names",
    "disabled",
    "delete_adapter",
    "add_weighted_adapter",
    "mixed_batch",
    "quantize",
    "dequantize",
    "QuantizationError",
]
