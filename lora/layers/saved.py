"""modules_to_save as PEFT does it: the original module stays untouched, each adapter trains a copy.

:class:`ModulesToSaveWrapper` takes the place of a module that ``LoRAConfig.modules_to_save`` names.
It holds ``original_module`` (frozen, unchanged) and ``modules_to_save`` (adapter name -> that
adapter's trainable copy), and its forward runs the copy of the active adapter, or the original
when the active adapter has none (or none is active: ``lora.disabled``). The names are PEFT's, so
the model's state-dict keys are PEFT's too (``lm_head.modules_to_save.default.weight``); adapter
files hold the copy's tensors under the module's own name (``lm_head.weight``), as PEFT's do.

A copy is independent of the original, also when the original's weight is tied to another module
(Phi-4-mini's ``lm_head`` and ``embed_tokens``): only the named module changes. With
``ensure_weight_tying`` the tied partner is wrapped too and its copy shares the copy's weight
(:meth:`ModulesToSaveWrapper.add_copy` with ``shared``), so both change together.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["ModulesToSaveWrapper", "saved_modules"]


class ModulesToSaveWrapper(nn.Module):
    """``original_module`` and one trainable copy of it per adapter (``modules_to_save[name]``).

    ``active_adapter``: the adapter whose copy forward runs; None (or an adapter without a copy)
    runs the original. Attribute reads the wrapper does not answer itself (``weight``,
    ``num_embeddings``, ...) are those of the module forward runs.
    """

    def __init__(self, original_module: nn.Module):
        if isinstance(original_module, ModulesToSaveWrapper):
            raise TypeError("ModulesToSaveWrapper: the module is wrapped already")
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        original_module.requires_grad_(False)
        self.train(original_module.training)

    # --- the adapters' copies ------------------------------------------------------------------
    def add_copy(self, name: str, shared: dict[str, Tensor] | None = None) -> nn.Module:
        """Give adapter ``name`` its trainable copy of the original (a deep copy; parameters
        require grad) and return it. ``shared``: parameter name (dotted for a submodule's:
        ``"0.weight"``) -> a Parameter the copy uses instead of copying the original's (a tied
        partner's copy: ``{"weight": copy.weight}``; a combined adapter's computed tensors).
        Raises ``ValueError`` when the adapter has a copy already."""
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save: adapter {name!r} has a copy of this module already")
        shared = shared or {}
        memo: dict[int, Any] = {}
        for key, tensor in shared.items():
            memo[id(self.original_module.get_parameter(key))] = tensor  # deepcopy takes it as is
        module = copy.deepcopy(self.original_module, memo)
        for key, tensor in shared.items():  # an original Parameter under two names: each its own
            owner, _, leaf = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            if sub._parameters[leaf] is not tensor:
                sub._parameters[leaf] = tensor  # type: ignore[assignment]
        module.requires_grad_(True)
        self.modules_to_save[name] = module
        return module

    def get_adapter(self, name: str | None) -> nn.Module | None:
        """Adapter ``name``'s copy, or None when it has none."""
        return (
            self.modules_to_save[name]
            if name is not None and name in self.modules_to_save
            else None
        )

    def activate_adapter(self, name: str | None) -> None:
        """Run adapter ``name``'s copy (the original when it has none, or for None)."""
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy (nothing happens when it has none)."""
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def rename_adapter(self, old: str, new: str) -> None:
        """Adapter ``old``'s copy becomes adapter ``new``'s."""
        if old == new or old not in self.modules_to_save:
            return
        self.modules_to_save[new] = self.modules_to_save.pop(old)
        if self.active_adapter == old:
            self.active_adapter = new

    @property
    def adapter_names(self) -> list[str]:
        """The adapters that have a copy, in the order they got it."""
        return list(self.modules_to_save.keys())

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, else the original."""
        found = self.get_adapter(self.active_adapter)
        return found if found is not None else self.original_module

    def unwrap(self) -> nn.Module:
        """The module to put in the wrapper's place (merge_and_unload): :attr:`active_module`."""
        return self.active_module

    # --- torch -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in (
                "original_module",
                "modules_to_save",
                "active_adapter",
            ):
                raise
        return getattr(self.active_module, name)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}"


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """Yield ``(name, wrapper)`` for every :class:`ModulesToSaveWrapper` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module
