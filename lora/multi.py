"""Several adapters in one model: names, switching, running without, deleting, combining, mixed batches.

An extension of the one-adapter design, not its spine. Each LoRA layer keeps its *active* adapter
in its own ``lora_A`` / ``lora_B`` (so its forward, merging and state dict are those of a layer with
one adapter) and any others in a ``lora_inactive`` ModuleDict of
:class:`~lora.layers.AdapterWeights`. Switching moves Parameter objects between the two: nothing is
copied, and an optimizer holding an adapter's parameters keeps holding them.

    lora.load_adapter(model, "chat", adapter_name="chat")      # added, not active
    lora.set_adapter(model, "chat")
    with lora.disabled(model): base_logits = model(ids).logits
    lora.add_weighted_adapter(model, ["default", "chat"], [0.5, 0.5], "mix")
    with lora.mixed_batch(model, ["default", "chat", None]): out = model(ids)   # one adapter per sample
    lora.delete_adapter(model, "chat")

A layer that an adapter does not touch runs its base layer while that adapter is active. The model
keeps each adapter's config in ``model.lora_configs`` (name -> LoRAConfig), and ``model.lora_config``
is the active adapter's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import model_state
from .config import LoRAConfig
from .layers import AdapterWeights, LoRALayer
from .layers.base import STORE, alpha_for_slices
from .layers.saved import ModulesToSaveWrapper, saved_modules
from .layers.utils import lora_layers
from .targets import InjectionError, fused_splits, modules_to_save_for, tied_partners

__all__ = [
    "adapter_names",
    "active_adapter",
    "set_adapter",
    "disabled",
    "delete_adapter",
    "add_weighted_adapter",
    "mixed_batch",
]

__all__ += ["STORE", "alpha_for_slices"]  # defined with LoRALayer; re-exported from their old home

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# How far from 1 the weights of the adapters training one bias may sum (see _combined_bias).
_BIAS_WEIGHT_TOLERANCE = 1e-9
_RESERVED = set(dir(nn.ModuleDict()))


# --- one layer ----------------------------------------------------------------------------------
def check_adapter_name(name) -> str:
    """Adapter names key ModuleDicts: letters, digits, ``_`` and ``-``, and no nn.Module attribute name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in _RESERVED:
        raise ValueError(
            f"adapter_name={name!r}: expected a non-empty string of letters, digits, '_' or '-' "
            "that is not an nn.Module attribute name"
        )
    return name


def layer_active(layer: LoRALayer) -> str | None:
    """The name of the adapter ``layer`` runs, or None when it runs its base layer."""
    return layer.active_adapter_name


def layer_adapter(layer: LoRALayer, name: str):
    """The layer itself when ``name`` is its active adapter, its stored AdapterWeights when inactive,
    else None (:meth:`LoRALayer.get_adapter`)."""
    return layer.get_adapter(name)


def store_adapter(layer: LoRALayer, slot: AdapterWeights) -> None:
    """Keep ``slot`` in the layer as an inactive adapter (:meth:`LoRALayer.store_adapter`)."""
    layer.store_adapter(slot)


