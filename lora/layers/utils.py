"""Model-wide helpers with loralib's names and semantics: trainability, state dicts, merging."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import BIAS_MODES, check_choice
from .base import LoRALayer
from .saved import ModulesToSaveWrapper

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "merge", "unmerge", "lora_layers"]


def _check_bias(bias) -> None:
    check_choice(bias, BIAS_MODES, "bias")


def lora_layers(model: nn.Module):
    """Yield ``(name, module)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def _require_lora_layers(model: nn.Module, fn: str) -> None:
    # Without LoRA layers the first would freeze everything (0 trainable parameters) and the second
    # return {}: both are a forgotten inject, never what was meant.
    if not any(True for _ in lora_layers(model)):
        raise ValueError(
            f"{fn}: {type(model).__name__} has no LoRA layers (call lora.inject or "
            "use lora.Linear & co. first)"
        )


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter whose name lacks ``lora_``; then unfreeze biases per ``bias``.

    ``bias``: "none"; "all" (every parameter named ``*bias*``); "lora_only" (the biases of LoRA
    layers, conv layers included). Raises ``ValueError`` for any other value.

    A modules_to_save wrapper (:class:`~lora.layers.saved.ModulesToSaveWrapper`) keeps its own
    settings, as in PEFT: its original stays frozen (also its bias under "all") and the adapters'
    copies train in full.
    """
    _check_bias(bias)
    _require_lora_layers(model, "mark_only_lora_as_trainable")
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    for name, p in model.named_parameters():
        if "lora_" not in name and not (inside and name.startswith(inside)):
            p.requires_grad = False
    if bias == "all":
        for name, p in model.named_parameters():
            if "bias" in name and not (inside and name.startswith(inside)):
                p.requires_grad = True
    elif bias == "lora_only":
        for _, m in lora_layers(model):
            if getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that hold LoRA parameters (keys containing ``lora_``),
    plus biases per ``bias`` ("none", "all", or "lora_only": the biases of LoRA layers)."""
    _check_bias(bias)
    _require_lora_layers(model, "lora_state_dict")
    state = model.state_dict()
    if bias == "none":
        return {k: v for k, v in state.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    keep = {k for k in state if "lora_" in k}
    for name, m in lora_layers(model):
        if m.has_adapter and getattr(m, "bias", None) is not None:
            keep.add(f"{name}.bias" if name else "bias")
    return {k: v for k, v in state.items() if k in keep}


def merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` (``layer.merge()``); returns ``model``."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Unmerge every LoRA layer of ``model``, restoring the base weights bit-exactly; returns ``model``."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model
