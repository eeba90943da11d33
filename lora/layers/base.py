"""LoRALayer: the one merge/unmerge state machine every LoRA layer shares.

A layer says only what its delta weight is (:meth:`LoRALayer.delta_weight`, in the layout of its
``weight``) and how its unmerged forward runs; merging, unmerging, train/eval switching and the
state-dict rules live here, once.

Merging keeps an exact copy of the base weight (``_unmerged_weight``, a non-persistent buffer) and
unmerging copies it back. That costs one extra copy of each merged weight while merged, and buys:
bit-exact unmerge in every dtype (subtracting ΔW again, as loralib does, drifts in bf16/fp16 and
even fp32), and a ``state_dict()`` that always holds the base weight, so a checkpoint saved in
eval mode is never merged a second time when loaded.

A weight Parameter that another module holds too (``shares_weight``: a tied ``lm_head`` and
``embed_tokens``) is never written: merging puts W + ΔW in a Parameter of the layer's own and
unmerging puts the shared one back, so the partner keeps computing with W. (Writing into it, as
PEFT does, would change the embedding as well, and merging both tied layers would add each ΔW to
both.) :func:`lora.layers.utils.mark_shared_weights` sets the flag from the model.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor, nn

from .. import functional as LF
from ..checks import check_alpha, check_dropout, check_rank

__all__ = [
    "LoRALayer",
    "AdapterWeights",
    "AdapterKey",
    "STORE",
    "adapter_state_keys",
    "route_adapter_key",
    "alpha_for_slices",
    "check_rank",
    "check_dropout",
    "check_alpha",
]

STORE = "lora_inactive"  # the ModuleDict of a layer's inactive adapters (several adapters only)

if TYPE_CHECKING:
    # The mixin is always combined with a torch layer; tell the type checker so.
    _ModuleBase = nn.Module
else:
    _ModuleBase = object


def alpha_for_slices(lora_alpha: float, k: int, use_rslora: bool) -> float:
    """The lora_alpha under which rank r·k has the scaling that rank r has under ``lora_alpha``:
    α·k (α/(r·k) = (α/r)), or α·√k with rank-stabilised scaling; α itself for k = 1."""
    if k == 1:
        return lora_alpha
    return lora_alpha * (math.sqrt(k) if use_rslora else k)


class LoRALayer(_ModuleBase):
    """Mixin for every LoRA layer; put it first among the bases: ``class Linear(LoRALayer, nn.Linear)``.

    Attributes: ``r``, ``lora_alpha``, ``scaling``, ``lora_dropout`` (``nn.Identity`` when p = 0),
    ``merge_weights`` (merge on ``eval()``, unmerge on ``train()``), ``merged``.
    Subclasses implement :meth:`delta_weight` and may override :attr:`has_adapter`.

    A layer kind also says, in its class, everything the rest of the package asks of it (see
    docs/architecture.md, "Adding a layer kind"): which torch modules it wraps (:meth:`accepts`,
    :meth:`wrap`), the plain module it unwraps to (:meth:`unwrap`), its key names and
    incompatibilities in PEFT's format (:attr:`peft_keys`, :meth:`peft_incompatibility`,
    :meth:`peft_shapes`), its one-LoRA form (:meth:`as_one_lora`) and its dropout. The adapter
    slots of several adapters (:meth:`store_adapter`, :meth:`activate_adapter`, :meth:`pop_adapter`,
    :meth:`put_adapter`) are the same for every kind and live here.
    """

    # What a layer kind declares (class attributes):
    # The adapter kind the file checks compare: linear, merged, embedding or conv.
    kind: ClassVar[str] = "linear"
    peft_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")  # PEFT's key names
    sliced_class: ClassVar[type[LoRALayer] | None] = None  # the kind over slices of this module
    # The torch constructor arguments that, read back from a module of this kind (attributes of the
    # same names), build one like it: its shapes and options, not bias, device or dtype.
    _torch_options: ClassVar[tuple[str, ...]] = ()

    if TYPE_CHECKING:  # set by the torch layer / _init_lora
        weight: Tensor
        lora_A: Tensor
        lora_B: Tensor
        lora_dropout: nn.Module
        use_rslora: bool
        _unmerged_weight: Tensor | None

    r: int
    lora_alpha: float
    scaling: float
    merged: bool
    merge_weights: bool
    # Whether another module of the model holds this layer's weight Parameter too (a tied head):
    # merging then never writes into it (see the module docstring; set by mark_shared_weights).
    shares_weight: bool = False
    # Several adapters (lora/multi.py) only: the name of the adapter the layer's LoRA parameters hold.
    adapter_name: str | None = "default"
    # The attributes that, with lora_A, lora_B and lora_dropout, make up one adapter (see pop_adapter).
    _adapter_fields: tuple[str, ...] = ("r", "lora_alpha", "use_rslora", "scaling")

    def _init_lora(
        self, r, lora_alpha, lora_dropout: float, merge_weights: bool, use_rslora: bool = False
    ) -> None:
        # Called after the torch base class's __init__ (so buffers can be registered).
        self.r = check_rank(r)
        self.lora_alpha = check_alpha(lora_alpha, zero_ok=self.r == 0)  # r=0: no adapter
        p = check_dropout(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = LF.lora_scaling(self.r, self.lora_alpha, self.use_rslora)
        self.lora_dropout = self.dropout_for(p)
        self.merge_weights = bool(merge_weights)
        self.merged = False
        self.register_buffer("_unmerged_weight", None, persistent=False)
        # State-dict keys that name the adapter when the layer holds several (see _adapter_keys).
        self._register_state_dict_hook(_named_adapter_keys)
        self._register_load_state_dict_pre_hook(_place_named_adapter_keys, with_module=True)
        self.register_load_state_dict_post_hook(_name_missing_adapter_keys)

    # --- what a layer must say ---------------------------------------------------------------
    @property
    def has_adapter(self) -> bool:
        """True when the layer carries LoRA parameters (r > 0)."""
        return self.r > 0

    def delta_weight(self) -> Tensor:
        """``scaling · ΔW`` in the layout and shape of ``self.weight`` (dtype of the LoRA parameters)."""
        raise NotImplementedError

    def _add_lora_parameters(self, a_shape, b_shape, dtype: torch.dtype | None = None) -> None:
        # lora_A and lora_B on the weight's device, in ``dtype`` (default: the weight's), initialised
        # by reset_lora_parameters; the weight is frozen.
        device, dtype = self.weight.device, self.weight.dtype if dtype is None else dtype
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))
        self.weight.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the base weight (as the torch layer does) and the LoRA parameters."""
        super().reset_parameters()  # type: ignore[misc]  # the torch layer's
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=√5), B zero: a fresh adapter adds nothing."""
        if "lora_A" in self._parameters:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    # --- building from an existing torch layer (model surgery) ----------------------------------
    def _adopt_base(
        self, base: nn.Module, lora_dtype: torch.dtype | None = None, init_lora_weights: bool = True
    ):
        """Take ``base``'s weight and bias Parameters (shared, not copied) and put the LoRA
        parameters on the base's device, in ``lora_dtype`` (default: the base weight's dtype).

        ``self`` was built on the meta device with the base's shapes; returns ``self``.
        """
        base_weight = cast(Tensor, base.weight)
        if not isinstance(base_weight, Tensor):  # a 4-bit holder (lora.quant.NF4Weight): a module
            del self.weight
        self.weight = base_weight
        # (through Module.__setattr__ as `self.bias = ...` would: the type checker keeps the torch
        # layer's declaration of bias)
        nn.Module.__setattr__(self, "bias", cast(Any, getattr(base, "bias", None)))
        if self.has_adapter:
            self._add_lora_parameters(self.lora_A.shape, self.lora_B.shape, lora_dtype)
            if not init_lora_weights:
                self.randomize_lora_parameters()
        # The replaced module is kept (unregistered: not in the module tree or the state dict) as
        # the shell that merge_and_unload puts back, so that any torch-like class round-trips.
        self.__dict__["_lora_base_module"] = base
        self.train(base.training)
        return self

    @torch.no_grad()
    def randomize_lora_parameters(self) -> None:
        """A non-zero adapter, as PEFT's ``init_lora_weights=False`` makes it: B Kaiming-uniform
        (a=√5), and A normal where it starts at zero (Embedding). Call it after
        :meth:`reset_lora_parameters`. On the meta device nothing is drawn (a layer built there,
        e.g. by the FSDP loader, gets its values later: it calls this once they exist)."""
        if self.lora_B.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        if not self.lora_A.any():  # Embedding's A starts at zero
            nn.init.normal_(self.lora_A)

    # --- the plain module (model surgery) --------------------------------------------------------
    @property
    def base_module(self) -> nn.Module | None:
        """The module :func:`lora.inject` replaced with this layer (sharing its weight and bias), or
        None for a layer built by hand. Not registered: not in the module tree or the state dict."""
        return self.__dict__.get("_lora_base_module")

    def unwrap(self) -> nn.Module:
        """The plain torch module holding this layer's current ``weight`` and ``bias`` (shared, not
        copied): :attr:`base_module` when there is one, else a new module of the torch base class
        (weight back in (out, in) layout for ``fan_in_fan_out``). Adds nothing: add
        :meth:`delta_weight` first to keep the adapter's effect. The module gets the layer's train
        mode. Raises ``RuntimeError`` when the layer is merged."""
        if self.merged:
            raise RuntimeError("unwrap: unmerge the layer first (the weight would keep ΔW)")
        weight: Tensor = self.weight
        plain = self.base_module
        if plain is None:
            plain = self._plain_like()
            if getattr(self, "fan_in_fan_out", False):  # a torch Linear stores (out, in)
                weight = nn.Parameter(
                    weight.detach().T.contiguous(), requires_grad=weight.requires_grad
                )
        plain.weight = weight
        if "bias" in plain._parameters:
            plain.bias = self.bias
        plain.train(self.training)
        return plain

    def _plain_like(self) -> nn.Module:
        """A torch layer of this layer's base class with its hyper-parameters, on meta."""
        raise TypeError(f"unwrap: no plain layer known for {type(self).__name__}")

    # --- what the layer kind says about its module (model surgery, adapter files) ----------------
    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this kind wraps ``module`` (a plain torch module, or a LoRA layer of the kind)."""
        return False

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        r: int,
        *,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        enable_lora=None,
        split_sizes=None,
        merge_weights: bool = False,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        init_lora_weights: bool = True,
    ) -> LoRALayer:
        """This kind's LoRA layer over ``module`` (see each kind's ``from_base``): the options
        a kind does not use (``fan_in_fan_out``, ``enable_lora``, ``split_sizes``) are ignored."""
        return cls.from_base(  # type: ignore[attr-defined]
            module,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            merge_weights=merge_weights,
            use_rslora=use_rslora,
            lora_dtype=lora_dtype,
            init_lora_weights=init_lora_weights,
            **cls._kind_options(module, fan_in_fan_out, enable_lora, split_sizes),
        )

    @classmethod
    def _kind_options(cls, module: nn.Module, fan_in_fan_out, enable_lora, split_sizes) -> dict:
        """The ``from_base`` options of :meth:`wrap` that only this kind takes (none here)."""
        return {}

    @classmethod
    def _options_of(cls, module: nn.Module) -> dict[str, Any]:
        """``module``'s values of :attr:`_torch_options` (what ``from_base`` and ``_plain_like`` pass)."""
        return {name: getattr(module, name) for name in cls._torch_options}

    @classmethod
    def peft_incompatibility(cls, module: nn.Module) -> str | None:
        """Why PEFT's LoRA layer for ``module`` computes something else than this kind, or None."""
        return None

    @classmethod
    def peft_shapes(
        cls,
        module: nn.Module,
        r: int,
        fan_in_fan_out: bool = False,
        enable_lora: tuple[bool, ...] = (),
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The (A, B) shapes of a rank-``r`` adapter for ``module`` in PEFT's file."""
        raise NotImplementedError

    # --- one adapter as one LoRA (adapter files, combining) -------------------------------------
    def as_one_lora(self, adapter: Any = None) -> tuple[Tensor, Tensor, float]:
        """``(A, B, scaling)`` with ΔW = scaling · B A as one LoRA over the layer's whole weight,
        for ``adapter`` (the layer itself by default, or one of its :class:`AdapterWeights`)."""
        adapter = self if adapter is None else adapter
        return adapter.lora_A, adapter.lora_B, adapter.scaling

    def one_lora_rank_alpha(self, adapter: Any = None) -> tuple[int, float]:
        """The (rank, lora_alpha) of :meth:`as_one_lora`'s form, with the same scaling."""
        adapter = self if adapter is None else adapter
        return adapter.r, adapter.lora_alpha

    def one_lora_fields(self, rank: int) -> dict[str, Any]:
        """The adapter fields of a rank-``rank`` one-LoRA adapter of scaling exactly 1 (its B
        carries the scaling), e.g. a combination of adapters."""
        return {"r": rank, "lora_alpha": float(rank), "use_rslora": False, "scaling": 1.0}

    def adapter_slices(self, adapter: Any, declared: dict[str, int] | None) -> list[str] | None:
        """The names of the model's ``declared`` fused slices that ``adapter`` adapts, or None when
        it is not an adapter over declared slices (it is then one LoRA over the whole weight)."""
        return None

    def slot_fields(
        self,
        r: int,
        lora_alpha: float,
        use_rslora: bool,
        enable_lora: tuple[bool, ...] = (),
        split_sizes: tuple[int, ...] = (),
    ) -> tuple[dict[str, Any], bool]:
        """The adapter fields under which this layer holds an adapter of rank ``r`` (per enabled
        slice, when ``enable_lora`` names slices of its output), and whether it holds such a
        sliced adapter's B as blocks (True) or as the one (out, r·k) LoRA over the whole weight
        (False)."""
        k = sum(enable_lora) if enable_lora else 1
        rank = r * k
        fields = {
            "r": rank,
            "lora_alpha": alpha_for_slices(lora_alpha, k, use_rslora),
            "use_rslora": use_rslora,
            "scaling": LF.lora_scaling(r, lora_alpha, use_rslora),
        }
        return fields, False

    def adapter_structure(self, adapter: Any = None) -> tuple:
        """What must agree for a file to load into ``adapter`` in place: ``(kind, r, ...)``."""
        adapter = self if adapter is None else adapter
        return (self.kind, adapter.r)

    def dropout_for(self, p: float) -> nn.Module:
        """The dropout module of an adapter with dropout probability ``p`` on this layer."""
        return nn.Dropout(p) if p > 0 else nn.Identity()

    # --- merging -----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Write ``W + scaling·ΔW`` into ``self.weight``. Idempotent: merging a merged layer does nothing."""
        if self.merged or not self.has_adapter:
            return
        if not isinstance(self.weight, Tensor):  # a 4-bit base (lora.quant): see docs/qlora.md
            raise RuntimeError(
                f"{type(self).__name__}.merge: the base weight is 4-bit NF4; merging the adapter "
                "into it would lose the adapter's precision. Keep merge_weights=False, or call "
                "lora.merge_and_unload(model), which dequantises to 16 bits first"
            )
        if self.shares_weight:  # the shared Parameter itself is put back by unmerge
            self.__dict__["_shared_weight"] = self.weight
            self._unmerged_weight = self.weight.detach()
        else:
            self._unmerged_weight = self.weight.detach().clone()
        self.add_delta_to_weight()
        self.merged = True

    @torch.no_grad()
    def add_delta_to_weight(self) -> None:
        """``weight += scaling·ΔW``: in place, or, where the weight is shared with another module
        (:attr:`shares_weight`), into a new Parameter of this layer's own (same requires_grad)."""
        delta = self.delta_weight().to(self.weight.dtype)
        if self.shares_weight:
            grad = self.weight.requires_grad
            self.weight = nn.Parameter(self.weight.detach() + delta, requires_grad=grad)
        else:
            self.weight.add_(delta)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly. Idempotent."""
        if not self.merged:
            return
        shared = self.__dict__.pop("_shared_weight", None)
        if shared is not None:
            self.weight = shared
        else:
            self.weight.copy_(cast(Tensor, self._unmerged_weight))
        self._unmerged_weight = None
        self.merged = False

    @property
    def base_weight(self) -> Tensor:
        """The base weight Parameter: ``weight`` unmerged, or the shared Parameter that a merged
        layer with :attr:`shares_weight` puts back on unmerge."""
        return self.__dict__.get("_shared_weight", self.weight)

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

    # --- state-dict keys of several adapters ------------------------------------------------
    # Physically the active adapter is ``lora_A``/``lora_B`` and the others are under
    # ``lora_inactive``, so physical keys would change with set_adapter (and a state dict saved
    # with "a" active would load a's tensors into whichever adapter is active). The keys
    # therefore name the adapter:
    #   one adapter in the layer (active or not): ``lora_A``, ``lora_B`` (loralib's keys);
    #   several: ``lora_A.<name>``, ``lora_B.<name>`` for each, whichever is active.
    def held_adapters(self) -> dict[str, Any]:
        """Every adapter the layer holds, name -> the layer itself (the active one) or its
        AdapterWeights (an inactive one), active first."""
        held: dict[str, Any] = {}
        if self.has_adapter and self.adapter_name is not None:
            held[self.adapter_name] = self
        store = self.inactive_adapters
        if store is not None:
            held.update(store.items())
        return held

    def _physical_prefix(self, name: str) -> str:
        # Where adapter ``name``'s lora_A / lora_B live under the layer's state-dict prefix.
        return "" if self.has_adapter and self.adapter_name == name else f"{STORE}.{name}."

    # --- several adapters: an extension (lora/multi.py drives it); one adapter needs none of this ---
    # The active adapter lives in the layer's own lora_A / lora_B (so forward, merging and the state
    # dict are those of a one-adapter layer); the others in the ``lora_inactive`` ModuleDict.
    @property
    def active_adapter_name(self) -> str | None:
        """The name of the adapter the layer runs, or None when it runs its base layer."""
        return self.adapter_name if self.has_adapter else None

    @property
    def inactive_adapters(self) -> nn.ModuleDict | None:
        """The layer's inactive adapters (name -> :class:`AdapterWeights`), or None if none."""
        return self._modules.get(STORE)  # type: ignore[return-value]

    def get_adapter(self, name: str | None) -> Any:
        """The layer itself when ``name`` is its active adapter, its stored AdapterWeights when
        inactive, else None. Either way the result has ``lora_A``, ``lora_B``, ``r``,
        ``scaling``, ..."""
        if self.active_adapter_name == name:
            return self
        store = self.inactive_adapters
        return store[name] if name is not None and store is not None and name in store else None

    def store_adapter(self, slot: AdapterWeights) -> None:
        """Keep ``slot`` in the layer as an inactive adapter, in the layer's train/eval mode (a
        new slot's dropout would otherwise run in training mode inside an eval model)."""
        slot.train(self.training)
        store = self.inactive_adapters
        if store is None:
            store = nn.ModuleDict()
            self.add_module(STORE, store)
        store[slot.adapter_name] = slot

    def _drop_empty_store(self) -> None:
        store = self.inactive_adapters
        if store is not None and len(store) == 0:
            del self._modules[STORE]

    def activate_adapter(self, name: str | None, merge: bool | None = None) -> None:
        """Run adapter ``name`` (None: the base layer), storing the active one. The new adapter
        is merged when ``merge`` says so; by default when the layer was merged, or merges in
        eval mode."""
        if self.active_adapter_name == name:
            return
        was_merged = self.merged
        slot = self.pop_adapter()
        if slot is not None:
            self.store_adapter(slot)
        store = self.inactive_adapters
        if name is not None and store is not None and name in store:
            self.put_adapter(cast(AdapterWeights, store.pop(name)))
            if merge is None:
                merge = was_merged or (self.merge_weights and not self.training)
            if merge:
                self.merge()
        self._drop_empty_store()

    def delete_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (active or stored); nothing happens when the layer lacks it."""
        if self.active_adapter_name == name:
            self.pop_adapter()
            return
        store = self.inactive_adapters
        if store is not None and name in store:
            del store[name]
            self._drop_empty_store()

    def pop_adapter(self) -> AdapterWeights | None:
        """Take the layer's adapter out (unmerging first) and return it; the layer is left without one
        (r = 0: it computes its base layer). None when the layer has no adapter."""
        if not self.has_adapter:
            return None
        self.unmerge()
        slot = AdapterWeights(
            cast(str, self.adapter_name),
            {f: getattr(self, f) for f in self._adapter_fields},
            cast(nn.Parameter, self._parameters["lora_A"]),
            cast(nn.Parameter, self._parameters["lora_B"]),
            self.lora_dropout,
        )
        self.clear_adapter()
        return slot

    def put_adapter(self, slot: AdapterWeights) -> None:
        """Make ``slot``'s tensors the layer's adapter (shared, not copied). The layer must have none."""
        if self.has_adapter:
            raise RuntimeError(
                f"put_adapter: the layer already holds adapter {self.adapter_name!r}"
            )
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


_LORA_PARAMS = ("lora_A", "lora_B")


class AdapterKey(NamedTuple):
    """What a state-dict key of a layer's LoRA tensors says when loading (:func:`route_adapter_key`)."""

    param: str  # "lora_A" or "lora_B"
    name: str  # the adapter the key names ("lora_A.<name>"); "" for loralib's unnamed "lora_A"
    adapter: str | None  # the adapter whose tensor it is, wherever that lives now; None: no place
    problem: str  # why it has no place that is certainly right (when adapter is None), else ""
    peft: bool = False  # no place, and named as PEFT's adapter_model file names it (lora_A.weight)


def adapter_state_keys(layer: LoRALayer) -> dict[str, tuple[str, str]]:
    """The state-dict keys of the LoRA tensors of every adapter ``layer`` holds, relative to the
    layer, -> ``(adapter, parameter)``: loralib's ``lora_A`` / ``lora_B`` when it holds one (active
    or not), ``lora_A.<name>`` / ``lora_B.<name>`` for each when it holds several. The one naming
    rule of :meth:`~torch.nn.Module.state_dict` and ``load_state_dict`` (and the single-file loader)."""
    held = layer.held_adapters()
    one = len(held) == 1
    return {(p if one else f"{p}.{name}"): (name, p) for name in held for p in _LORA_PARAMS}


def peft_named_problem(rest: str, want: str) -> str:
    """Why a key ending in ``rest`` (``lora_A.weight``, ``lora_embedding_A``: PEFT's adapter_model
    names) has no place in a state dict, whose key for that tensor is ``want`` (``fc.lora_A``)."""
    return (
        f"named as in a PEFT adapter_model file (<m>.{rest}), not as a state dict names it "
        f"({want}, or {want}.<adapter> for one of several adapters)"
    )


def route_adapter_key(layer: LoRALayer, rest: str, where: str) -> AdapterKey | None:
    """Loading, the inverse of :func:`adapter_state_keys`: where the key ``rest`` (relative to the
    layer named ``where``) goes. ``lora_A.<name>`` fills adapter ``name``; loralib's ``lora_A`` the
    layer's only adapter. A key naming an adapter the layer does not hold, or an unnamed key while
    it holds several, has no place (``adapter`` None, ``problem`` says why; ``peft`` when it is
    named as PEFT's files name it, ``lora_A.weight``, and the layer holds no adapter "weight").
    None when ``rest`` is not a LoRA tensor's key, or is unnamed and the layer holds no adapter."""
    param, _, name = rest.partition(".")
    if param not in _LORA_PARAMS:
        return None
    held = list(layer.held_adapters())
    if name:
        if name in held:
            return AdapterKey(param, name, name, "")
        if rest in layer.peft_keys:  # lora_A.weight: PEFT's name, not an adapter named "weight"
            want = f"{where}.{param}" if where else param
            problem = (
                f"{peft_named_problem(rest, want)}; the layer {where!r} holds no adapter "
                f"{name!r} (it holds {held})"
            )
            return AdapterKey(param, name, None, problem, peft=True)
        problem = (
            f"the state dict names adapter {name!r}, which the layer {where!r} does not hold "
            f"(it holds {held})"
        )
        return AdapterKey(param, name, None, problem)
    if len(held) > 1:
        problem = (
            f"a key without an adapter name, but the layer {where!r} holds adapters {held}; a "
            f"state dict of several adapters names each ({param}.<name>)"
        )
        return AdapterKey(param, "", None, problem)
    return AdapterKey(param, "", held[0], "") if held else None


def _named_adapter_keys(layer: LoRALayer, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: rewrite the layer's physical LoRA keys as keys that name the adapter
    (``lora_A.<name>``) when it holds several, or as loralib's ``lora_A`` for its one adapter."""
    held = layer.held_adapters()
    if not held or (len(held) == 1 and layer.has_adapter):
        return  # nothing, or one active adapter: the physical keys are loralib's already
    entries = []
    for key, (name, p) in adapter_state_keys(layer).items():
        physical = prefix + layer._physical_prefix(name) + p
        if physical in state_dict:
            entries.append((physical, prefix + key))
    for old, new in entries:
        state_dict[new] = state_dict.pop(old)


def _place_named_adapter_keys(
    layer: LoRALayer,
    state_dict,
    prefix,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """Load pre-hook, the inverse of :func:`_named_adapter_keys` (:func:`route_adapter_key`):
    ``lora_A.<name>`` goes to adapter ``name`` wherever it now lives (active or not); loralib's
    ``lora_A`` to the layer's only adapter. A key naming an adapter the layer does not hold, or an
    unnamed key when it holds several, is an error naming the adapters (whatever ``strict`` says:
    the tensors have no place that is certainly right)."""
    layer.__dict__["_lora_load_prefix"] = prefix  # for _name_missing_adapter_keys
    moves = []
    for key in [k for k in state_dict if k.startswith(prefix)]:
        route = route_adapter_key(layer, key[len(prefix) :], prefix[:-1])
        if route is None:
            continue  # not a LoRA key, or one torch reports as unexpected
        if route.adapter is None:
            error_msgs.append(f"{key}: {route.problem}")
            moves.append((key, None))
        else:
            moves.append((key, prefix + layer._physical_prefix(route.adapter) + route.param))
    for old, new in moves:
        tensor = state_dict.pop(old)
        if new is not None:
            state_dict[new] = tensor


def _name_missing_adapter_keys(layer: LoRALayer, incompatible) -> None:
    """Load post-hook: report a missing LoRA tensor under the key the state dict should have
    held (``lora_A.<name>``), not under where the adapter happens to live now."""
    prefix = layer.__dict__.pop("_lora_load_prefix", None)
    if prefix is None or not layer.held_adapters():
        return
    names = {
        prefix + layer._physical_prefix(name) + p: prefix + key
        for key, (name, p) in adapter_state_keys(layer).items()
    }
    missing = incompatible.missing_keys
    missing[:] = [names.get(k, k) for k in missing]


class AdapterWeights(nn.Module):
    """One adapter of a :class:`LoRALayer` held outside the layer: ``lora_A``, ``lora_B``,
    ``lora_dropout`` and the layer's adapter fields (``r``, ``lora_alpha``, ``scaling``, ...; a
    MergedLinear adds ``enable_lora`` and ``split_sizes``), readable as attributes like the layer's own."""

    def __init__(
        self,
        adapter_name: str,
        fields: dict,
        lora_A: nn.Parameter,
        lora_B: nn.Parameter,
        lora_dropout: nn.Module | None = None,
    ):
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
