"""LoRA layers: thin subclasses of their torch layers sharing one merge/unmerge state machine."""

from .base import AdapterWeights, LoRALayer
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear, MergedLinear
from .utils import lora_layers, lora_state_dict, mark_only_lora_as_trainable, merge, unmerge

__all__ = [
    "LoRALayer", "AdapterWeights", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict", "merge", "unmerge", "lora_layers",
]
