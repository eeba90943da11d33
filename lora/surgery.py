"""Model surgery: swap the matching layers of any ``nn.Module`` for LoRA layers, and back.

    model = lora.inject(model, lora.LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ... train ...
    model = lora.merge_and_unload(model)   # plain layers holding W + ΔW

Matching (PEFT's rules): a list entry matches a module whose name equals it or ends with
``"." + entry``; a string is a regex that must match the whole module name; ``"all-linear"`` is
every ``nn.Linear`` (and GPT-2-style Conv1D) but the output head. A list entry may name slices of a
fused projection, ``"qkv_proj[q,v]"``: the layer becomes a :class:`~lora.MergedLinear` over those
slices, with the sizes the model declares (``model.fused_splits``) or, for Hugging Face Phi-3-style
configs, the sizes its ``config`` implies.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import LoRAConfig, parse_target
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear
from .layers.utils import lora_layers, mark_only_lora_as_trainable

__all__ = [
    "inject",
    "merge_and_unload",
    "fused_splits",
    "trainable_parameters",
    "print_trainable_parameters",
    "InjectionError",
]

_CONV = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}


class InjectionError(ValueError):
    """The config does not fit the model: targets that match nothing or an unsupported module."""


# --- which modules ------------------------------------------------------------------------------
def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: a linear layer storing its weight as (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and not isinstance(module, LoRALayer)) or _is_gpt2_conv1d(module)


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _output_head_names(model: nn.Module) -> set[str]:
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            head = None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    return names or {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}


def fused_splits(model: nn.Module) -> dict[str, dict[str, int]]:
    """The fused projections of ``model`` and their slices: ``{"qkv_proj": {"q": 3072, "k": 3072, "v": 3072}, ...}``.

    From ``model.fused_splits`` when the model declares it (lora's Phi-3 does), else inferred from a
    Hugging Face Phi-3-style ``model.config`` (num_attention_heads, num_key_value_heads, head_dim or
    hidden_size, intermediate_size). Empty when neither applies.
    """
    declared = getattr(model, "fused_splits", None)
    if isinstance(declared, dict):
        return declared
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if cfg is None or not heads:
        return {}
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    splits: dict[str, dict[str, int]] = {
        "qkv_proj": {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
    }
    if getattr(cfg, "intermediate_size", None):
        splits["gate_up_proj"] = {"gate": cfg.intermediate_size, "up": cfg.intermediate_size}
    return splits


class _Plan:
    """Which module gets which LoRA layer: ``{module name: slices or None}``, checked against the model.

    ``existing_ok``: the model may already hold LoRA layers (loading an adapter into it, or adding a
    named one); each counts as the torch layer it wraps, and the modules inside it are not candidates.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig, existing_ok: bool = False):
        self.model, self.config, self.existing_ok = model, config, existing_ok
        self.modules = dict(model.named_modules())
        inside = tuple(f"{n}." for n, m in self.modules.items() if n and isinstance(m, LoRALayer)) if existing_ok else ()
        self.names = [n for n in self.modules if n and not (inside and n.startswith(inside))]
        self.targets: dict[str, tuple[str, ...] | None] = {}
        self._match_targets()
        self._drop_excluded()
        self._check_types()

    def _match_targets(self) -> None:
        targets = self.config.target_modules
        if targets is None:
            raise InjectionError("target_modules=None: name the modules to adapt (a list of names, a regex, or 'all-linear')")
        if not isinstance(targets, str) and len(targets) == 0:
            raise InjectionError("target_modules=[]: nothing to adapt; name the modules to adapt "
                                 "(a list of names, a regex, or 'all-linear')")
        if targets == "all-linear":
            heads = _output_head_names(self.model)
            self.targets = {n: None for n in self.names if self._linear(self.modules[n]) and n not in heads}
            if not self.targets:
                raise InjectionError("target_modules='all-linear': the model has no Linear layer besides its output head")
            return
        if isinstance(targets, str):
            self.targets = {n: None for n in self.names if re.fullmatch(targets, n)}
            if not self.targets:
                raise InjectionError(f"target_modules={targets!r}: the regex matches no module name")
            return
        unmatched = []
        for entry in targets:
            suffix, slices = parse_target(entry)
            hits = [n for n in self.names if _suffix_match(n, suffix)]
            if not hits:
                unmatched.append(entry)
            for n in hits:
                if n in self.targets and self.targets[n] != slices:
                    raise InjectionError(f"target_modules: module {n!r} is named twice with different slices")
                self.targets[n] = slices
        if unmatched:
            example = ", ".join(sorted({n.split('.')[-1] for n in self.names})[:12])
            raise InjectionError(
                f"target_modules: {unmatched!r} match no module of {type(self.model).__name__} "
                f"(module names end with e.g. {example})"
            )

    def _drop_excluded(self) -> None:
        excl = self.config.exclude_modules
        if excl is None:
            return
        if isinstance(excl, str):
            drop = {n for n in self.targets if re.fullmatch(excl, n)}
        else:
            drop = {n for n in self.targets if any(_suffix_match(n, e) for e in excl)}
        for n in drop:
            del self.targets[n]
        if not self.targets:
            raise InjectionError(f"exclude_modules={excl!r} excludes every module that target_modules matched")

    def _linear(self, m: nn.Module) -> bool:
        return _is_linear(m) or (self.existing_ok and isinstance(m, (Linear, MergedLinear)))

    def _check_types(self) -> None:
        bad = []
        splits = fused_splits(self.model)
        for n, slices in self.targets.items():
            m = self.modules[n]
            if isinstance(m, LoRALayer) and not self.existing_ok:
                raise InjectionError(f"module {n!r} is already a LoRA layer: lora.inject was applied to this model before")
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
                out_rows = m.out_features if isinstance(m, LoRALayer) else (
                    m.weight.shape[1] if _is_gpt2_conv1d(m) else m.weight.shape[0])
                if sum(known.values()) != out_rows:
                    raise InjectionError(
                        f"module {n!r}: its slices {known} sum to {sum(known.values())}, but it has {out_rows} output rows"
                    )
            elif not (self._linear(m) or type(m) is nn.Embedding or type(m) in _CONV
                      or (self.existing_ok and isinstance(m, LoRALayer))):
                bad.append(f"{n} ({type(m).__name__})")
        if bad:
            raise InjectionError(
                "target_modules match modules that cannot take LoRA (supported: Linear, Embedding, Conv1d/2d/3d): "
                + ", ".join(bad)
            )


