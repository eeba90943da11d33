"""Model surgery: swap the matching layers of any ``nn.Module`` for LoRA layers, and back.

    model = lora.inject(model, lora.LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    model = lora.merge_and_unload(model)   # plain layers holding W + ΔW

Matching (PEFT's rules): a list entry matches a module whose name equals it or ends with
``"." + entry``; a string is a regex that must match the whole module name; ``"all-linear"`` is
every ``nn.Linear`` (and GPT-2-style Conv1D) but the output head. A list entry may name slices of a
fused projection, ``"qkv_proj[q,v]"``: the layer becomes a :class:`~lora.MergedLinear` over those
slices, with the sizes the model declares (``model.fused_splits``) or, for a Hugging Face Phi-3 config,
the sizes its ``config`` implies. The matching itself lives in :mod:`lora.targets`.
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
from torch import nn

from . import model_state
from .config import LoRAConfig
from .layers.saved import saved_modules
from .layers.utils import lora_layers, mark_only_lora_as_trainable, mark_shared_weights
from .targets import (
    InjectionError,
    SavedTargetWarning,
    TargetPlan,
    fused_splits,
    lora_layer_for,
    modules_to_save_for,
    resolve_lora_dtype,
    set_submodule,
    wrap_modules_to_save,
)

__all__ = [
    "inject",
    "merge_and_unload",
    "fused_splits",
    "modules_to_save",
    "trainable_parameters",
    "print_trainable_parameters",
    "InjectionError",
    "SavedTargetWarning",
]


def _calls_its_submodules(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence is torch's own reason to take
    nn.TransformerEncoderLayer's module-calling path (see :func:`settle`)."""
    return None


_NESTED = "_lora_use_nested_tensor"  # an encoder's use_nested_tensor before settle turned it off


def _holds_lora(module: nn.Module) -> bool:
    return any(True for _ in lora_layers(module))


def settle(model: nn.Module) -> None:
    """What a model needs once LoRA layers are in it (called by inject and load_adapter):

    - each layer's ``shares_weight`` (:func:`~lora.layers.utils.mark_shared_weights`), so that
      merging a tied head leaves the embedding alone;
    - torch's fused encoder paths off where they would skip a LoRA layer. In eval mode
      ``nn.TransformerEncoderLayer`` runs one fused kernel over the weights of ``linear1``,
      ``linear2`` and ``self_attn.out_proj`` without calling those modules (and
      ``nn.TransformerEncoder`` with a padding mask packs a nested tensor for it): the adapters
      would be silently left out of every evaluation. A no-op forward pre-hook on such a layer
      (torch's own condition for its module-calling path) and ``use_nested_tensor = False`` on
      such an encoder make them call their submodules; :func:`merge_and_unload` undoes both.
    Idempotent."""
    mark_shared_weights(model)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and _holds_lora(m):
            if _calls_its_submodules not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_calls_its_submodules)
        elif isinstance(m, nn.TransformerEncoder) and _holds_lora(m) and _NESTED not in m.__dict__:
            m.__dict__[_NESTED] = getattr(m, "use_nested_tensor", False)
            m.use_nested_tensor = False


def _unsettle(model: nn.Module) -> None:
    # merge_and_unload: plain layers again, so torch's fused paths compute the merged model.
    for m in model.modules():
        hooks = m._forward_pre_hooks
        for key in [k for k, h in hooks.items() if h is _calls_its_submodules]:
            del hooks[key]
        if _NESTED in m.__dict__:
            m.use_nested_tensor = m.__dict__.pop(_NESTED)


def build_layer(
    name: str, base: nn.Module, slices, config: LoRAConfig, plan: TargetPlan, lora_dtype="auto"
) -> nn.Module:
    """The LoRA layer ``config`` puts on module ``name`` (``base``): its rank, alpha, dropout and
    options, over ``slices`` of a fused projection when the target names them."""
    return lora_layer_for(
        base,
        config.rank_for(name),
        split=plan.split_for(name) if slices is not None else None,
        slices=slices,
        lora_alpha=config.alpha_for(name),
        lora_dropout=config.lora_dropout,
        fan_in_fan_out=config.fan_in_fan_out,
        merge_weights=config.merge_weights,
        use_rslora=config.use_rslora,
        lora_dtype=resolve_lora_dtype(base.weight, lora_dtype),  # type: ignore[arg-type]
        init_lora_weights=config.init_lora_weights,
    )