# --- the model's adapters -----------------------------------------------------------------------
def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model`` (active or not), in the order they were added."""
    return names_in_layers(model, (layer for _, layer in lora_layers(model)))


def names_in_layers(model: nn.Module, layers) -> list[str]:
    """:func:`adapter_names` over ``layers`` (the model's LoRA layers, when the caller has them)."""
    names: dict[str, None] = {}
    for layer in layers:
        active = layer.active_adapter_name
        if active is not None:
            names[active] = None
        store = layer.inactive_adapters
        if store is not None:
            names.update(dict.fromkeys(store.keys()))
    registered = model_state.registered_configs(model) or {}
    return [n for n in registered if n in names] + [n for n in names if n not in registered]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter ``model`` runs, or None (no adapter, or inside :func:`disabled`)."""
    for _, layer in lora_layers(model):
        if layer.active_adapter_name is not None:
            return layer.adapter_name
    return None


def adapter_layers(model: nn.Module, name: str) -> Iterator[tuple[str, LoRALayer, Any]]:
    """``(module name, layer, adapter)`` for each layer holding adapter ``name`` (see :func:`layer_adapter`)."""
    for module_name, layer in lora_layers(model):
        adapter = layer.get_adapter(name)
        if adapter is not None:
            yield module_name, layer, adapter


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig | None]:
    """``model.lora_configs``, created on first use from ``model.lora_config`` (what inject set)."""
    configs = model_state.registered_configs(model)
    if configs is None:
        configs = {}
        names = adapter_names(model)
        config = model_state.active_config(model)
        if config is not None and names:
            configs["default" if "default" in names else names[0]] = config
        model_state.set_registered_configs(model, configs)
    return configs


def adapter_config(model: nn.Module, name: str) -> LoRAConfig | None:
    return adapter_configs(model).get(name)


def register_adapter(model: nn.Module, name: str, config: LoRAConfig | None) -> None:
    adapter_configs(model)[name] = config


def _require(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(
            f"adapter {name!r}: {type(model).__name__} has no such adapter (it has {names})"
        )


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter every layer runs (None: none, the base model). Layers that adapter
    does not touch run their base layer. A layer that was merged (or that merges in eval mode,
    ``merge_weights``) is merged with its new adapter. Raises ``ValueError`` for an unknown name."""
    if name is not None:
        _require(model, name)
    configs = adapter_configs(model)
    for _, layer in lora_layers(model):
        layer.activate_adapter(name)
    for _, wrapper in saved_modules(model):  # modules_to_save: that adapter's copy, or the original
        wrapper.activate_adapter(name)
    if name is not None and configs.get(name) is not None:
        model_state.set_active_config(model, configs[name])


@contextlib.contextmanager
def disabled(model: nn.Module):
    """``with lora.disabled(model): ...`` runs the base model; the active adapter (and merged state)
    come back on exit, also after an exception."""
    previous = active_adapter(model)
    merged = {name for name, layer in lora_layers(model) if layer.merged}
    wrappers = [(w, w.active_adapter) for _, w in saved_modules(model)]
    for _, layer in lora_layers(model):
        layer.activate_adapter(None)
    for w, _ in wrappers:  # modules_to_save: the original modules
        w.activate_adapter(None)
    try:
        yield model
    finally:
        for w, active in wrappers:
            w.activate_adapter(active)
        if previous is not None:
            for name, layer in lora_layers(model):
                layer.activate_adapter(previous, merge=name in merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer. A layer left with no adapter at all becomes the
    torch layer it wrapped again, and so does a modules_to_save wrapper left with no copy (its
    original module); when no adapter is left, ``model.lora_config`` goes too and the model
    can be injected afresh. Raises ``ValueError`` for an unknown name."""
    _require(model, name)
    for module_name, wrapper in list(saved_modules(model)):
        wrapper.delete_adapter(name)
        if not wrapper.adapter_names:
            parent, _, child = module_name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, wrapper.original_module)
    for module_name, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        empty = not layer.has_adapter and layer.inactive_adapters is None
        if empty and layer.base_module is not None and module_name:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.unwrap())
    configs = adapter_configs(model)
    removed = configs.pop(name, None)
    left = adapter_names(model)
    if not left and not any(True for _ in lora_layers(model)):
        model_state.clear(model)
    elif model_state.active_config(model) is removed:
        active = active_adapter(model)
        model_state.set_active_config(model, configs.get(active) if active is not None else None)


# --- combining ----------------------------------------------------------------------------------
def as_one_lora(layer: LoRALayer, adapter) -> tuple[Tensor, Tensor, float]:
    """``(A, B, scaling)`` with ΔW = scaling · B A as one LoRA over the layer's whole weight
    (:meth:`LoRALayer.as_one_lora`: a MergedLinear adapter's B expanded to every output row)."""
    return layer.as_one_lora(adapter)


@torch.no_grad()
def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
    svd_rank: int | None = None,
) -> None:
    """Add adapter ``adapter_name`` with ΔW = Σ weights[i] · ΔW(adapters[i]) on every layer (inactive).

    ``combination_type``:
      "cat" (exact): the adapters concatenated along the rank, A = [A_1; A_2; ...],
        B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], scaling 1, rank Σ r_i (a MergedLinear adapter counts as
        the one LoRA over the fused matrix it equals, rank r·k).
      "svd" (approximate): the best rank-``svd_rank`` approximation of the weighted sum (default: the
        largest rank among the adapters), from a truncated SVD of the dense ΔW of each layer.
    Weights may be negative (task arithmetic). The new adapter's tensors are in the dtype of the
    first adapter's.

    modules_to_save (a module trained in full: each adapter has its own copy of it): the new
    adapter's copy holds, for every floating-point parameter, ``orig + Σ_i weights[i] · (copy_i −
    orig)`` over the adapters that have a copy of that module (one without a copy contributes 0:
    its delta there is zero). That is ΔW = Σ wᵢ ΔWᵢ for a module trained in full, the same for
    "cat" and "svd" (no SVD of full modules). It is computed in float32 (or the parameter's dtype
    where wider) and cast to the original's dtype; one adapter at weight 1 gives an exact copy of
    its copy. Buffers and non-floating-point parameters are taken from the first adapter (in
    ``adapters`` order) that has a copy of the module. Copies that share a Parameter in each
    adapter having them, and whose originals share it (a tied ``lm_head`` and ``embed_tokens``
    under ``ensure_weight_tying``), share one in the new adapter too (their sums are equal). A
    module no adapter has a copy of gets none (the original runs). The new adapter's config lists
    its modules_to_save (and ``ensure_weight_tying`` where copies share), so
    :func:`lora.save_adapter` writes the copies and :func:`lora.load_adapter` restores them.

    The rest of the new adapter's config (docs/adapters.md, "What the combined config says"):
    ``lora_dropout`` and ``merge_weights`` are the first adapter's (as PEFT: they do not change
    ΔW; each layer of the new adapter gets that dropout); ``task_type`` the one the adapters
    name (None when none does); ``fan_in_fan_out`` what the layers store; ``use_rslora`` False
    and ``init_lora_weights`` True (the scaling is in B; the tensors are set). ``bias``: a bias is
    the base model's, one tensor shared by every adapter, so there is no per-adapter bias to
    weight; the combination keeps the trained biases when, for every bias some adapter trains
    (its ``bias`` mode covers it), the weights of the adapters training it sum to 1, and its
    config then covers them ("lora_only" when every such adapter is "lora_only", else "all").

    Raises ``ValueError`` for unknown names, an existing ``adapter_name``, weights not matching
    adapters, an unknown combination_type, adapters naming different task types, or trained
    biases whose weights do not sum to 1 (the error names the bias, the adapters and the sum).
    Nothing is changed when it raises.
    """
    adapters = list(adapters)
    weights = list(weights)
    if not adapters:
        raise ValueError("adapters=[]: name at least one adapter to combine")
    for a in adapters:
        _require(model, a)
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"adapter_name={adapter_name!r}: the model already has an adapter of that name"
        )
    if len(weights) != len(adapters) or not all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
        for w in weights
    ):
        raise ValueError(
            f"weights={weights!r}: expected {len(adapters)} finite numbers, one per adapter"
        )
    if combination_type not in ("cat", "svd"):
        raise ValueError(f"combination_type={combination_type!r}: expected 'cat' or 'svd'")
    settings = _combined_settings(model, adapters, weights)

    for _, layer in lora_layers(model):
        parts = [(layer.get_adapter(a), w) for a, w in zip(adapters, weights)]
        parts = [(layer.as_one_lora(ad), w) for ad, w in parts if ad is not None]
        if not parts:
            continue
        dtype = parts[0][0][0].dtype
        if combination_type == "cat":
            A = torch.cat([a.to(dtype) for (a, _, _), _ in parts], dim=0)
            B = torch.cat([(b * (w * s)).to(dtype) for (_, b, s), w in parts], dim=1)
        else:
            A, B = _svd_combination(parts, svd_rank, dtype)
        slot = AdapterWeights(
            adapter_name,
            layer.one_lora_fields(A.shape[0]),
            nn.Parameter(A.contiguous()),
            nn.Parameter(B.contiguous()),
            layer.dropout_for(settings["lora_dropout"]),
        )
        layer.store_adapter(slot)
    _combine_saved_copies(model, adapters, weights, adapter_name)
    named: dict[str, None] = {}  # the modules the adapters' configs name (not tied partners)
    for a in adapters:
        config = adapter_config(model, a)
        if config is not None and config.modules_to_save:
            with contextlib.suppress(InjectionError):
                named.update(dict.fromkeys(modules_to_save_for(model, config)))
    config = config_from_layers(model, adapter_name, prefer_saved=list(named))
    register_adapter(model, adapter_name, dataclasses.replace(config, **settings))


