"""LoRA layers: thin subclasses of their torch layers sharing one merge/unmerge state machine."""

from .base import AdapterWeights, LoRALayer
from .conv import Conv1d, Conv2d, Conv3d, ConvLoRA
from .embedding import Embedding
from .linear import Linear, MergedLinear, is_gpt2_conv1d
from .saved import ModulesToSaveWrapper
from .utils import lora_layers, lora_state_dict, mark_only_lora_as_trainable, merge, unmerge

# The layer kinds model surgery knows, tried in this order (lora.targets.layer_class_for). A kind
# over slices of a fused module is its ``sliced_class`` (Linear -> MergedLinear). Adding a layer
# kind: write its class (docs/architecture.md) and name it here.
LAYER_KINDS: tuple[type[LoRALayer], ...] = (Linear, Embedding, Conv1d, Conv2d, Conv3d)

__all__ = [
    "LoRALayer",
    "AdapterWeights",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvLoRA",
    "LAYER_KINDS",
    "is_gpt2_conv1d",
    "ModulesToSaveWrapper",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge",
    "unmerge",
    "lora_layers",
]
