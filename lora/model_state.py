"""The LoRA state a model carries besides its layers: the one writer of ``model.lora_config`` (the
active adapter's :class:`~lora.LoRAConfig`, set by :func:`lora.inject`) and ``model.lora_configs``
(adapter name -> config, once a model holds several adapters).

Every module that changes these goes through the functions here, so what they mean is said once.
(A layer's link to the module it replaced is its own: :attr:`lora.LoRALayer.base_module`.)
"""

from __future__ import annotations

from torch import nn

from .config import LoRAConfig

__all__ = [
    "active_config",
    "set_active_config",
    "registered_configs",
    "set_registered_configs",
    "clear",
]


def active_config(model: nn.Module) -> LoRAConfig | None:
    """``model.lora_config``: the active adapter's config, or None."""
    return getattr(model, "lora_config", None)


def set_active_config(model: nn.Module, config: LoRAConfig | None) -> None:
    """Set ``model.lora_config`` (None: the model has adapters but the active one has no config)."""
    model.__dict__["lora_config"] = (
        config  # what `model.lora_config = config` does for a non-tensor
    )


def registered_configs(model: nn.Module) -> dict[str, LoRAConfig | None] | None:
    """``model.lora_configs`` (the live dict: adding to it registers an adapter), or None when the
    model has not got one yet."""
    return model.__dict__.get("lora_configs")


def set_registered_configs(model: nn.Module, configs: dict[str, LoRAConfig | None]) -> None:
    """Make ``configs`` the model's ``lora_configs``."""
    model.__dict__["lora_configs"] = configs


def clear(model: nn.Module) -> None:
    """Forget both: the model holds no adapter any more and can be injected afresh."""
    model.__dict__.pop("lora_configs", None)
    if hasattr(model, "lora_config"):
        del model.lora_config