def _combined_settings(
    model: nn.Module, adapters: list[str], weights: list[float]
) -> dict[str, Any]:
    """The fields of a combination's config that its layers do not say (see
    :func:`add_weighted_adapter`); raises ``ValueError`` before anything is changed."""
    configs = [adapter_config(model, a) or config_from_layers(model, a) for a in adapters]
    tasks = {c.task_type: a for a, c in zip(adapters, configs) if c.task_type is not None}
    if len(tasks) > 1:
        named = ", ".join(f"{a!r}: {t!r}" for t, a in tasks.items())
        raise ValueError(
            f"adapters={adapters!r}: their configs name different task types ({named}); "
            "combine adapters trained for the same task"
        )
    return {
        "lora_dropout": configs[0].lora_dropout,
        "merge_weights": configs[0].merge_weights,
        "task_type": next(iter(tasks), None),
        "bias": _combined_bias(model, adapters, weights, [c.bias for c in configs]),
    }


def _combined_bias(
    model: nn.Module, adapters: list[str], weights: list[float], modes: list[str]
) -> str:
    """The bias mode of a combination, or ``ValueError`` where the biases it would run are
    not orig + Σ wᵢ (biasᵢ − orig). A bias is the base layer's, shared by every adapter (and
    by the base model): an adapter whose mode covers it means the model's bias there, one whose
    mode does not means the original. So the sum is the model's bias exactly when the weights of
    the adapters covering it sum to 1; otherwise it needs the original, which nothing keeps."""
    if all(m == "none" for m in modes):
        return "none"
    modules = dict(model.named_modules())
    inside = tuple(f"{n}." for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper))
    biased = [  # modules_to_save copies combine as copies (their originals stay as they are)
        n
        for n, m in modules.items()
        if m._parameters.get("bias") is not None and not (inside and n.startswith(inside))
    ]
    covered = []
    for a, mode in zip(adapters, modes):
        held = {n for n, _, _ in adapter_layers(model, a)}
        covered.append({n for n in biased if mode == "all" or (mode == "lora_only" and n in held)})
    for n in biased:
        trainers = [(a, m, w) for a, m, w, c in zip(adapters, modes, weights, covered) if n in c]
        total = math.fsum(w for _, _, w in trainers)
        if trainers and abs(total - 1.0) > _BIAS_WEIGHT_TOLERANCE:
            named = ", ".join(f"{a!r} (bias={m!r}, weight {w:g})" for a, m, w in trainers)
            raise ValueError(
                f"weights={weights!r}: {n}.bias is trained by {named}, whose weights sum to "
                f"{total:g}, not 1. A bias is the base model's, one tensor shared by every adapter "
                "(not a copy per adapter), so orig + Σ wᵢ (biasᵢ − orig) is known only when the "
                "weights of the adapters training it sum to 1 (it is then the trained bias). Give "
                "those adapters weights summing to 1, or combine adapters trained with bias='none'"
            )
    return "all" if "all" in modes else "lora_only"


