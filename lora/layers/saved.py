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

Over a 4-bit base (``lora.quant``) the original keeps its frozen NF4 weights, and the copy, which
trains in full, gets each of them as a trainable Parameter of its dequantised values in the weight's
compute dtype: it starts as the function the original computes, and saves as a 16-bit module does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..quant import dequantize, is_quantized

__all__ = ["ModulesToSaveWrapper", "saved_modules", "copy_state"]


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
        A 4-bit (NF4) weight of the original becomes, in the copy, a Parameter of its dequantised
        values in its compute dtype (:meth:`~lora.quant.NF4Weight.dequantize`): the copy trains
        in full. Raises ``ValueError`` when the adapter has a copy already."""
        if name in self.modules_to_save:
            raise ValueError(f"modules_to_save: adapter {name!r} has a copy of this module already")
        shared = shared or {}
        memo: dict[int, Any] = {}
        for key, tensor in shared.items():
            owner, _, leaf = key.rpartition(".")
            held = self.original_module.get_submodule(owner)._parameters.get(leaf)
            if held is not None:  # (a 4-bit weight is no Parameter: replaced after the copy)
                memo[id(held)] = tensor  # deepcopy takes it as is
        module = copy.deepcopy(self.original_module, memo)
        if any(is_quantized(m) for m in module.modules()):
            dequantize(module)  # each 4-bit weight -> a Parameter of its values, compute dtype
        for key, tensor in shared.items():  # an original Parameter under two names: each its own
            owner, _, leaf = key.rpartition(".")
            sub = module.get_submodule(owner)
            if sub._parameters.get(leaf) is not tensor:
                sub._parameters[leaf] = tensor  # type: ignore[assignment]
        module.requires_grad_(True)
        self.modules_to_save[name] = module
        return module

    def original_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` for each parameter a copy of the original holds, with the values a
        fresh copy starts from: the original's Parameters, and each 4-bit weight dequantised to its
        compute dtype (a new tensor; the copy holds it as a Parameter under the same name)."""
        yield from self.original_module.named_parameters(remove_duplicate=False)
        decoded: dict[int, Tensor] = {}  # a 4-bit weight under two names: one tensor, as the copy
        for owner, m in self.original_module.named_modules(remove_duplicate=False):
            w = m._modules.get("weight")
            if is_quantized(w):
                value = decoded.setdefault(id(w), w.dequantize())
                yield (f"{owner}.weight" if owner else "weight"), value

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


def copy_state(module: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries (``keep_vars``) a modules_to_save copy of ``module`` holds, without
    making one: ``module``'s own, except that each 4-bit weight (``<owner>.weight.packed``, ...)
    is one entry ``<owner>.weight``, a meta tensor of its shape and compute dtype (what
    :meth:`ModulesToSaveWrapper.add_copy` makes of it). For checking a file against a copy to be."""
    state = module.state_dict(keep_vars=True)
    for owner, m in module.named_modules():
        w = m._modules.get("weight")
        if not is_quantized(w):
            continue
        key = f"{owner}.weight" if owner else "weight"
        for part in [k for k in state if k.startswith(key + ".")]:
            del state[part]
        state[key] = torch.empty(w.shape, dtype=w.dtype, device="meta")
    return state
