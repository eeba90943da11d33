"""LoRAConfig: what to adapt and how, with the key names of PEFT's LoraConfig.

``lora.LoRAConfig(**peft_config)`` accepts the dictionaries people already have (the seed's
``peft_config``, the body of a PEFT ``adapter_config.json`` via :meth:`LoRAConfig.from_peft_dict`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .checks import (
    BIAS_MODES,
    check_alpha,
    check_choice,
    check_dropout,
    check_rank,
    check_str_list,
    sort_keys,
)

__all__ = ["LoRAConfig", "parse_target", "pattern_value", "pattern_values", "BIAS_MODES"]

# Keys PEFT writes into adapter_config.json that carry no meaning for a plain LoRA adapter when they
# hold these values. from_peft_dict drops them; any other value is refused as unsupported.
_PEFT_INERT: dict[str, tuple | None] = {
    "peft_type": ("LORA",),
    "auto_mapping": None,  # any value
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": None,
    "init_lora_weights": (True,),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "use_dora": (False,),
    "lora_bias": (False,),
    "megatron_config": (None,),
    "megatron_core": None,
    "loftq_config": ({},),
    "layer_replication": (None,),
    "runtime_config": None,
    "eva_config": (None,),
    "corda_config": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "qalora_group_size": None,
    "use_qalora": (False,),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "peft_version": None,
}


# init_lora_weights values PEFT writes that describe only a fresh adapter's starting point.
_INIT_ONLY = (True, False, "gaussian")


@dataclass
class LoRAConfig:
    """What :func:`lora.inject` adapts, and how.

    Attributes (PEFT's names):
        r: rank (> 0).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora).
            Nonzero (0 would leave the adapter without effect or gradient); negative flips its sign.
        lora_dropout: dropout on the adapters' input, in [0, 1).
        bias: "none" | "all" | "lora_only": which biases train.
        target_modules: a list of module-name suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``),
            a regex string matched against the whole module name, or ``"all-linear"`` (every Linear
            but the output head). A list entry may name slices of a fused projection:
            ``"qkv_proj[q,v]"``, ``"gate_up_proj[up]"``.
        exclude_modules: suffixes or a regex, as target_modules; matching modules are left alone.
        modules_to_save: module-name suffixes trained in full and saved with the adapter (a
            classifier head): each adapter trains its own copy; the original stays untouched.
        ensure_weight_tying: a modules_to_save module whose weight is tied to another module's
            (``lm_head`` and ``embed_tokens``): False (PEFT's default) trains a copy of the
            named module only, so the tie is broken; True makes the partner share the copy, so
            both change.
        use_rslora: rank-stabilised scaling.
        rank_pattern / alpha_pattern: ``{regex: r}`` / ``{regex: alpha}`` overriding r / lora_alpha for
            modules whose name ends with a match (``"layers\\.0\\.self_attn\\.o_proj"``).
        fan_in_fan_out: the targets store their weight as (in, out) (GPT-2's Conv1D; detected anyway).
        init_lora_weights: True (B = 0: the adapted model starts equal to the base) or False (B random too).
        task_type: recorded (written to adapter_config.json), not interpreted.
        merge_weights: merge on ``eval()`` as loralib does; False by default here, as in PEFT.
    Raises ``ValueError``/``TypeError`` naming the key for a bad value; unknown keys are a ``TypeError``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    ensure_weight_tying: bool = False
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    task_type: str | None = None
    merge_weights: bool = False

    def __post_init__(self) -> None:
        self.r = check_rank(self.r)
        if self.r == 0:
            raise ValueError("r=0: expected a positive rank for an adapter")
        self.lora_alpha = check_alpha(self.lora_alpha)
        self.lora_dropout = check_dropout(self.lora_dropout)
        check_choice(self.bias, BIAS_MODES, "bias")
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = check_str_list(self.modules_to_save, "modules_to_save")
        for name in (
            "use_rslora",
            "fan_in_fan_out",
            "init_lora_weights",
            "merge_weights",
            "ensure_weight_tying",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: expected True or False")
        self.rank_pattern = _check_pattern(self.rank_pattern or {}, "rank_pattern", check_rank)
        self.alpha_pattern = _check_pattern(self.alpha_pattern or {}, "alpha_pattern", check_alpha)
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise TypeError(f"task_type={self.task_type!r}: expected a string such as 'CAUSAL_LM'")

    # --- per-module values -----------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    # --- dictionaries ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_peft_dict(self) -> dict[str, Any]:
        """The body of a PEFT ``adapter_config.json`` for this config (without base_model_name_or_path)."""
        d = self.to_dict()
        d.pop("merge_weights")
        targets = d["target_modules"]
        d["target_modules"] = targets
        d.update(peft_type="LORA", use_dora=False, inference_mode=True)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Build from an ``adapter_config.json`` body, ignoring PEFT's bookkeeping keys.

        Keys a newer PEFT adds are ignored while their value means "off" (None, False, {}, []).
        Raises ``ValueError`` naming a key whose value asks for a feature we do not implement
        (``use_dora=True``, ``layers_to_transform``, ...), and for a peft_type other than LORA.
        """
        d = dict(d)
        if d.get("init_lora_weights", None) in _INIT_ONLY:
            # It only says how a fresh adapter starts; loaded tensors replace that.
            d["init_lora_weights"] = True
        names = {f.name for f in dataclasses.fields(cls)}
        off: tuple = (None, False, {}, [])  # a key a newer PEFT added, for a feature that is off
        kwargs = sort_keys(d, names, _PEFT_INERT, "adapter config", off_values=off)
        return cls(**kwargs)


def _check_targets(value, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(
                    f"{name}={value!r}: not a valid regular expression ({e})"
                ) from None
        return value
    targets = check_str_list(value, name)
    for t in targets:
        parse_target(t, name)  # validates the bracket syntax
    return targets


_TARGET_RE = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<slices>[^\[\]]*)\])?$")


def parse_target(target: str, name: str = "target_modules") -> tuple[str, tuple[str, ...] | None]:
    """``"qkv_proj[q,v]"`` -> ``("qkv_proj", ("q", "v"))``; ``"o_proj"`` -> ``("o_proj", None)``."""
    m = _TARGET_RE.match(target.strip())
    if not m:
        raise ValueError(
            f"{name} entry {target!r}: expected a module name, optionally with slices as 'qkv_proj[q,v]'"
        )
    if m.group("slices") is None:
        return m.group("name"), None
    slices = tuple(s.strip() for s in m.group("slices").split(",") if s.strip())
    if not slices:
        raise ValueError(
            f"{name} entry {target!r}: empty slice list; expected e.g. 'qkv_proj[q,v]'"
        )
    if len(set(slices)) != len(slices):
        raise ValueError(f"{name} entry {target!r}: a slice is named twice")
    return m.group("name"), slices


def _check_pattern(pattern, name: str, check_value) -> dict:
    if not isinstance(pattern, dict):
        raise TypeError(f"{name}={pattern!r}: expected a dict of regex -> value")
    out = {}
    for key, value in pattern.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} key {key!r}: expected a string (a regex over module names)")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{name} key {key!r}: not a valid regular expression ({e})") from None
        out[key] = check_value(value, f"{name}[{key!r}]")
    return out


def pattern_value(pattern: dict, module_name: str, default):
    """The value of the first key of ``pattern`` (a regex) that matches ``module_name``, else
    ``default``. As PEFT: a key matches a module whose name ends with it, on a dot boundary."""
    for value in pattern_values(pattern, module_name):
        return value
    return default


def pattern_values(pattern: dict, module_name: str) -> list:
    """The values of every key of ``pattern`` that matches ``module_name``, in key order (the
    first is the one that counts)."""
    return [v for k, v in pattern.items() if re.fullmatch(rf"(?:.*\.)?(?:{k})", module_name)]