def _lora_dtype(weight: torch.Tensor, lora_dtype) -> torch.dtype:
    if lora_dtype == "auto":
        # As PEFT: adapters on a half-precision base are kept in fp32 (their updates are tiny).
        return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    if lora_dtype is None:
        return weight.dtype
    if not isinstance(lora_dtype, torch.dtype):
        raise TypeError(f"lora_dtype={lora_dtype!r}: expected a torch.dtype, 'auto' or None")
    if not lora_dtype.is_floating_point or lora_dtype.is_complex:
        raise TypeError(f"lora_dtype={lora_dtype}: expected a floating-point dtype (LoRA weights "
                        "are trained by gradient), such as torch.float32 or torch.bfloat16")
    return lora_dtype


def _build(name: str, base: nn.Module, slices, config: LoRAConfig, splits, lora_dtype) -> LoRALayer:
    kwargs = dict(
        r=config.rank_for(name),
        lora_alpha=config.alpha_for(name),
        merge_weights=config.merge_weights,
        use_rslora=config.use_rslora,
        lora_dtype=_lora_dtype(base.weight, lora_dtype),
        init_lora_weights=config.init_lora_weights,
    )
    if type(base) is nn.Embedding:
        return Embedding.from_base(base, **kwargs)
    kwargs["lora_dropout"] = config.lora_dropout
    if type(base) in _CONV:
        return _CONV[type(base)].from_base(base, **kwargs)
    fifo = config.fan_in_fan_out or _is_gpt2_conv1d(base)
    if slices is not None:
        known = splits[name.split(".")[-1]]
        return MergedLinear.from_base(
            base, enable_lora=[s in slices for s in known], split_sizes=list(known.values()),
            fan_in_fan_out=fifo, **kwargs,
        )
    return Linear.from_base(base, fan_in_fan_out=fifo, **kwargs)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: LoRAConfig | dict, lora_dtype="auto") -> nn.Module:
    """Swap the layers of ``model`` that ``config.target_modules`` names for LoRA layers, in place.

    Each new layer shares the replaced layer's weight and bias tensors (no copy: same dtype and
    device). LoRA parameters go on the same device, in ``lora_dtype`` ("auto": fp32 over a
    bf16/fp16 base, else the base dtype; or a torch.dtype; or None for the base dtype). Then
    everything is frozen but the LoRA parameters, the biases ``config.bias`` names, and
    ``config.modules_to_save``. A rank of 0 from ``rank_pattern`` leaves that module alone.

    Returns ``model``. Raises :class:`InjectionError` (a ``ValueError``) naming the targets that
    match nothing, the modules that cannot take LoRA, unknown fused slices, or a model that was
    injected before.
    """
    if isinstance(config, dict):
        config = LoRAConfig(**config)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config={config!r}: expected a lora.LoRAConfig or a dict of its keys")
    if getattr(model, "lora_config", None) is not None or any(True for _ in lora_layers(model)):
        raise InjectionError(
            f"{type(model).__name__} already has LoRA layers: lora.inject was applied before "
            "(call lora.merge_and_unload first, or load more adapters with lora.load_adapter)"
        )
    plan = _Plan(model, config)
    splits = fused_splits(model)
    for name, slices in plan.targets.items():
        base = plan.modules[name]
        if config.rank_for(name) == 0:
            continue
        _set_submodule(model, name, _build(name, base, slices, config, splits, lora_dtype))

    mark_only_lora_as_trainable(model, bias=config.bias)
    saved = _modules_to_save(model, config)
    for m in saved.values():
        for p in m.parameters():
            p.requires_grad_(True)
    model.lora_config = config
    return model


