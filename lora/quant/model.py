"""Quantising a whole model's frozen base: ``lora.quantize(model, "nf4")`` and back.

Which layers: every ``nn.Linear`` (a LoRA ``Linear``/``MergedLinear`` counts as its base Linear)
but the output head (``model.get_output_embeddings()``, or modules named ``lm_head``), any Linear
whose weight is shared with an embedding (a tied head), and the modules ``skip_modules`` names.
Embeddings, norms and biases stay in 16/32 bits, as in QLoRA. So do the modules inside a
modules_to_save copy (``lora.layers.saved.ModulesToSaveWrapper``): a copy trains in full.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .weight import NF4Weight, is_quantized

__all__ = [
    "METHODS",
    "QuantizationError",
    "quantize",
    "dequantize",
    "quantizing_assign",
    "quantize_shardable",
    "quantized_modules",
    "check_method",
]

METHODS = ("nf4",)


class QuantizationError(ValueError):
    """The model cannot be quantised as asked; the message names every offending module."""


def check_method(method, name: str = "method") -> str:
    """``method`` if it is a known quantisation (``"nf4"``), else ``ValueError`` naming it."""
    if method not in METHODS:
        raise ValueError(
            f"{name}={method!r}: unknown quantization; "
            f"expected one of {', '.join(map(repr, METHODS))}"
        )
    return method


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _head_ids(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            heads.add(id(head))
    heads |= {id(m) for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"}
    return heads


def _in_saved_copies(model: nn.Module) -> set[int]:
    """The modules of ``model`` inside a modules_to_save copy: they train in full, never 4-bit.
    (A ModulesToSaveWrapper, which lora.quant sits below, is known by its PEFT attribute names:
    ``original_module`` and the ModuleDict ``modules_to_save`` of its copies.)"""
    out: set[int] = set()
    for m in model.modules():
        copies = m._modules.get("modules_to_save")
        if isinstance(copies, nn.ModuleDict) and "original_module" in m._modules:
            out |= {id(s) for c in copies.values() for s in c.modules()}
    return out


def _targets(model: nn.Module, skip_modules: Iterable[str] | None) -> dict[str, nn.Linear]:
    """The Linear modules to quantise, by name (tied and head modules left out)."""
    skip = list(skip_modules or ())
    if isinstance(skip_modules, str):
        raise TypeError(f"skip_modules={skip_modules!r}: expected a list of module-name suffixes")
    heads = _head_ids(model) | _in_saved_copies(model)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for name, m in model.named_modules():
        if (
            not isinstance(m, nn.Linear)
            or id(m) in heads
            or any(_suffix_match(name, s) for s in skip)
        ):
            continue
        w = m._parameters.get("weight")
        if w is not None and id(w) in embedding_weights:
            continue
        out[name] = m
    return out


def _replace_weight(module: nn.Module, new) -> None:
    old = module.__dict__.get("_parameters", {}).get("weight")
    if "weight" in module._parameters:
        del module._parameters["weight"]
    elif "weight" in module._modules:
        del module._modules["weight"]
    module.weight = new
    # A LoRA layer keeps the Linear it replaced (unregistered) to put back on merge_and_unload; it
    # shares the weight, so it must drop the 16-bit copy too or that copy stays alive.
    shell = module.__dict__.get("_lora_base_module")
    if shell is not None and (
        shell.__dict__.get("_parameters", {}).get("weight") is old
        or shell._modules.get("weight") is old
    ):
        _replace_weight(shell, new)


@torch.no_grad()
def quantize(
    model: nn.Module,
    method: str = "nf4",
    *,
    skip_modules: Iterable[str] | None = None,
    double_quant: bool = True,
) -> nn.Module:
    """Store the frozen base Linear weights of ``model`` as 4-bit NF4, in place; returns ``model``.

    Works before or after :func:`lora.inject` (a LoRA layer's base weight is quantised; its
    adapter stays as it is; a modules_to_save copy keeps its trainable weights as they are, while
    the original it was copied from is quantised). Weights already quantised are left alone. Each weight keeps its dtype
    as the compute dtype. ``skip_modules``: module-name suffixes to leave in 16 bits.

    Raises ``ValueError`` for an unknown ``method``; :class:`QuantizationError` (nothing changed)
    naming every LoRA layer that is merged (its weight holds W + ΔW: quantising it would bake the
    adapter into the frozen base) or stores its weight transposed (``fan_in_fan_out``), and a weight
    on the meta device.
    """
    check_method(method)
    targets = _targets(model, skip_modules)
    problems = []
    for name, m in model.named_modules():
        # (any LoRA layer: lora.quant sits below the layers and knows them only by their `merged`)
        if getattr(m, "merged", False) is True:
            problems.append(
                f"{name or type(m).__name__}: merged (its weight holds W + ΔW); "
                "call lora.unmerge(model)"
                " first, or merge_and_unload and quantise the result as a new base"
            )
    for name, m in targets.items():
        if is_quantized(m.weight):
            continue
        if getattr(m, "fan_in_fan_out", False):
            problems.append(
                f"{name}: fan_in_fan_out stores the weight as (in, out); NF4 needs (out, in)"
            )
        elif m.weight.device.type == "meta":
            problems.append(
                f"{name}: its weight is on the meta device (load the weights first, or load with"
                " from_pretrained(..., quantize='nf4'))"
            )
    if problems:
        raise QuantizationError(
            f"cannot quantize {type(model).__name__} to {method}: " + "; ".join(problems)
        )
    done: dict[int, NF4Weight] = {}
    for m in targets.values():
        w = m.weight
        if is_quantized(w):
            continue
        if id(w) not in done:
            done[id(w)] = NF4Weight.from_float(w.detach(), double_quant=double_quant)
        _replace_weight(m, done[id(w)])
    return model


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4 weight of ``model`` by a frozen 16/32-bit Parameter holding its dequantised
    values (in ``dtype``, default each weight's compute dtype); returns ``model``. This is the
    first step of deploying QLoRA adapters: :func:`lora.merge_and_unload` calls it, then merges."""
    done: dict[int, nn.Parameter] = {}
    for m in list(model.modules()):
        w = m._modules.get("weight") if isinstance(m, nn.Module) else None
        if not is_quantized(w):
            continue
        if id(w) not in done:
            done[id(w)] = nn.Parameter(w.dequantize(dtype), requires_grad=False)
        _replace_weight(m, done[id(w)])
    return model