def _combine_saved_copies(
    model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str
) -> None:
    """Give adapter ``adapter_name`` its copy of each modules_to_save module some of ``adapters``
    have a copy of: orig + Σ wᵢ (copyᵢ − orig) per floating-point parameter (see
    :func:`add_weighted_adapter`). A new Parameter is made once per distinct (original Parameter,
    source Parameters) and reused, so copies sharing a Parameter in every source share it here."""
    made: dict[tuple, nn.Parameter] = {}
    plans = []
    for _, wrapper in saved_modules(model):
        sources = [
            (i, wrapper.get_adapter(a), float(w)) for i, (a, w) in enumerate(zip(adapters, weights))
        ]
        held = [(i, c, w) for i, c, w in sources if c is not None]
        if not held:
            continue
        params: dict[str, nn.Parameter] = {}
        for key, orig in wrapper.original_parameters():  # (a 4-bit weight: its 16-bit values)
            parts = [(i, cast(nn.Module, c).get_parameter(key), w) for i, c, w in held]
            signature = (id(orig), tuple((i, id(p)) for i, p, _ in parts))
            if signature not in made:
                value = _weighted_copy(orig, [(p, w) for _, p, w in parts])
                made[signature] = nn.Parameter(value, requires_grad=value.is_floating_point())
            params[key] = made[signature]
        plans.append((wrapper, params, cast(nn.Module, held[0][1])))
    for wrapper, params, first in plans:
        module = wrapper.add_copy(adapter_name, shared=cast(dict[str, Tensor], params))
        for key, buffer in first.named_buffers(remove_duplicate=False):
            owner, _, leaf = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[leaf] = buffer.detach().clone()


