"""Target matching: which modules of a model get which LoRA layer.

Matching (PEFT's rules): a list entry matches a module whose name equals it or ends with
``"." + entry``; a string is a regex that must match the whole module name; ``"all-linear"`` is
every ``nn.Linear`` (and GPT-2-style Conv1D) but the output head. A list entry may name slices of a
fused projection, ``"qkv_proj[q,v]"``: the layer becomes a :class:`~lora.MergedLinear` over those
slices, with the sizes the model declares (:func:`fused_splits`).

What a layer kind wraps, and how, is each layer class's business (``accepts``, ``wrap``); this
module only asks :data:`lora.layers.LAYER_KINDS` in order. Used by :mod:`lora.surgery` (inject),
:mod:`lora.adapters` (what an adapter file asks of each module) and :mod:`lora.multi`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .checks import listing
from .config import LoRAConfig, parse_target
from .layers import LAYER_KINDS, LoRALayer, is_gpt2_conv1d
from .layers.saved import ModulesToSaveWrapper

__all__ = [
    "InjectionError",
    "SavedTargetWarning",
    "TargetPlan",
    "fused_splits",
    "FUSED_LAYOUTS",
    "is_linear",
    "is_gpt2_conv1d",
    "layer_class_for",
    "lora_layer_for",
    "resolve_lora_dtype",
    "modules_to_save_for",
    "saved_owners",
    "sharded_copies_problem",
    "saved_copies",
    "tied_partners",
    "wrap_modules_to_save",
    "output_head_names",
    "set_submodule",
    "suffix_match",
    "saved_match",
]


class InjectionError(ValueError):
    """The config does not fit the model: targets that match nothing or an unsupported module."""


class SavedTargetWarning(UserWarning):
    """:func:`lora.inject`: target_modules match modules that modules_to_save trains in full; those
    get no LoRA layer (PEFT's rule; :class:`TargetPlan`)."""


# --- layer kinds ---------------------------------------------------------------------------------
def is_linear(module: nn.Module, existing_ok: bool = False) -> bool:
    """A plain ``nn.Linear`` or GPT-2 Conv1D; with ``existing_ok`` also a Linear/MergedLinear."""
    if isinstance(module, LoRALayer) and not existing_ok:
        return False
    cls = layer_class_for(module)
    return cls is not None and cls.kind == "linear"


def layer_class_for(module: nn.Module, sliced: bool = False) -> type[LoRALayer] | None:
    """The LoRA layer class for ``module`` (the first of :data:`~lora.layers.LAYER_KINDS` that
    accepts it; a LoRA layer counts as the kind it is), or its ``sliced_class`` for fused slices.
    None when no kind takes it (or, with ``sliced``, when its kind has no sliced form)."""
    for cls in LAYER_KINDS:
        if cls.accepts(module):
            return cls.sliced_class if sliced else cls
    return None


def lora_layer_for(
    module: nn.Module,
    r: int,
    *,
    split: Mapping[str, int] | None = None,
    slices=None,
    **options: Any,
) -> LoRALayer:
    """The LoRA layer for ``module``: the class :func:`layer_class_for` names, built over it
    (sharing its weight and bias; see each class's ``wrap``/``from_base``).

    ``split`` (slice name -> rows) with ``slices`` (the names to adapt) makes a MergedLinear over
    those slices of a fused Linear. ``options``: lora_alpha, lora_dropout, fan_in_fan_out,
    merge_weights, use_rslora, lora_dtype, init_lora_weights. Raises :class:`InjectionError` for a
    module no layer kind takes.
    """
    cls = layer_class_for(module, sliced=split is not None)
    if cls is None:
        raise InjectionError(
            f"{type(module).__name__}: no LoRA layer for it "
            "(supported: Linear, Embedding, Conv1d/2d/3d; slices need a fused Linear)"
        )
    if split is not None:
        chosen = slices if slices is not None else tuple(split)
        options.update(enable_lora=[s in chosen for s in split], split_sizes=list(split.values()))
    return cls.wrap(module, r, **options)


def resolve_lora_dtype(weight: torch.Tensor, lora_dtype) -> torch.dtype:
    """The dtype of the LoRA parameters over ``weight``: "auto" (fp32 over a bf16/fp16 base, as
    PEFT: their updates are tiny), None (the base dtype) or a torch.dtype; else ``TypeError``."""
    if lora_dtype == "auto":
        return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    if lora_dtype is None:
        return weight.dtype
    if not isinstance(lora_dtype, torch.dtype):
        raise TypeError(f"lora_dtype={lora_dtype!r}: expected a torch.dtype, 'auto' or None")
    if not lora_dtype.is_floating_point or lora_dtype.is_complex:
        raise TypeError(
            f"lora_dtype={lora_dtype}: expected a floating-point dtype (LoRA weights "
            "are trained by gradient), such as torch.float32 or torch.bfloat16"
        )
    return lora_dtype


# --- names ---------------------------------------------------------------------------------------
def suffix_match(name: str, suffix: str) -> bool:
    """PEFT's rule for target_modules: ``name`` equals ``suffix`` or ends with ``"." + suffix``."""
    return name == suffix or name.endswith("." + suffix)


def saved_match(name: str, entry: str) -> bool:
    """PEFT's rule for modules_to_save (``_set_trainable``): ``name`` ends with ``entry`` as a
    string, not only at a dot: ``"norm"`` names ``model.norm`` and every
    ``input_layernorm`` and ``post_attention_layernorm`` too, ``"head"`` names ``lm_head``."""
    return name.endswith(entry)


def output_head_names(model: nn.Module) -> set[str]:
    """The names of the model's output head, which ``"all-linear"`` leaves out: the module
    ``get_output_embeddings()`` returns (a transformers model's, or lora.models'), as PEFT does.
    A model without one has none: PEFT then adapts a module named ``lm_head`` like any Linear."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()  # type: ignore[operator]
        except (NotImplementedError, AttributeError):
            head = None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def uncalled_linears(modules: dict[str, nn.Module]) -> list[str]:
    """The names of the Linear modules whose parent computes with their weight without calling
    them: the ``out_proj`` of every ``nn.MultiheadAttention`` (its forward hands
    ``out_proj.weight`` to ``F.multi_head_attention_forward``). A LoRA layer there would change
    nothing and get no gradient (PEFT wraps it all the same), so ``"all-linear"`` leaves them out
    and naming one is an :class:`InjectionError`."""
    return [
        f"{n}.out_proj" if n else "out_proj"
        for n, m in modules.items()
        if isinstance(m, nn.MultiheadAttention)
    ]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` in ``model``, replacing what is there, and at every other
    name that same module object is registered under (one module reachable by two names, as
    T5's shared embedding): a path through the other name would otherwise skip the new module."""
    old = model.get_submodule(name)
    places = [
        (parent, child)
        for parent in model.modules()
        for child, m in parent._modules.items()
        if m is old
    ]
    for parent, child in places:
        setattr(parent, child, module)


def module_aliases(model: nn.Module) -> dict[str, list[str]]:
    """First name (as ``named_modules`` gives it) -> the other names of each module that is
    registered under more than one; empty for most models."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if id(m) not in first:
            first[id(m)] = n
        elif n:
            aliases.setdefault(first[id(m)], []).append(n)
    return aliases


# --- fused projections -----------------------------------------------------------------------
def _phi3_layout(config) -> dict[str, dict[str, int]]:
    from .models.phi3 import fused_layout  # the model's own function, shared with its attention

    return fused_layout(config)  # type: ignore[return-value]  # OrderedDicts


# Hugging Face ``config.model_type`` -> the fused layout of that architecture, for models that do
# not declare ``fused_splits`` themselves.
FUSED_LAYOUTS: dict[str, Callable[[Any], dict[str, dict[str, int]]]] = {"phi3": _phi3_layout}


def fused_splits(model: nn.Module) -> dict[str, dict[str, int]]:
    """The fused projections of ``model`` and their slices:
    ``{"qkv_proj": {"q": 3072, "k": 3072, "v": 3072}, ...}``.

    From ``model.fused_splits`` when the model declares it (lora's Phi-3 does), else from the layout
    :data:`FUSED_LAYOUTS` registers for its Hugging Face ``config.model_type`` (Phi-3: "phi3").
    Empty when neither applies: other architectures have no fused slices to name.
    """
    declared = getattr(model, "fused_splits", None)
    if isinstance(declared, dict):
        return declared
    cfg = getattr(model, "config", None)
    layout = FUSED_LAYOUTS.get(getattr(cfg, "model_type", None))  # type: ignore[arg-type]
    if layout is None or not getattr(cfg, "num_attention_heads", None):
        return {}
    return layout(cfg)


# --- the plan ------------------------------------------------------------------------------------
class TargetPlan:
    """Which module gets which LoRA layer: ``targets = {module name: slices or None}``, checked
    against the model (raises :class:`InjectionError` naming what does not fit).

    ``existing_ok``: the model may already hold LoRA layers (loading an adapter into it, or adding a
    named one); each counts as the torch layer it wraps, and the modules inside it are not
    candidates.
    ``modules``: ``dict(model.named_modules())`` when the caller has it already.

    PEFT's rule for an overlap with ``config.modules_to_save``: a module that it names (with
    ``ensure_weight_tying``, also a tied partner of one), or one inside such a module, is trained in
    full (the adapter's copy of the module) and gets no LoRA layer. ``saved_targets``: each such
    module that target_modules matched -> the modules_to_save module it is or lies in. Nothing
    left to adapt is an :class:`InjectionError`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoRAConfig,
        existing_ok: bool = False,
        modules: dict[str, nn.Module] | None = None,
    ):
        self.model, self.config, self.existing_ok = model, config, existing_ok
        self.modules = modules if modules is not None else dict(model.named_modules())
        # Not candidates: the modules inside a LoRA layer (with existing_ok) and inside a
        # modules_to_save wrapper (its original and copies are trained in full, never adapted).
        inside = tuple(
            f"{n}."
            for n, m in self.modules.items()
            if n
            and (isinstance(m, ModulesToSaveWrapper) or (existing_ok and isinstance(m, LoRALayer)))
        )
        self.names = [n for n in self.modules if n and not (inside and n.startswith(inside))]
        # A module under several names is one target: any of its names matches it.
        self.aliases = module_aliases(model)
        self.uncalled = uncalled_linears(self.modules)
        self.splits = fused_splits(model)
        self.targets: dict[str, tuple[str, ...] | None] = {}
        self.saved_targets: dict[str, str] = {}
        self._match_targets()
        self._drop_excluded()
        self._drop_saved()
        self._check_types()

    def _names_of(self, name: str) -> list[str]:
        return [name, *self.aliases.get(name, ())]

    def split_for(self, name: str) -> dict[str, int]:
        """The declared slices of the fused module ``name`` (a targeted one with slices)."""
        return self.splits[name.rpartition(".")[2]]

    def _match_targets(self) -> None:
        targets = self.config.target_modules
        if targets is None:
            raise InjectionError(
                "target_modules=None: name the modules to adapt (a list of names, a regex, or 'all-linear')"
            )
        if not isinstance(targets, str) and len(targets) == 0:
            raise InjectionError(
                "target_modules=[]: nothing to adapt; name the modules to adapt "
                "(a list of names, a regex, or 'all-linear')"
            )
        if targets == "all-linear":
            heads = output_head_names(self.model)
            skip = heads | set(self.uncalled)
            self.targets = {
                n: None for n in self.names if self._linear(self.modules[n]) and n not in skip
            }
            if not self.targets:
                raise InjectionError(
                    "target_modules='all-linear': the model has no Linear layer besides its output head"
                )
            return
        if isinstance(targets, str):
            self.targets = {
                n: None
                for n in self.names
                if any(re.fullmatch(targets, a) for a in self._names_of(n))
            }
            if not self.targets:
                raise InjectionError(
                    f"target_modules={targets!r}: the regex matches no module name"
                )
            return
        unmatched = []
        for entry in targets:
            suffix, slices = parse_target(entry)
            hits = [
                n for n in self.names if any(suffix_match(a, suffix) for a in self._names_of(n))
            ]
            if not hits:
                unmatched.append(entry)
            for n in hits:
                if n in self.targets and self.targets[n] != slices:
                    raise InjectionError(
                        f"target_modules: module {n!r} is named twice with different slices"
                    )
                self.targets[n] = slices
        # In the model's order, not the entries': layers are built (and draw their init) in this
        # order, so ["q_proj", "v_proj"] and ["v_proj", "q_proj"] must give the same adapter.
        self.targets = {n: self.targets[n] for n in self.names if n in self.targets}
        if unmatched:
            example = ", ".join(sorted({n.split(".")[-1] for n in self.names})[:12])
            raise InjectionError(
                f"target_modules: {unmatched!r} match no module of {type(self.model).__name__} "
                f"(module names end with e.g. {example})"
            )

    def _drop_excluded(self) -> None:
        excl = self.config.exclude_modules
        if excl is None:
            return
        if isinstance(excl, str):
            drop = {
                n for n in self.targets if any(re.fullmatch(excl, a) for a in self._names_of(n))
            }
        else:
            drop = {
                n
                for n in self.targets
                if any(suffix_match(a, e) for a in self._names_of(n) for e in excl)
            }
        for n in drop:
            del self.targets[n]
        if not self.targets:
            raise InjectionError(
                f"exclude_modules={excl!r} excludes every module that target_modules matched"
            )

    def _drop_saved(self) -> None:
        if not self.config.modules_to_save:
            return
        owners = saved_owners(self.model, self.config, self.modules)
        problem = sharded_copies_problem(
            [o for o in owners if not isinstance(self.modules[o], ModulesToSaveWrapper)],
            self.modules,
        )
        if problem is not None:
            raise InjectionError(problem)
        for o in owners:  # a copy made now would copy the other adapters' LoRA layers inside it
            if isinstance(self.modules[o], ModulesToSaveWrapper):
                continue
            held = [
                n
                for n, m in self.modules.items()
                if isinstance(m, LoRALayer) and (n == o or n.startswith(o + "."))
            ]
            if held:
                raise InjectionError(
                    f"modules_to_save: {o!r} holds LoRA layers of the model's adapters "
                    f"({listing(held, 6)}); a copy of it trained in full cannot hold them: load "
                    "this adapter into a model without them (or leave the module out of one of the two)"
                )
        for n in self.targets:
            owner = next((o for o in owners if n == o or n.startswith(o + ".")), None)
            if owner is not None:
                self.saved_targets[n] = owner
        for n in self.saved_targets:
            del self.targets[n]
        if not self.targets:
            raise InjectionError(
                f"target_modules={self.config.target_modules!r} match only modules that "
                f"modules_to_save={self.config.modules_to_save!r} trains in full "
                f"({listing(sorted(self.saved_targets), 8)}): nothing left to adapt; a module is "
                "either adapted or trained in full, so name other modules in target_modules "
                "(or drop them from modules_to_save)"
            )

    def saved_targets_warning(self) -> str | None:
        """What :func:`lora.inject` warns about :attr:`saved_targets` (None when there are none):
        the modules, the pattern and the modules_to_save entry, and how to say it explicitly."""
        if not self.saved_targets:
            return None
        by_owner: dict[str, list[str]] = {}
        for n, owner in self.saved_targets.items():
            by_owner.setdefault(owner, []).append(n)
        parts = [
            f"{owner!r} ({'is that module' if names == [owner] else 'holds ' + listing(names, 6)})"
            for owner, names in by_owner.items()
        ]
        return (
            f"target_modules={self.config.target_modules!r} match modules that "
            f"modules_to_save={self.config.modules_to_save!r} trains in full: "
            f"{'; '.join(parts)}. As in PEFT they get no LoRA layer (the adapter's copy of the "
            "module trains them in full, and the adapter file holds that copy); add them to "
            f"exclude_modules={sorted(self.saved_targets)!r} to say so, or drop the module "
            "from modules_to_save to adapt them with LoRA"
        )

    def _linear(self, m: nn.Module) -> bool:
        return is_linear(m, existing_ok=self.existing_ok)

    def _check_types(self) -> None:
        bad = []
        splits = self.splits
        uncalled = [n for n in self.targets if n in self.uncalled]
        if uncalled:
            raise InjectionError(
                f"target_modules match {listing(uncalled)}: the out_proj of nn.MultiheadAttention, "
                "which computes with out_proj.weight itself and never calls out_proj, so a LoRA "
                "layer there would change nothing and train nothing; leave them out "
                f"(exclude_modules={uncalled!r}), or use an attention that calls its projections"
            )
        for n, slices in self.targets.items():
            m = self.modules[n]
            computed = _computed_weight(m)
            if computed is not None:
                bad.append(f"{n} ({type(m).__name__}: {computed})")
                continue
            if isinstance(m, LoRALayer) and not self.existing_ok:
                raise InjectionError(
                    f"module {n!r} is already a LoRA layer: lora.inject was applied to this model before"
                )
            if slices is not None:
                if not self._linear(m):
                    bad.append(f"{n} ({type(m).__name__}: slices need a fused Linear)")
                    continue
                suffix = n.split(".")[-1]
                known = splits.get(suffix)
                if known is None:
                    raise InjectionError(
                        f"target {suffix}[{','.join(slices)}]: {type(self.model).__name__} declares no fused slices "
                        f"for {suffix!r} (it declares: {sorted(splits) or 'none'}); set model.fused_splits"
                    )
                unknown = [s for s in slices if s not in known]
                if unknown:
                    raise InjectionError(
                        f"target {suffix}[{','.join(slices)}]: unknown slice(s) {unknown}; {suffix} has {list(known)}"
                    )
                out_rows = _out_rows(m)
                if sum(known.values()) != out_rows:
                    raise InjectionError(
                        f"module {n!r}: its slices {known} sum to {sum(known.values())}, but it has {out_rows} output rows"
                    )
            elif not (
                self._linear(m)
                or (layer_class_for(m) is not None and not isinstance(m, LoRALayer))
                or (self.existing_ok and isinstance(m, LoRALayer))
            ):
                bad.append(f"{n} ({type(m).__name__})")
        if bad:
            raise InjectionError(
                "target_modules match modules that cannot take LoRA (supported: Linear, Embedding, Conv1d/2d/3d): "
                + ", ".join(bad)
            )


def _computed_weight(m: nn.Module) -> str | None:
    """Why ``m``'s weight is not a Parameter a LoRA layer can share, or None: a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``, ...) or an old-style hook (``spectral_norm``)
    computes it from other parameters on every forward."""
    if parametrize.is_parametrized(m, "weight"):
        return (
            "its weight is computed by a parametrization (weight_norm, orthogonal, ...); remove it "
            "first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))"
        )
    weight = m.__dict__.get("weight")  # spectral_norm keeps a plain tensor here, beside weight_orig
    if isinstance(weight, Tensor) and not isinstance(weight, nn.Parameter):
        return (
            "its weight is a tensor computed by a forward hook (spectral_norm, ...), not a "
            "Parameter; remove the hook first (torch.nn.utils.remove_spectral_norm)"
        )
    return None


def _out_rows(m: nn.Module) -> int:
    weight = cast(torch.Tensor, m.weight)
    if isinstance(m, LoRALayer):
        return cast(int, m.out_features)
    return weight.shape[1] if is_gpt2_conv1d(m) else weight.shape[0]


def modules_to_save_for(
    model: nn.Module, config: LoRAConfig, modules: dict[str, nn.Module] | None = None
) -> dict[str, nn.Module]:
    """The modules that ``config.modules_to_save`` names (trained in full, saved with the adapter;
    a module is named when its name ends with an entry, as a string: :func:`saved_match`):
    name -> the plain module, or its :class:`~lora.layers.saved.ModulesToSaveWrapper` once wrapped
    (the modules inside a wrapper or a LoRA layer are not candidates). ``modules``:
    ``dict(model.named_modules())`` when the caller has it. Raises :class:`InjectionError` for an entry that matches no module, and
    for one that names a container without a forward of its own (an ``nn.ModuleList`` such as a
    model's ``layers``): a wrapper runs the module in its place, and the parent iterates or indexes
    it, which a wrapper cannot stand in for; the message names the modules in it to list instead.
    A module inside another one found is left out: the outer one's copy trains it."""
    if not config.modules_to_save:
        return {}
    if modules is None:
        modules = dict(model.named_modules())
    # Not candidates: what a wrapper or a LoRA layer holds (a LoRA layer's adapter slots are named
    # after their adapters: "q_proj.lora_inactive.own_head" must not answer to "head").
    inside = tuple(
        f"{n}." for n, m in modules.items() if isinstance(m, (ModulesToSaveWrapper, LoRALayer))
    )
    names = [n for n in modules if n and not (inside and n.startswith(inside))]
    found: dict[str, nn.Module] = {}
    missing = []
    for entry in config.modules_to_save:
        hits = {n: modules[n] for n in names if saved_match(n, entry)}
        if not hits:
            missing.append(entry)
        for n, m in hits.items():
            if not isinstance(m, ModulesToSaveWrapper) and type(m).forward is nn.Module.forward:
                children = [f"{entry}.{c}" for c, _ in m.named_children()]
                instead = (
                    "name the modules in it instead: modules_to_save=["
                    + listing([repr(c) for c in children], 4)
                    + "]"
                    if children
                    else "it holds no module to train"
                )
                raise InjectionError(
                    f"modules_to_save entry {entry!r} names {n!r}, a {type(m).__name__}: a "
                    f"container without a forward of its own, which a modules_to_save wrapper "
                    f"cannot stand in for; {instead}"
                )
        found.update(hits)
    # An entry naming only modules inside a wrapper that another entry names (``down_proj``, all
    # inside a wrapped ``mlp``) names something: that wrapper's copy trains them.
    wrapped = tuple(f"{n}." for n, m in found.items() if isinstance(m, ModulesToSaveWrapper))
    held = tuple(f"{n}." for n, m in modules.items() if isinstance(m, LoRALayer))
    covered = [n for n in modules if wrapped and n.startswith(wrapped)]
    covered = [n for n in covered if not (held and n.startswith(held))]
    missing = [e for e in missing if not any(saved_match(n, e) for n in covered)]
    if missing:
        raise InjectionError(
            f"modules_to_save: {missing!r} match no module of {type(model).__name__}"
        )
    # A module inside another one named (``o_proj`` inside ``layers.1``) is trained in full by
    # that one's copy: no wrapper of its own (one inside the copy would nest them), as in PEFT.
    # In the model's order, not the entries': a tied partner of two named modules shares the
    # copy of the first (wrap_modules_to_save), which must not depend on how the entries run.
    outer = tuple(f"{n}." for n in found)
    return {n: found[n] for n in names if n in found and not n.startswith(outer)}


def _own_weight(module: nn.Module) -> Tensor | None:
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    return weight


def saved_owners(model: nn.Module, config: LoRAConfig, modules: dict[str, nn.Module]) -> list[str]:
    """The modules that get a copy for ``config``'s adapter: those modules_to_save names and,
    with ``ensure_weight_tying``, their tied partners (wrapped too: :func:`wrap_modules_to_save`)."""
    owners = list(modules_to_save_for(model, config, modules))
    if config.ensure_weight_tying:
        for n in list(owners):
            owners += [p for p in tied_partners(model, n, modules) if p not in owners]
    return owners


def sharded_copies_problem(names: list[str], modules: dict[str, nn.Module]) -> str | None:
    """What is wrong when copies of the modules ``names`` are to be made and FSDP2 has sharded
    some of them (their parameters are DTensors: no rank holds the whole values a copy starts
    from, and FSDP refuses to be deep-copied); None when none is sharded."""
    sharded = [n for n in names if any(hasattr(p, "to_local") for p in modules[n].parameters())]
    if not sharded:
        return None
    return (
        f"modules_to_save: {listing(sharded, 6)} would need a new trainable copy, but FSDP has "
        "sharded it (DTensor parameters) and a copy is made from the whole module: give the "
        "model its adapters with modules_to_save before fully_shard (load_sharded_phi3 injects "
        "the run's adapter first), or load this adapter on a model that is not sharded"
    )


def tied_partners(
    model: nn.Module, name: str, modules: dict[str, nn.Module] | None = None
) -> dict[str, nn.Module]:
    """The modules whose weight is the very Parameter of module ``name``'s weight (a tied
    ``lm_head`` and ``embed_tokens``), by name; for a wrapper, its original module's weight counts.
    The modules inside wrappers and LoRA layers are not candidates."""
    if modules is None:
        modules = dict(model.named_modules())
    weight = _own_weight(modules[name])
    if weight is None:
        return {}
    inside = tuple(
        f"{n}." for n, m in modules.items() if isinstance(m, (ModulesToSaveWrapper, LoRALayer))
    )
    return {
        n: m
        for n, m in modules.items()
        if n and n != name and not (inside and n.startswith(inside)) and _own_weight(m) is weight
    }


def tied_copy_owners(
    model: nn.Module, config: LoRAConfig, modules: dict[str, nn.Module] | None = None
) -> dict[str, str]:
    """With ``config.ensure_weight_tying``: each tied partner that modules_to_save does not name
    -> the named module whose copy's weight its copy shares (the first that it is tied to, as
    :func:`wrap_modules_to_save` makes them). Empty without ensure_weight_tying."""
    if not config.ensure_weight_tying:
        return {}
    if modules is None:
        modules = dict(model.named_modules())
    named = modules_to_save_for(model, config, modules)
    owners: dict[str, str] = {}
    for n in named:
        for p in tied_partners(model, n, modules):
            if p not in named:
                owners.setdefault(p, n)
    return owners


def saved_copies(
    model: nn.Module,
    config: LoRAConfig,
    adapter_name: str,
    modules: dict[str, nn.Module] | None = None,
) -> dict[str, nn.Module]:
    """For each module ``config.modules_to_save`` names, and with ``config.ensure_weight_tying``
    each tied partner: name -> the module holding adapter ``adapter_name``'s tensors (its copy),
    or, where it has none yet, the module a copy would be made of (the original). The named
    modules come first."""
    if modules is None:
        modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    named = modules_to_save_for(model, config, modules)
    partners: dict[str, nn.Module] = {}
    for n in named:
        if config.ensure_weight_tying:
            partners.update(tied_partners(model, n, modules))
    for n, m in {**named, **{k: v for k, v in partners.items() if k not in named}}.items():
        if isinstance(m, ModulesToSaveWrapper):
            held = m.get_adapter(adapter_name)
            out[n] = held if held is not None else m.original_module
        else:
            out[n] = m
    return out


def wrap_modules_to_save(
    model: nn.Module,
    config: LoRAConfig,
    adapter_name: str,
    modules: dict[str, nn.Module] | None = None,
) -> dict[str, ModulesToSaveWrapper]:
    """Give adapter ``adapter_name`` its trainable copy of each module ``config.modules_to_save``
    names, wrapping a plain module in a :class:`~lora.layers.saved.ModulesToSaveWrapper` first
    (the original stays untouched). With ``config.ensure_weight_tying`` a tied partner (same weight
    Parameter) is wrapped too and its copy shares the named module's copy's weight; without it the
    partner is left alone and only the named module's copy changes, as in PEFT. Each wrapper runs
    its copy of ``adapter_name`` only once activated. Returns name -> wrapper. Raises
    :class:`InjectionError` for an entry matching no module, and for a tied partner that is a LoRA
    target itself under ``ensure_weight_tying``."""
    if modules is None:
        modules = dict(model.named_modules())
    named = modules_to_save_for(model, config, modules)
    wrappers: dict[str, ModulesToSaveWrapper] = {}

    def wrapper_at(n: str) -> ModulesToSaveWrapper:
        m = modules[n]
        if not isinstance(m, ModulesToSaveWrapper):
            if isinstance(m, LoRALayer):
                raise InjectionError(
                    f"modules_to_save: {n!r} is a LoRA target as well; a module is either adapted "
                    "or trained in full"
                )
            m = ModulesToSaveWrapper(m)
            set_submodule(model, n, m)
            modules[n] = m
        wrappers[n] = m
        return m

    if config.ensure_weight_tying and not any(tied_partners(model, n, modules) for n in named):
        warnings.warn(
            "ensure_weight_tying=True, but no module of "
            f"modules_to_save={config.modules_to_save!r} shares its weight with another module: "
            "nothing to tie",
            stacklevel=3,
        )
    for n in named:
        partners = tied_partners(model, n, modules) if config.ensure_weight_tying else {}
        w = wrapper_at(n)
        held = w.get_adapter(adapter_name)
        if held is None:
            held = w.add_copy(adapter_name)
        for p in partners:
            if p in named:
                continue
            pw = wrapper_at(p)
            if pw.get_adapter(adapter_name) is None:
                pw.add_copy(adapter_name, shared={"weight": held.weight})  # type: ignore[dict-item]
    return wrappers
