"""Model-wide helpers with loralib's names and semantics: trainability, state dicts, merging."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn

from ..checks import BIAS_MODES, check_choice
from .base import LoRALayer
from .saved import ModulesToSaveWrapper, saved_modules

__all__ = [
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge",
    "unmerge",
    "lora_layers",
    "mark_shared_weights",
]


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


def saved_prefixes(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The state-dict key prefixes of ``model``'s modules_to_save wrappers: those of the adapters'
    copies (``lm_head.modules_to_save.``) and those of the frozen originals
    (``lm_head.original_module.``). Both empty for a model without wrappers."""
    copies, originals = [], []
    for name, _ in saved_modules(model):
        prefix = f"{name}." if name else ""
        copies.append(f"{prefix}modules_to_save.")
        originals.append(f"{prefix}original_module.")
    return tuple(copies), tuple(originals)


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that hold LoRA parameters (keys containing ``lora_``),
    plus biases per ``bias`` ("none", "all", or "lora_only": the biases of LoRA layers).

    With modules_to_save wrappers (:class:`~lora.layers.saved.ModulesToSaveWrapper`) it also
    holds every entry (parameters and buffers) of every adapter's copy
    (``lm_head.modules_to_save.<adapter>.weight``): they are trained, so
    ``model.load_state_dict(lora_state_dict, strict=False)`` restores them. Nothing under a
    wrapper's ``original_module`` (frozen, never changed) is included, whatever ``bias`` says. A
    model without wrappers gets loralib's keys exactly."""
    _check_bias(bias)
    _require_lora_layers(model, "lora_state_dict")
    state = model.state_dict()
    copies, originals = saved_prefixes(model)
    lora_biases: set[str] = set()
    if bias == "lora_only":
        for name, m in lora_layers(model):
            if m.has_adapter and getattr(m, "bias", None) is not None:
                lora_biases.add(f"{name}.bias" if name else "bias")

    def wanted(key: str) -> bool:
        if key.startswith(originals):
            return False
        if "lora_" in key or key.startswith(copies):
            return True
        if bias == "all":
            return "bias" in key
        return key in lora_biases

    return {k: v for k, v in state.items() if wanted(k)}


def mark_shared_weights(model: nn.Module) -> None:
    """Set each LoRA layer's ``shares_weight``: whether another module of ``model`` holds the very
    Parameter of its base weight (a tied ``lm_head`` and ``embed_tokens``, a weight two layers
    share), so that merging leaves that Parameter alone (docs/layers.md)."""
    holders: Counter[int] = Counter()
    for m in model.modules():
        base = m.base_weight if isinstance(m, LoRALayer) else m._parameters.get("weight")
        if isinstance(base, Tensor):
            holders[id(base)] += 1
    for _, layer in lora_layers(model):
        layer.shares_weight = holders[id(layer.base_weight)] > 1


def merge(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer of ``model`` (``layer.merge()``); returns ``model``. A weight another
    module shares (a tied head) is left alone: the layer merges into a Parameter of its own."""
    mark_shared_weights(model)
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Unmerge every LoRA layer of ``model``, restoring the base weights bit-exactly; returns ``model``."""
    for _, m in lora_layers(model):
        m.unmerge()
    return model