def _weighted_copy(orig: Tensor, parts: list[tuple[Tensor, float]]) -> Tensor:
    """orig + Σ w (p − orig), in float32 or wider, cast to orig's dtype on orig's device."""
    device, dtype = orig.device, orig.dtype
    if not orig.is_floating_point():  # not a weight to sum: the first copy's
        return parts[0][0].detach().to(device=device, copy=True)
    if len(parts) == 1 and parts[0][1] == 1.0:  # the formula is that copy itself: exactly it
        return parts[0][0].detach().to(device=device, dtype=dtype, copy=True)
    wide = torch.promote_types(dtype, torch.float32)
    base = orig.detach().to(wide)
    total = base.clone()
    for p, w in parts:
        total.add_(p.detach().to(device=device, dtype=wide) - base, alpha=w)
    return total.to(dtype)


def _svd_combination(parts, svd_rank, dtype) -> tuple[Tensor, Tensor]:
    (A0, B0, _), _ = parts[0]
    out, a_tail = B0.shape[0], A0.shape[1:]
    ones = B0.shape[2:]
    delta = sum(
        w * s * (b.reshape(out, -1).double() @ a.reshape(a.shape[0], -1).double())
        for (a, b, s), w in parts
    )
    rank = svd_rank if svd_rank is not None else max(a.shape[0] for (a, _, _), _ in parts)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"svd_rank={svd_rank!r}: expected a positive int")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    B = (U[:, :rank] * S[:rank]).to(dtype).reshape(out, rank, *ones)
    A = Vh[:rank].to(dtype).reshape(rank, *a_tail)
    return A, B