def _modules_to_save(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    if not config.modules_to_save:
        return {}
    found: dict[str, nn.Module] = {}
    missing = []
    for entry in config.modules_to_save:
        hits = {n: m for n, m in model.named_modules() if n and _suffix_match(n, entry)}
        if not hits:
            missing.append(entry)
        found.update(hits)
    if missing:
        raise InjectionError(f"modules_to_save: {missing!r} match no module of {type(model).__name__}")
    return found


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that ``model.lora_config.modules_to_save`` names (trained in full, saved with the adapter)."""
    config = getattr(model, "lora_config", None)
    return _modules_to_save(model, config) if config is not None else {}


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its plain layer holding ``W + scaling·ΔW``; returns ``model``.

    The plain layer is the module that :func:`inject` replaced (same class, same attributes), or
    for layers built by hand the torch base class. No extra copy of the weights is made. After
    this the model is an ordinary torch model, ready for ``save_pretrained``.
    """
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        weight = layer.weight
        if layer.has_adapter:
            weight.add_(layer.delta_weight().to(weight.dtype))
        plain = layer.__dict__.get("_lora_base_module")
        if plain is None:
            plain = _plain_like(layer)
            if getattr(layer, "fan_in_fan_out", False):  # a torch Linear stores (out, in)
                weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=weight.requires_grad)
        plain.weight = weight
        if "bias" in plain._parameters:
            plain.bias = layer.bias
        plain.train(layer.training)
        if name:
            _set_submodule(model, name, plain)
        else:
            model = plain
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def _plain_like(layer: LoRALayer) -> nn.Module:
    """A torch layer of ``layer``'s base class with its hyper-parameters, on the meta device."""
    meta = {"device": "meta", "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **meta)
    if isinstance(layer, nn.Embedding):
        return nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                            max_norm=layer.max_norm, norm_type=layer.norm_type,
                            scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, **meta)
    for torch_cls in _CONV:
        if isinstance(layer, torch_cls):
            return torch_cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                             padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                             bias=layer.bias is not None, padding_mode=layer.padding_mode, **meta)
    raise TypeError(f"merge_and_unload: no plain layer known for {type(layer).__name__}")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line