def quantized_modules(model: nn.Module) -> dict[str, NF4Weight]:
    """``{module name: its NF4 weight}`` for every module of ``model`` with a quantised weight."""
    return {n: m.weight for n, m in model.named_modules() if is_quantized(m._modules.get("weight"))}


def quantizing_assign(
    model: nn.Module, method: str = "nf4", skip_modules: Iterable[str] | None = None
) -> Callable[[nn.Module, str, Tensor], bool]:
    """A hook for :func:`lora.models.checkpoint.load_into`: quantise each target Linear's weight as
    it is read (so the 16-bit copy of one tensor at most is alive at a time); other tensors are left
    to the default assignment. ``model`` is the (meta-device) model about to be loaded."""
    check_method(method, "quantize")
    names = {f"{n}.weight" if n else "weight" for n in _targets(model, skip_modules)}

    def assign(root: nn.Module, name: str, tensor: Tensor) -> bool:
        if name not in names:
            return False
        owner_name = name.rpartition(".")[0]
        owner = root.get_submodule(owner_name) if owner_name else root
        _replace_weight(owner, NF4Weight.from_float(tensor))
        return True

    return assign


def quantize_shardable(
    model: nn.Module, method: str = "nf4", skip_modules: Iterable[str] | None = None
) -> dict[str, NF4Weight]:
    """Give each Linear that :func:`quantize` would quantise an empty 4-bit weight in the layout
    FSDP2 shards (:meth:`NF4Weight.empty_shardable`, on the weight's device: meta for a model
    built there), for a loader to fill; returns ``{module name: its NF4Weight}``. ``model`` is
    not loaded yet: its weights are only shapes (the FSDP loader builds it on the meta device)."""
    check_method(method, "quantize")
    out = {}
    for name, m in _targets(model, skip_modules).items():
        if is_quantized(m.weight):
            continue
        w = m.weight
        new = NF4Weight.empty_shardable(tuple(w.shape), w.dtype, w.device)
        _replace_weight(m, new)
        out[name] = new
    return out