def config_from_layers(model: nn.Module, name: str, prefer_saved: Sequence[str] = ()) -> LoRAConfig:
    """A LoRAConfig describing adapter ``name`` as its layers hold it: full module names as targets
    (``"model.layers.0.self_attn.qkv_proj[q,v]"`` for a MergedLinear over declared fused slices), the
    most common rank and alpha, and exact-name rank/alpha patterns for the others, the largest
    dropout of its layers, and ``fan_in_fan_out`` when every linear layer stores (in, out) (GPT-2's
    Conv1D is recognised either way). Its modules_to_save are those of the adapter's copies
    (:func:`saved_fields`; ``prefer_saved``: the module names to list first among copies that share
    a weight). ``bias`` is "none": which biases an adapter trained is not in its layers."""
    splits = fused_splits(model)
    targets, ranks, alphas, rslora = [], {}, {}, set()
    dropout, layouts = 0.0, []
    for module_name, layer, adapter in adapter_layers(model, name):
        rslora.add(bool(adapter.use_rslora))
        dropout = max(dropout, float(getattr(adapter.lora_dropout, "p", 0.0)))
        if hasattr(layer, "fan_in_fan_out"):  # a linear layer: which layout it stores
            layouts.append(bool(layer.fan_in_fan_out))
        chosen = layer.adapter_slices(adapter, splits.get(module_name.rpartition(".")[2]))
        if chosen is not None:
            targets.append(f"{module_name}[{','.join(chosen)}]")
            r, alpha = adapter.r, adapter.lora_alpha
        else:  # one LoRA over the (fused) matrix, as it exports
            targets.append(module_name)
            r, alpha = layer.one_lora_rank_alpha(adapter)
        ranks[module_name], alphas[module_name] = r, alpha
    if not targets:
        raise ValueError(f"adapter {name!r}: no layer of {type(model).__name__} holds it")
    if len(rslora) > 1:
        raise ValueError(
            f"adapter {name!r}: its layers disagree on use_rslora; a config holds one value"
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return LoRAConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=rslora.pop(),
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha},
        lora_dropout=dropout,
        fan_in_fan_out=bool(layouts) and all(layouts),
        **saved_fields(model, name, prefer_saved),
    )


def saved_fields(model: nn.Module, name: str, prefer: Sequence[str] = ()) -> dict[str, Any]:
    """``modules_to_save`` and ``ensure_weight_tying`` for the copies adapter ``name`` holds
    (empty when it holds none). Copies sharing one weight Parameter form a group: with
    ``ensure_weight_tying`` the config names one of them (the first in ``prefer``, else the first
    in the model) and loading makes its tied partners share that copy, as
    :func:`lora.targets.wrap_modules_to_save` does. Where that would tie other modules than the
    copies share (copies tied by hand, not along the base model's ties), every copy is named
    without ``ensure_weight_tying``, with a warning: the values save, the sharing does not."""
    copies = {n: c for n, w in saved_modules(model) if (c := w.get_adapter(name)) is not None}
    if not copies:
        return {}
    groups: dict[int, list[str]] = {}
    for n, c in copies.items():
        weight = c._parameters.get("weight")
        groups.setdefault(id(weight) if weight is not None else id(c), []).append(n)
    if all(len(g) == 1 for g in groups.values()):
        return {"modules_to_save": list(copies), "ensure_weight_tying": False}
    main = {next((m for m in prefer if m in g), g[0]): g for g in groups.values()}
    named = [n for n in copies if n in main]
    modules = dict(model.named_modules())
    for n in named:
        partners = set(tied_partners(model, n, modules)) - set(named)
        if partners != set(main[n]) - {n}:
            warnings.warn(
                f"adapter {name!r}: its copy of {n!r} shares its weight with the copies of "
                f"{sorted(set(main[n]) - {n})}, but in the base model {n!r} is tied to "
                f"{sorted(partners)}; the adapter's config names every copy, untied "
                "(a saved adapter loads with equal values, not with one shared Parameter)",
                stacklevel=3,
            )
            return {"modules_to_save": list(copies), "ensure_weight_tying": False}
    return {"modules_to_save": named, "ensure_weight_tying": True}


