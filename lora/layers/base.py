"""LoRALayer: the one merge/unmerge state machine every LoRA layer shares.

A layer says only what its delta weight is (:meth:`LoRALayer.delta_weight`, in the layout of its
``weight``) and how its unmerged forward runs; merging, unmerging, train/eval switching and the
state-dict rules live here, once.

Merging keeps an exact copy of the base weight (``_unmerged_weight``, a non-persistent buffer) and
unmerging copies it back. That costs one extra copy of each merged weight while merged, and buys:
bit-exact unmerge in every dtype (subtracting ΔW again, as loralib does, drifts in bf16/fp16 and
even fp32), and a ``state_dict()`` that always holds the base weight, so a checkpoint saved in
eval mode is never merged a second time when loaded.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor, nn

from .. import functional as LF

__all__ = ["LoRALayer", "AdapterWeights", "check_rank", "check_dropout", "check_alpha"]


def check_rank(r, name: str = "r") -> int:
    """Return ``r`` as an int; ``TypeError`` unless an integer, ``ValueError`` if negative."""
    if isinstance(r, bool):
        raise TypeError(f"{name}={r!r}: expected a non-negative int (the LoRA rank), got a bool")
    try:
        value = operator.index(r)
    except TypeError:
        raise TypeError(f"{name}={r!r}: expected a non-negative int (the LoRA rank), got {type(r).__name__}") from None
    if value < 0:
        raise ValueError(f"{name}={r!r}: expected a non-negative int (the LoRA rank)")
    return value


def check_alpha(lora_alpha, name: str = "lora_alpha") -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise TypeError(f"{name}={lora_alpha!r}: expected a finite real number")
    return lora_alpha


def check_dropout(p, name: str = "lora_dropout") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name}={p!r}: expected a float in [0, 1)")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}={p!r}: expected a float in [0, 1)")
    return float(p)


class LoRALayer:
    """Mixin for every LoRA layer; put it first among the bases: ``class Linear(LoRALayer, nn.Linear)``.

    Attributes: ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout`` (``nn.Identity`` when p = 0),
    ``merge_weights`` (merge on ``eval()``, unmerge on ``train()``), ``merged``.
    Subclasses implement :meth:`delta_weight` and may override :attr:`has_adapter`.
    """

    r: int
    lora_alpha: float
    scaling: float
    merged: bool
    merge_weights: bool
    # Several adapters (lora/multi.py) only: the name of the adapter the layer's LoRA parameters hold.
    adapter_name: str = "default"
    # The attributes that, with lora_A, lora_B and lora_dropout, make up one adapter (see pop_adapter).
    _adapter_fields: tuple[str, ...] = ("r", "lora_alpha", "use_rslora", "scaling")

    def _init_lora(self, r, lora_alpha, lora_dropout: float, merge_weights: bool, use_rslora: bool = False) -> None:
        # Called after the torch base class's __init__ (so buffers can be registered).
        self.r = check_rank(r)
        self.lora_alpha = check_alpha(lora_alpha)
        p = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = LF.lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.merge_weights = bool(merge_weights)
        self.merged = False
        self.register_buffer("_unmerged_weight", None, persistent=False)

    # --- what a layer must say ---------------------------------------------------------------
    @property
    def has_adapter(self) -> bool:
        """True when the layer carries LoRA parameters (r > 0)."""
        return self.r > 0

    def delta_weight(self) -> Tensor:
        """``scaling · ΔW`` in the layout and shape of ``self.weight`` (dtype of the LoRA parameters)."""
        raise NotImplementedError

    def _dropout_or_none(self):
        # None lets the functional path skip a call when dropout is the identity.
        return None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout

    # --- building from an existing torch layer (model surgery) ----------------------------------
    def _adopt_base(self, base: nn.Module, lora_dtype: torch.dtype | None = None, init_lora_weights: bool = True):
        """Take ``base``'s weight and bias Parameters (shared, not copied) and put the LoRA
        parameters on the base's device, in ``lora_dtype`` (default: the base weight's dtype).

        ``self`` was built on the meta device with the base's shapes; returns ``self``.
        """
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        if self.has_adapter:
            device = base.weight.device
            dtype = lora_dtype if lora_dtype is not None else base.weight.dtype
            for name in ("lora_A", "lora_B"):
                shape = self._parameters[name].shape
                self._parameters[name] = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            self.reset_lora_parameters()
            if not init_lora_weights:
                self._randomize_lora_B()
            self.weight.requires_grad_(False)
        # The replaced module is kept (unregistered: not in the module tree or the state dict) as
        # the shell that merge_and_unload puts back, so that any torch-like class round-trips.
        self.__dict__["_lora_base_module"] = base
        self.train(base.training)
        return self

    @torch.no_grad()
    def _randomize_lora_B(self) -> None:
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        if not self.lora_A.any():  # Embedding's A starts at zero
            nn.init.normal_(self.lora_A)

    # --- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W + scaling·ΔW`` into ``self.weight``. Idempotent: merging a merged layer does nothing."""
        if self.merged or not self.has_adapter:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly. Idempotent."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()
        return self

    # --- state dict: always the base weight ----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            base = self._unmerged_weight
            destination[prefix + "weight"] = base if keep_vars else base.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Load into the unmerged layer, then merge again with whatever A and B now hold.
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_merged:
            self.merge()

    # --- several adapters: an extension (lora/multi.py drives it); one adapter needs none of this ---
    def pop_adapter(self) -> AdapterWeights | None:
        """Take the layer's adapter out (unmerging first) and return it; the layer is left without one
        (r = 0: it computes its base layer). None when the layer has no adapter."""
        if not self.has_adapter:
            return None
        self.unmerge()
        slot = AdapterWeights(
            self.adapter_name, {f: getattr(self, f) for f in self._adapter_fields},
            self._parameters["lora_A"], self._parameters["lora_B"], self.lora_dropout,
        )
        self.clear_adapter()
        return slot

    def put_adapter(self, slot: AdapterWeights) -> None:
        """Make ``slot``'s tensors the layer's adapter (shared, not copied). The layer must have none."""
        if self.has_adapter:
            raise RuntimeError(f"put_adapter: the layer already holds adapter {self.adapter_name!r}")
        for f in self._adapter_fields:
            setattr(self, f, slot.fields[f])
        self.lora_A, self.lora_B, self.lora_dropout = slot.lora_A, slot.lora_B, slot.lora_dropout
        self.adapter_name = slot.adapter_name

    def clear_adapter(self) -> None:
        """Forget the layer's adapter without saving it (the layer must not be merged)."""
        if self.merged:
            raise RuntimeError("clear_adapter: unmerge the layer first")
        self._parameters.pop("lora_A", None)
        self._parameters.pop("lora_B", None)
        self.r, self.scaling = 0, 0.0
        self.lora_dropout = nn.Identity()

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self.has_adapter:
            return base
        return f"{base}, r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


class AdapterWeights(nn.Module):
    """One adapter of a :class:`LoRALayer` held outside the layer: ``lora_A``, ``lora_B``,
    ``lora_dropout`` and the layer's adapter fields (``r``, ``lora_alpha``, ``scaling``, ...; a
    MergedLinear adds ``enable_lora`` and ``split_sizes``), readable as attributes like the layer's own."""

    def __init__(self, adapter_name: str, fields: dict, lora_A: nn.Parameter, lora_B: nn.Parameter,
                 lora_dropout: nn.Module | None = None):
        super().__init__()
        self.adapter_name = adapter_name
        self.fields = dict(fields)
        self.lora_A, self.lora_B = lora_A, lora_B
        self.lora_dropout = lora_dropout if lora_dropout is not None else nn.Identity()

    def __getattr__(self, name: str):
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            return fields[name]
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.adapter_name!r}, " + ", ".join(f"{k}={v}" for k, v in self.fields.items())
