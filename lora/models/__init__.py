"""Models as plain PyTorch modules, with transformers-compatible parameter names and checkpoints."""

from lora.models.phi3 import CausalLMOutput, Phi3Config, Phi3ForCausalLM, position_ids_from_mask

__all__ = ["Phi3Config", "Phi3ForCausalLM", "CausalLMOutput", "position_ids_from_mask"]