# --- mixed batches ------------------------------------------------------------------------------
@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names_per_sample: Sequence[str | None]):
    """``with lora.mixed_batch(model, ["a", None, "b", "a"]): out = model(ids)``: sample i of every
    forward inside runs adapter ``adapter_names_per_sample[i]`` (None: the base model).

    Each LoRA layer runs once per distinct name on its samples (``x.index_select(0, ...)``) and
    puts the rows back in order, so each sample gets what running its adapter alone gives. The first
    dimension of every adapted layer's input must be the batch (raises ``ValueError`` otherwise:
    e.g. a loss path that flattens tokens before an adapted output head). Layers are unmerged inside
    and merged again on exit. Raises ``ValueError`` for an unknown adapter name.
    """
    names = list(adapter_names_per_sample)
    if not names:
        raise ValueError("adapter_names=[]: expected one adapter name (or None) per sample")
    for wanted in {n for n in names if n is not None}:
        _require(model, wanted)
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    index = {n: torch.tensor(idx, dtype=torch.long) for n, idx in groups.items()}
    order = torch.cat(list(index.values()))
    routing = _Routing(len(names), index, torch.argsort(order))

    layers = list(lora_layers(model))
    wrappers = list(saved_modules(model))
    restore = []
    for _, layer in layers:
        restore.append((layer.active_adapter_name, layer.merged))
        layer.activate_adapter(None)
        layer.forward = functools.partial(_mixed_forward, layer, routing)
    for _, wrapper in wrappers:  # modules_to_save: each sample runs its adapter's copy
        wrapper.__dict__["forward"] = functools.partial(_mixed_saved_forward, wrapper, routing)
    try:
        yield model
    finally:
        for _, wrapper in wrappers:
            wrapper.__dict__.pop("forward", None)
        for (_, layer), (active, was_merged) in zip(layers, restore):
            layer.__dict__.pop("forward", None)
            if active is not None:
                layer.activate_adapter(active, merge=was_merged)


class _Routing:
    """Which samples run which adapter; index tensors cached per device."""

    def __init__(self, batch: int, index: dict, inverse: Tensor):
        self.batch, self._index, self._inverse = batch, index, inverse
        self._cache: dict = {}

    def on(self, device) -> tuple[dict, Tensor]:
        if device not in self._cache:
            self._cache[device] = (
                {n: i.to(device) for n, i in self._index.items()},
                self._inverse.to(device),
            )
        return self._cache[device]


def _mixed_forward(layer: LoRALayer, routing: _Routing, x: Tensor, *args, **kwargs) -> Tensor:
    if x.shape[0] != routing.batch:
        raise ValueError(
            f"mixed_batch: {routing.batch} adapter names, but a {type(layer).__name__} got an input of shape "
            f"{tuple(x.shape)}: the first dimension of every adapted layer's input must be the batch"
        )
    forward = type(layer).forward
    store = layer.inactive_adapters
    index, inverse = routing.on(x.device)
    outputs = []
    for name, idx in index.items():
        slot = store[name] if name is not None and store is not None and name in store else None
        if slot is not None:
            layer.put_adapter(cast(AdapterWeights, slot))  # shared with the store, for this call
        try:
            rows = x if len(index) == 1 else x.index_select(0, idx)
            outputs.append(forward(layer, rows, *args, **kwargs))
        finally:
            if slot is not None:
                layer.clear_adapter()
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat(outputs).index_select(0, inverse)


def _mixed_saved_forward(
    wrapper: ModulesToSaveWrapper, routing: _Routing, x: Tensor, *args, **kwargs
) -> Tensor:
    if x.shape[0] != routing.batch:
        raise ValueError(
            f"mixed_batch: {routing.batch} adapter names, but a modules_to_save module got an "
            f"input of shape {tuple(x.shape)}: the first dimension of its input must be the batch"
        )
    index, inverse = routing.on(x.device)
    outputs = []
    for name, idx in index.items():
        held = wrapper.get_adapter(name)
        module = held if held is not None else wrapper.original_module
        rows = x if len(index) == 1 else x.index_select(0, idx)
        outputs.append(module(rows, *args, **kwargs))
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat(outputs).index_select(0, inverse)


def dropout_for(layer: LoRALayer, p: float) -> nn.Module:
    """The dropout of an adapter with probability ``p`` on ``layer`` (``layer.dropout_for``)."""
    return layer.dropout_for(p)