def inject(model: nn.Module, config: LoRAConfig | dict, lora_dtype="auto") -> nn.Module:
    """Swap the layers of ``model`` that ``config.target_modules`` names for LoRA layers, in place.

    Each new layer shares the replaced layer's weight and bias tensors (no copy: same dtype and
    device). LoRA parameters go on the same device, in ``lora_dtype`` ("auto": fp32 over a
    bf16/fp16 base, else the base dtype; or a torch.dtype; or None for the base dtype). Then
    everything is frozen but the LoRA parameters, the biases ``config.bias`` names, and the
    adapter's copies of ``config.modules_to_save`` (each such module is wrapped in a
    :class:`~lora.layers.saved.ModulesToSaveWrapper`: the original stays untouched, the adapter
    "default" trains a copy; ``config.ensure_weight_tying`` says what happens to a tied partner).
    A rank of 0 from ``rank_pattern`` leaves that module alone. A target that a modules_to_save
    module is, or lies inside, gets no LoRA layer (PEFT's rule: the copy trains it in full, and the
    adapter file holds the copy); a :class:`SavedTargetWarning` names it unless ``exclude_modules`` does.

    Returns ``model``. Raises :class:`InjectionError` (a ``ValueError``) naming the targets that
    match nothing, the modules that cannot take LoRA, unknown fused slices, targets all inside
    modules_to_save, a rank_pattern that gives every target rank 0, or a model that was injected before (all checked before the model changes).
    """
    if isinstance(config, dict):
        config = LoRAConfig(**config)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config={config!r}: expected a lora.LoRAConfig or a dict of its keys")
    if model_state.active_config(model) is not None or any(True for _ in lora_layers(model)):
        raise InjectionError(
            f"{type(model).__name__} already has LoRA layers: lora.inject was applied before "
            "(call lora.merge_and_unload first, or load more adapters with lora.load_adapter)"
        )
    plan = TargetPlan(model, config)
    overlap = plan.saved_targets_warning()
    if overlap is not None:
        warnings.warn(overlap, SavedTargetWarning, stacklevel=2)
    built = {n: s for n, s in plan.targets.items() if config.rank_for(n) > 0}
    if plan.targets and not built:
        raise InjectionError(
            f"rank_pattern={config.rank_pattern!r} gives every target rank 0 "
            f"({', '.join(list(plan.targets)[:6])}{', ...' if len(plan.targets) > 6 else ''}): "
            "no module would get a LoRA layer; expected at least one target with r > 0"
        )
    for name, slices in built.items():
        set_submodule(
            model, name, build_layer(name, plan.modules[name], slices, config, plan, lora_dtype)
        )

    mark_only_lora_as_trainable(model, bias=config.bias)
    for wrapper in wrap_modules_to_save(model, config, "default").values():
        wrapper.activate_adapter("default")
        for p in cast(nn.Module, wrapper.get_adapter("default")).parameters():
            p.requires_grad_(True)
    settle(model)  # a tied head merges into a weight of its own; torch's encoder calls its layers
    model_state.set_active_config(model, config)
    return model


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that ``model.lora_config.modules_to_save`` names (trained in full, saved with the
    adapter): name -> its :class:`~lora.layers.saved.ModulesToSaveWrapper`."""
    config = model_state.active_config(model)
    return modules_to_save_for(model, config) if config is not None else {}


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain layer holding ``W + scaling·ΔW``; returns ``model``.

    The plain layer is the module that :func:`inject` replaced (same class, same attributes), or
    for layers built by hand the torch base class. No extra copy of the weights is made, but for
    a weight that another module holds too (a tied ``lm_head`` with an adapter): that layer gets
    W + ΔW in a weight of its own and the other module keeps W. A modules_to_save wrapper gives
    way to the active adapter's copy (the original when it has none). Either way a tie broken
    (also a copy under ``ensure_weight_tying=False`` on Phi-4-mini's tied ``lm_head``) leaves the
    two modules untied, so ``model.config.tie_word_embeddings`` becomes False: a later
    ``save_pretrained`` then writes both weights instead of dropping the trained one.
    After this the model is an ordinary torch model, ready for ``save_pretrained``. A 4-bit (NF4)
    base is first dequantised to its compute dtype (``lora.dequantize``), every Linear of it:
    merging into 4 bits would lose the adapter's precision.
    """
    from .quant import dequantize, quantized_modules

    if quantized_modules(model):  # a 4-bit base: merge into a 16-bit copy, never into 4 bits
        dequantize(model)
    wrappers = list(saved_modules(model))
    for name, wrapper in wrappers:
        set_submodule(model, name, wrapper.unwrap())
    mark_shared_weights(model)
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        if layer.has_adapter:  # a weight tied to another module's gets a Parameter of its own
            layer.add_delta_to_weight()
        plain = layer.unwrap()
        if name:
            set_submodule(model, name, plain)
        else:
            model = plain
    _untie_config_if_untied(model)
    _unsettle(model)
    model_state.clear(model)
    return model


def _untie_config_if_untied(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    try:
        inp = model.get_input_embeddings()  # type: ignore[operator]
        out = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return
    if inp is not None and out is not None and inp.weight is not out.weight:
        cfg.tie_word_embeddings = False  # type: ignore[union-attr]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a parameter shared by several modules counts once.
    A 4-bit base weight (lora.quant) counts in the total with its size, not with its storage
    (buffers, or in the layout FSDP shards, frozen uint8/int8 Parameters)."""
    from .quant import quantized_modules

    quantized = quantized_modules(model)
    storage = {id(p) for w in quantized.values() for p in w.parameters()}
    trainable = total = 0
    for p in model.parameters():
        if id(p) in storage:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    total += sum({id(w): w.numel() for w in quantized.values()}.values())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line
