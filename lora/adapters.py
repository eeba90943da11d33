"""Adapter files in PEFT's LoRA format: save, load with a strict check, into one model or several.

A directory, as PEFT writes it (docs/adapters.md has the details):

    adapter_config.json          PEFT's LoraConfig: peft_type "LORA", r, lora_alpha, target_modules,
                                 rank_pattern, alpha_pattern, use_rslora, lora_dropout, bias, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   (r, in)     conv: (r, in, *kernel)
                                 base_model.model.<module>.lora_B.weight   (out, r)    conv: (out, r, 1, ...)
                                 base_model.model.<module>.lora_embedding_A  (r, num_embeddings)
                                 base_model.model.<module>.lora_embedding_B  (embedding_dim, r)
                                 base_model.model.<module>.<param>         modules_to_save, biases
                                 (a targeted module's own bias / embedding weight: <module>.base_layer.<param>)

A :class:`~lora.MergedLinear` adapter (say qkv_proj with slices q and v, rank r each) is written as
the one LoRA over the fused matrix it equals: A (r·k, in) as is, B (out, r·k) with each slice's
block on its rows and zeros elsewhere, and exact-name rank_pattern / alpha_pattern entries (rank
r·k, alpha α·k, or α·√k with use_rslora) so that the scaling is unchanged. PEFT loads it as any
adapter; :func:`load_adapter` reads the original config from the safetensors header
(``lora.config``) and restores the MergedLinear.

Loading never unpickles: safetensors, or ``torch.load(weights_only=True)`` for a legacy
``adapter_model.bin`` or a loralib ``.pt`` file. Everything is read and checked before the model is
touched, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as LF
from . import model_state, multi
from ._io import atomic_save_safetensors, atomic_write_json
from ._regex_guard import check_bounded_regex
from .checks import listing
from .config import LoRAConfig, parse_target, pattern_values
from .layers import LAYER_KINDS, AdapterWeights, LoRALayer
from .layers.base import AdapterKey, adapter_state_keys, peft_named_problem, route_adapter_key
from .layers.saved import ModulesToSaveWrapper, copy_state, saved_modules
from .layers.utils import lora_layers, saved_prefixes
from .surgery import inject, settle
from .targets import (
    InjectionError,
    SavedTargetWarning,
    TargetPlan,
    layer_class_for,
    module_aliases,
    modules_to_save_for,
    resolve_lora_dtype,
    saved_copies,
    saved_match,
    saved_owners,
    set_submodule,
    sharded_copies_problem,
    suffix_match,
    tied_copy_owners,
    wrap_modules_to_save,
)

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "AdapterError",
    "PeftCompatibilityWarning",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's: PeftModel.base_model (LoraModel) .model (the wrapped model)
FORMAT_VERSION = "1"
# The adapter_config.json keys save_adapter rewrites for fused slices; the safetensors header keeps
# the values it wrote, so the loader can tell whether the JSON was edited since.
_STRUCTURAL = (
    "target_modules",
    "exclude_modules",
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
)
# Every LoRA key name a file may hold (each layer kind names its own: LoRALayer.peft_keys).
_LORA_KEY_SUFFIXES = tuple(dict.fromkeys(k for cls in LAYER_KINDS for k in cls.peft_keys))


class PeftCompatibilityWarning(UserWarning):
    """PEFT's format cannot say exactly what the adapter is (the message says what):
    :func:`save_adapter` writes a file PEFT will read as something else, and no file could say
    it so that PEFT reads the same; :func:`load_adapter` reads a PEFT file that may not say what
    PEFT trained."""


class AdapterError(ValueError):
    """An adapter file that cannot be read, or that does not fit the model (the message names the
    file and the keys or modules)."""


# ================================================================================================
# Reading files (never unpickles)
# ================================================================================================
@dataclass
class AdapterFiles:
    """What an adapter directory holds: the config's JSON body, the tensors (keys as in the file),
    the safetensors header metadata, and where each came from."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    config_path: Path
    weights_path: Path


def read_adapter(path: str | os.PathLike) -> AdapterFiles:
    """Read an adapter directory, or a weights file with the directory's config beside it: config
    and every tensor. A directory's weights are its ``adapter_model.safetensors`` (or legacy
    ``adapter_model.bin``); a file given is read itself, whatever its name (``.safetensors``, else
    a torch file read without unpickling).

    Raises :class:`AdapterError` naming the file when the config is missing or not JSON, or the
    weights are missing, truncated, corrupt, or (legacy ``.bin``) hold anything but tensors.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(
            f"{config_path}: no such file; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    weights_path = path if path.is_file() else directory / WEIGHTS_NAME
    if weights_path.is_file() and weights_path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(weights_path)
    elif path.is_file():
        tensors, metadata = read_torch_file(weights_path), {}
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        weights_path = directory / LEGACY_WEIGHTS_NAME
        tensors, metadata = read_torch_file(weights_path), {}
    else:
        raise AdapterError(
            f"{directory}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in the adapter directory"
        )
    return AdapterFiles(config, tensors, metadata, config_path, weights_path)


def _peft_weights_file(file: Path) -> bool:
    """Whether ``file`` is the weights of a PEFT-format adapter directory: a config beside it, and
    PEFT's file name or keys that all carry PEFT's prefix (else it is a ``lora_state_dict`` file
    that happens to lie in an adapter directory, and is read as one)."""
    if not (file.parent / CONFIG_NAME).is_file():
        return False
    if file.name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        return True
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return False  # the loralib loader names the broken file
    else:
        keys = list(read_torch_file(file))
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def read_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (in memory, CPU) and its header metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(
            f"{file}: not a valid safetensors file, truncated or corrupt ({e})"
        ) from None
    return tensors, metadata


def read_torch_file(file: Path) -> dict[str, Tensor]:
    """A legacy ``.bin`` / ``.pt`` state dict through ``torch.load(weights_only=True)``: tensors and
    containers only, so no code in the file runs. Anything else is an :class:`AdapterError`."""
    try:
        state = torch.load(os.fspath(file), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # UnpicklingError, RuntimeError, EOFError, zipfile errors ...: all mean "refused"
        raise AdapterError(
            f"{file}: refused or unreadable as a weights-only torch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{file}: expected a dict of str -> tensor (a state dict)")
    return state


# ================================================================================================
# Config: PEFT's JSON <-> LoRAConfig
# ================================================================================================
def _check_file_regexes(body: dict) -> None:
    # Adapter files come from anywhere; a regex in one is matched against every module name, and a
    # backtracking one (``(.*.*)*X``) would never return. Only regexes of bounded cost are matched.
    for key in ("target_modules", "exclude_modules"):
        value = body.get(key)
        if isinstance(value, str) and value != "all-linear":
            check_bounded_regex(value, key)
    for key in ("rank_pattern", "alpha_pattern"):
        value = body.get(key)
        if isinstance(value, dict):
            for pattern in value:
                if isinstance(pattern, str):
                    check_bounded_regex(pattern, f"{key} key")


def config_from_files(files: AdapterFiles) -> LoRAConfig:
    """The LoRAConfig an adapter directory describes; with lora's fused-slice metadata (and a JSON
    not edited since) the original config, whose targets name the slices."""
    try:
        _check_file_regexes(files.config)
        config = LoRAConfig.from_peft_dict(dict(files.config))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{files.config_path}: {e}") from None

    if "lora.config" not in files.metadata:
        return config
    try:
        ours_body = json.loads(files.metadata["lora.config"])
        _check_file_regexes(ours_body if isinstance(ours_body, dict) else {})
        ours = LoRAConfig(**ours_body)
        written = json.loads(files.metadata["lora.exported"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(
            f"{files.weights_path}: unreadable lora metadata in the safetensors header ({e})"
        ) from None
    now = {k: _json_normal(files.config.get(k)) for k in written}
    if now != _json_normal(written):
        edited = sorted(k for k in written if now.get(k) != _json_normal(written[k]))
        warnings.warn(
            f"{files.config_path}: {edited} differ from what lora.save_adapter wrote; loading the adapter as "
            "PEFT would (fused slices as one LoRA over the fused matrix)",
            stacklevel=3,
        )
        return config
    return dataclasses.replace(
        config, **{k: getattr(ours, k) for k in _STRUCTURAL + ("fan_in_fan_out", "merge_weights")}
    )


def _json_normal(value):
    return json.loads(json.dumps(value))


def _peft_config_dict(
    model: nn.Module,
    config: LoRAConfig,
    modules: dict[str, tuple[int, float]],
    use_rslora: bool,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """The adapter_config.json body under which PEFT builds, for each module in ``modules``, an
    adapter of exactly that (rank, alpha), and none elsewhere."""
    d = config.to_peft_dict()
    d["modules_to_save"] = _peft_modules_to_save(model, config)
    config = dataclasses.replace(config, modules_to_save=d["modules_to_save"])  # as PEFT reads it
    targets = config.target_modules
    if isinstance(targets, list):
        targets = list(
            dict.fromkeys(parse_target(t)[0] for t in targets)
        )  # slices: the whole fused module
    exclude = config.exclude_modules
    if targets == "all-linear" or set(_peft_targets(model, targets, exclude, config)) != set(
        modules
    ):
        # "all-linear": PEFT leaves the output head out of a transformers model only (it adapts a
        # plain module's lm_head), and writes the names itself. Rank-0 patterns or slices leave
        # modules out. Either way: the modules by name.
        targets, exclude = _exact_targets(model, config, modules)
    d.update(target_modules=targets, exclude_modules=exclude, use_rslora=use_rslora)
    d["rank_pattern"] = _exact_pattern(
        modules, {k: v for k, v in config.rank_pattern.items() if v}, config.r, 0
    )
    d["alpha_pattern"] = _exact_pattern(modules, config.alpha_pattern, config.lora_alpha, 1)
    d["base_model_name_or_path"] = base_model_name_or_path
    return d


def _peft_targets(model: nn.Module, targets, exclude, config: LoRAConfig) -> list[str]:
    r"""What PEFT targets under these names. Both leave out the targets a modules_to_save module is
    or holds, but PEFT finds those by ``re.match(rf"(^|.*\.){entry}($|\..*)", name)``, at a dot
    only, while it wraps by string ending: a target that ``"head"`` wraps (``lm_head``) stays a
    target there (and PEFT then refuses to wrap it)."""
    try:
        config = dataclasses.replace(config, target_modules=targets, exclude_modules=exclude)
        plan = TargetPlan(model, config, existing_ok=True)
    except InjectionError:
        return []
    entries = config.modules_to_save or []
    return list(plan.targets) + [
        n for n in plan.saved_targets if not any(_peft_saved_target(e, n) for e in entries)
    ]


def _peft_saved_target(entry: str, name: str) -> bool:
    # PEFT's check_target_module_exists: the entry is used as a regex, as it is.
    try:
        return re.match(rf"(^|.*\.){entry}($|\..*)", name) is not None
    except re.error:
        return False


def _exact_targets(
    model: nn.Module, config: LoRAConfig, modules: dict[str, tuple[int, float]]
) -> tuple[list[str] | str, list[str] | None]:
    """target_modules and exclude_modules under which PEFT adapts exactly ``modules``: their names.
    A name PEFT (like us) also reads as the suffix of longer ones (a top-level ``proj`` names
    ``layers.0.attn.proj`` too) has those excluded by name; where even that is not exact, a regex
    of the names. Raises :class:`AdapterError` when neither is (a regex too long to read back)."""
    names, want = list(modules), set(modules)
    extra = [n for n in _peft_targets(model, names, None, config) if n not in want]
    regex = "|".join(re.escape(n) for n in names)
    for targets, exclude in ((names, extra or None), (regex, None)):
        if targets is regex:
            try:
                check_bounded_regex(regex, "target_modules")
            except ValueError:
                continue
        if set(_peft_targets(model, targets, exclude, config)) == want:
            return targets, exclude
    raise AdapterError(
        f"save_adapter: no target_modules / exclude_modules that PEFT reads as exactly the "
        f"adapted modules ({listing(names, 6)}): their names are suffixes of other modules' "
        f"({listing(extra, 6)}) and a regex of them is too long"
    )


def _peft_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str] | None:
    """config.modules_to_save as the file writes it, so that PEFT wraps the modules we wrap.

    Both match an entry by string ending (:func:`~lora.targets.saved_match`), but where a module
    named lies inside another one named, ours trains it in the outer one's copy and PEFT wraps
    it again inside (:func:`_peft_wrapped`). The entries are written as they are when PEFT wraps
    the modules we wrap, else as the full names of ours, and where PEFT would read even those as
    more modules a :class:`PeftCompatibilityWarning` names them."""
    entries = config.modules_to_save
    if not entries:
        return entries
    modules = dict(model.named_modules())
    ours = list(modules_to_save_for(model, config, modules))
    names = list(_plain_names(modules))
    if set(_peft_wrapped(names, entries)) == set(ours):
        return entries
    extra = [n for n in _peft_wrapped(names, ours) if n not in ours]
    if extra:
        warnings.warn(
            f"save_adapter: modules_to_save={entries!r} names {ours!r} here; PEFT, reading "
            f"the file, also wraps {extra!r}, each inside its parent's wrapper, where the copy "
            "does not run. Name the outer modules alone to have PEFT read the same",
            PeftCompatibilityWarning,
            stacklevel=4,
        )
    return ours


def _plain_names(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The model's modules by the names PEFT's model has for them, those from before any LoRA
    layer or modules_to_save wrapper: a wrapper's original stands at the wrapper's name (its
    submodules under it), its copies and a LoRA layer's insides are left out."""
    wrappers = tuple(f"{n}." for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper))
    layers = tuple(f"{n}." for n, m in modules.items() if isinstance(m, LoRALayer))
    out = {}
    for n, m in modules.items():
        if not n or (layers and n.startswith(layers)):
            continue
        w = next((w for w in wrappers if n.startswith(w)), None)
        if w is not None:
            head, _, rest = n[len(w) :].partition(".")
            if head != "original_module" or not rest:
                continue
            n = w + rest
        out[n] = m
    return out


def _as_peft_reads(
    config: LoRAConfig,
    files: AdapterFiles,
    modules: dict[str, nn.Module],
    aliases: list[str] | None = None,
) -> LoRAConfig:
    """The file's config with its module lists meaning what PEFT made of them when it wrote it.

    PEFT ignores a target_modules or modules_to_save entry that matches no module (its
    ``["q_proj", "k_proj", "v_proj"]`` fits many architectures; its sequence-classification models
    write ``["classifier", "score"]``): such entries are dropped here (unless none matches: then
    the error says so). The file is still checked strictly against the result. Warns where PEFT
    wrapped a modules_to_save module again inside its parent's wrapper (:func:`_peft_wrapped`).
    ``aliases``: the other names of modules registered under several (they match, as in inject)."""
    names = list(_plain_names(modules)) + (aliases or [])
    changes: dict[str, Any] = {}
    targets = config.target_modules
    if isinstance(targets, list):
        hit = [t for t in targets if any(suffix_match(n, parse_target(t)[0]) for n in names)]
        if hit and len(hit) < len(targets):
            changes["target_modules"] = hit
    entries = config.modules_to_save
    if entries:
        kept = [e for e in entries if any(saved_match(n, e) for n in names)]
        if kept and len(kept) < len(entries):
            changes["modules_to_save"] = kept
        wrapped = _peft_wrapped(names, entries)
        nested = [n for n in wrapped if n.rpartition(".")[0] in wrapped]
        if nested:
            warnings.warn(
                f"{files.config_path}: modules_to_save={entries!r} names {nested!r} and the "
                "module each lies in; PEFT then wraps each again inside the outer one's wrapper, "
                "where its copy never runs, and freezes the outer copy's, so this file may not "
                "hold what PEFT ran; loaded here as the outer module's copy",
                PeftCompatibilityWarning,
                stacklevel=3,
            )
    return dataclasses.replace(config, **changes) if changes else config


def _ties_the_file_holds(
    model: nn.Module, config: LoRAConfig, files: AdapterFiles, modules: dict[str, nn.Module]
) -> LoRAConfig:
    """The file's config with ``ensure_weight_tying`` as the file's tensors say.

    We tie by Parameter identity (:func:`~lora.targets.tied_partners`); PEFT ties only what
    transformers' ``_tied_weights_keys`` names, so on a plain torch model it trains a copy of the
    named module alone and still writes ``"ensure_weight_tying": true``. Where PEFT tied, it wrote
    the partner's weight too, the same tensor. So a tie is kept only when the file holds the
    partner's ``<m>.weight`` with the named copy's values; else the adapter loads untied (with a
    :class:`PeftCompatibilityWarning` naming the modules): no copy for a partner the file has no
    key for (it runs the original, as in PEFT), and its own copy for one whose key holds other
    values (each key runs its values, as in PEFT). Untied, the config says
    ``ensure_weight_tying=False`` and names the partners that keep a copy."""
    if not config.ensure_weight_tying:
        return config
    try:
        partner_of = tied_copy_owners(model, config, modules)
    except InjectionError:
        return config  # the plan of targets reports the entries
    tensors = {k[len(PREFIX) :]: v for k, v in files.tensors.items() if k.startswith(PREFIX)}
    absent, differing = [], []
    for partner, owner in partner_of.items():
        mine, theirs = f"{partner}.weight", f"{owner}.weight"
        if theirs not in tensors:
            continue  # the strict check names the missing key
        if mine not in tensors:
            absent.append((partner, owner))
        elif not torch.equal(tensors[mine], tensors[theirs]):
            differing.append((partner, owner))
    if not absent and not differing:
        return config
    why = [
        f"it holds no weight for {p!r}, tied to {o!r} in the model: PEFT did not tie them (it "
        f"finds ties through transformers' _tied_weights_keys only) and trained a copy of {o!r} "
        f"alone, so {p!r} keeps the base weight"
        for p, o in absent
    ] + [
        f"it holds different weights for {p!r} and {o!r}, tied in the model: each gets its own copy"
        for p, o in differing
    ]
    warnings.warn(
        f"{files.config_path}: ensure_weight_tying=True, but {files.weights_path.name} did not "
        f"come from tied copies; {'; '.join(why)}. Loaded untied, as PEFT runs the file",
        PeftCompatibilityWarning,
        stacklevel=3,
    )
    # One flag for the whole config: a partner whose key is there (other values, or equal ones
    # beside another pair the file left untied) keeps a copy of its own, named.
    entries = list(config.modules_to_save or [])
    entries += [p for p in partner_of if f"{p}.weight" in tensors and p not in entries]
    return dataclasses.replace(config, ensure_weight_tying=False, modules_to_save=entries)


def _in_place_copy_problems(
    model: nn.Module, config: LoRAConfig, modules: dict[str, nn.Module], adapter_name: str
) -> list[str]:
    """Loading in place, adapter ``adapter_name`` must have a modules_to_save copy of exactly the
    modules the file's config (:func:`_ties_the_file_holds`) gives one, sharing a weight exactly
    where the file's copies do: copies are made, and tied or not, when an adapter is built, never
    by a load into them (a copy made now would never run; one key loaded into shared copies would
    set both). One problem per module where they differ."""
    try:
        owners = saved_owners(model, config, modules)
        named = modules_to_save_for(model, config, modules)
        planned = tied_copy_owners(model, config, modules)
    except InjectionError:
        return []  # the plan of targets reports the entries
    copies = {
        n: c
        for n, m in modules.items()
        if isinstance(m, ModulesToSaveWrapper) and (c := m.get_adapter(adapter_name)) is not None
    }
    where = f"adapter {adapter_name!r} of the model"
    fix = "load the file into a fresh model, or under another adapter_name"
    problems = [
        f"module {n}: the file has a modules_to_save copy of it; {where} has none ({fix})"
        for n in owners
        if n not in copies
    ] + [
        f"module {n}: {where} has a modules_to_save copy of it; the file has none (its config "
        f"neither names it nor ties it to a module it names) ({fix})"
        for n in copies
        if n not in owners
    ]
    weight = {n: c._parameters.get("weight") for n, c in copies.items()}
    for p in owners:
        if weight.get(p) is None:
            continue
        shares = next((n for n in named if n != p and weight.get(n) is weight[p]), None)
        if shares != planned.get(p):
            problems.append(
                f"module {p}: "
                + (
                    f"its copy in {where} shares one weight with the copy of {shares!r}; the "
                    "file's two copies are untied"
                    if shares is not None
                    else f"its copy in {where} has a weight of its own; the file's shares one "
                    f"with the copy of {planned[p]!r} (ensure_weight_tying)"
                )
                + f". Copies are tied or untied when they are made, not by a load into them: {fix}"
            )
    return problems


def _peft_wrapped(names: list[str], entries: list[str]) -> list[str]:
    """The modules PEFT's ``_set_trainable`` wraps for modules_to_save ``entries``: each whose name
    ends with an entry (:func:`~lora.targets.saved_match`), except one inside another it wrapped,
    which it skips, unless that other is its parent: then it wraps it again, inside the parent's
    wrapper (its copy never runs there). Ours: the outer module's copy trains it."""
    read = [n for n in names if any(saved_match(n, e) for e in entries)]
    wrapped = []
    for n in read:
        around = [o for o in read if n.startswith(o + ".")]
        if not around or around == [n.rpartition(".")[0]]:
            wrapped.append(n)
    return wrapped


def _exact_pattern(
    modules: dict[str, tuple[int, float]], pattern: dict, default, which: int
) -> dict:
    """rank_pattern / alpha_pattern as the file writes them, giving each of ``modules`` its value
    (``values[which]``) and the others ``default``. PEFT, like us, takes the first key that
    matches; but its ``save_pretrained`` sorts the keys (``json.dumps(sort_keys=True)``), so a file
    whose meaning depends on their order means something else once PEFT writes it again. So the
    config's keys are kept where every key matching a module gives it its value; else each module
    whose value is not the default is named exactly: ``^`` and its escaped name (a bare name would
    also match longer names ending with it)."""
    if all(
        set(pattern_values(pattern, n)) <= {v[which]}
        and (v[which] == default or pattern_values(pattern, n))
        for n, v in modules.items()
    ):
        return dict(pattern)
    return {f"^{re.escape(n)}": v[which] for n, v in modules.items() if v[which] != default}


# ================================================================================================
# What a config asks of each module
# ================================================================================================
@dataclass(frozen=True)
class _Spec:
    """The adapter a config puts on one module. ``kind``: "linear", "merged" (slices of a fused
    Linear: r per enabled slice), "embedding" or "conv". In the file a merged adapter is one LoRA of
    rank r·k; ``file_shapes`` are the (A, B) shapes the file must hold."""

    kind: str
    r: int
    lora_alpha: float
    use_rslora: bool
    file_shapes: tuple[tuple[int, ...], tuple[int, ...]]
    enable_lora: tuple[bool, ...] = ()
    split_sizes: tuple[int, ...] = ()
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")  # the layer kind's key names

    @property
    def scaling(self) -> float:
        return LF.lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @property
    def file_rank(self) -> int:
        return self.r * sum(self.enable_lora) if self.kind == "merged" else self.r

    def file_keys(self, module: str) -> tuple[str, str]:
        a, b = self.peft_keys
        return f"{module}.{a}", f"{module}.{b}"

    def describe(self) -> str:
        if self.kind == "merged":
            return f"slices {list(self.enable_lora)} of r={self.r} each, scaling {self.scaling:g}"
        return f"{self.kind} r={self.r}, scaling {self.scaling:g}"


def _spec_for(name: str, m: nn.Module, slices, config: LoRAConfig, plan: TargetPlan) -> _Spec:
    r, alpha, rs = config.rank_for(name), config.alpha_for(name), config.use_rslora
    cls = layer_class_for(m, sliced=slices is not None)
    assert cls is not None  # the plan checked that a layer kind takes every target
    if slices is None:
        shapes = cls.peft_shapes(m, r, config.fan_in_fan_out)
        return _Spec(cls.kind, r, alpha, rs, shapes, peft_keys=cls.peft_keys)
    known = plan.split_for(name)
    enable = tuple(s in slices for s in known)
    shapes = cls.peft_shapes(m, r, config.fan_in_fan_out, enable)
    sizes = tuple(known.values())
    return _Spec(cls.kind, r, alpha, rs, shapes, enable, sizes, peft_keys=cls.peft_keys)


def _specs(
    model: nn.Module, config: LoRAConfig, where: str, modules: dict[str, nn.Module]
) -> dict[str, _Spec]:
    try:
        plan = TargetPlan(model, config, existing_ok=True, modules=modules)
    except InjectionError as e:
        raise AdapterError(
            f"{where}: the adapter does not fit {type(model).__name__}: {e}"
        ) from None
    return {
        n: _spec_for(n, plan.modules[n], slices, config, plan)
        for n, slices in plan.targets.items()
        if config.rank_for(n) > 0
    }


def _peft_incompatible(module: nn.Module) -> str | None:
    """Why PEFT's LoRA layer for this module computes something else than ours, or None (each
    layer kind says: :meth:`LoRALayer.peft_incompatibility`)."""
    cls = type(module) if isinstance(module, LoRALayer) else layer_class_for(module)
    return cls.peft_incompatibility(module) if cls is not None else None


# ================================================================================================
# Saving
# ================================================================================================
def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) of ``model`` to directory ``path`` in
    PEFT's LoRA format: ``adapter_model.safetensors`` and ``adapter_config.json``. Returns the path.

    The config comes from the adapter's LoRAConfig (``model.lora_config`` after :func:`lora.inject`),
    or is derived from the layers for models built by hand. ``base_model_name_or_path`` is recorded
    (default: ``model.name_or_path`` when the model has one). LoRA tensors are saved in their own
    dtype; modules_to_save and biases (per ``config.bias``) in the model's. Each file is written
    atomically, the tensors first.

    Raises :class:`AdapterError` when the model holds no such adapter, or a layer computes something
    PEFT's LoRA cannot express (conv with groups > 1, dilation or non-zero padding; embedding max_norm).
    """
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise AdapterError(
            f"save_adapter: parameter {meta!r} is on the meta device (shapes, "
            "no data); load or materialise the weights before saving"
        )
    name = adapter_name if adapter_name is not None else multi.active_adapter(model)
    if name is None:
        names = multi.adapter_names(model)
        raise AdapterError(
            f"save_adapter: {type(model).__name__} has no active adapter (adapters: {names}); "
            "pass adapter_name"
        )
    held = list(multi.adapter_layers(model, name))
    if not held:
        raise AdapterError(
            f"save_adapter: {type(model).__name__} has no adapter {name!r} "
            f"(adapters: {multi.adapter_names(model)})"
        )
    config = multi.adapter_config(model, name) or multi.config_from_layers(model, name)

    tensors: dict[str, Tensor] = {}
    modules: dict[str, tuple[int, float]] = {}
    rslora, fused = set(), False
    for module_name, layer, adapter in held:
        reason = _peft_incompatible(layer)
        if reason is not None:
            raise AdapterError(
                f"save_adapter: module {module_name!r} has {reason}; PEFT's format cannot hold it exactly"
            )
        A, B, scaling = layer.as_one_lora(adapter)
        rank = A.shape[0]
        alpha = layer.one_lora_rank_alpha(adapter)[1]
        if not math.isclose(
            LF.lora_scaling(rank, alpha, adapter.use_rslora), scaling, rel_tol=1e-12
        ):
            raise AdapterError(
                f"save_adapter: module {module_name!r}: scaling {scaling} does not follow from "
                f"r={adapter.r}, lora_alpha={adapter.lora_alpha}"
            )
        fused |= layer.adapter_structure(adapter)[0] == "merged"
        rslora.add(bool(adapter.use_rslora))
        modules[module_name] = (rank, alpha)
        for key, t in zip(layer.peft_keys, (A, B)):
            tensors[f"{PREFIX}{module_name}.{key}"] = t.detach().to("cpu")
    if len(rslora) > 1:
        raise AdapterError(
            f"save_adapter: adapter {name!r} mixes use_rslora values; PEFT's config holds one"
        )
    for key, t in _base_places(
        model, config, set(modules), name, required_only=False, optional_targets=False
    ).items():
        tensors[PREFIX + key] = t.detach().to("cpu")

    if base_model_name_or_path is None:
        candidate = getattr(model, "name_or_path", None)
        base_model_name_or_path = candidate if isinstance(candidate, str) and candidate else None
    body = _peft_config_dict(model, config, modules, rslora.pop(), base_model_name_or_path)
    metadata = {"format": "pt"}
    if (
        fused
        and isinstance(config.target_modules, list)
        and any("[" in t for t in config.target_modules)
    ):
        metadata.update(
            {
                "lora.version": FORMAT_VERSION,
                "lora.config": json.dumps(config.to_dict()),
                "lora.exported": json.dumps({k: body[k] for k in _STRUCTURAL}),
            }
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata=metadata)
    atomic_write_json(path / CONFIG_NAME, body)
    return path


def _base_places(
    model: nn.Module,
    config: LoRAConfig,
    adapted: set[str],
    adapter_name: str,
    required_only: bool = True,
    modules: dict[str, nn.Module] | None = None,
    optional_targets: bool = True,
    peft_aliases: bool = False,
) -> dict[str, Tensor]:
    """The model tensors an adapter file of this config holds besides LoRA's, by file key (no prefix):
    modules_to_save (``<module>.<param>``: adapter ``adapter_name``'s copy, or the original module
    while it has none) and biases per ``config.bias`` (a targeted module's as
    ``<module>.base_layer.bias``, as PEFT names them; a modules_to_save module's bias is its copy's,
    ``<module>.bias``, never the original's or another adapter's). With ``required_only=False``,
    also the tied partners of modules_to_save under ``ensure_weight_tying`` (PEFT writes them; they
    share the tensor) and, with ``optional_targets``, each targeted module's ``base_layer.weight``,
    which PEFT saves for targeted embeddings. With ``peft_aliases`` (files PEFT wrote), also the
    extra bias keys of each modules_to_save module PEFT writes under ``bias="all"``:
    :func:`_peft_saved_aliases`. ``modules``: ``dict(model.named_modules())`` when the caller has it."""
    if modules is None:
        modules = dict(model.named_modules())
    places: dict[str, Tensor] = {}
    saved = saved_copies(model, config, adapter_name, modules)
    named = set(modules_to_save_for(model, config, modules))
    for module_name, module in saved.items():
        if required_only and module_name not in named:
            continue
        for key, t in copy_state(module).items():  # (a copy to be: 4-bit weights as 16-bit)
            places[f"{module_name}.{key}"] = t
    if peft_aliases:
        for key, (_, t) in _peft_saved_aliases(config, saved, modules).items():
            places.setdefault(key, t)
    if config.bias != "none":
        # A wrapper's original and copies are its own: the adapter's copy is in `saved` above.
        inside = tuple(f"{n}." for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper))
        for module_name in modules:
            module = modules[module_name]
            bias = module._parameters.get("bias")
            if bias is None or (config.bias == "lora_only" and module_name not in adapted):
                continue
            if module_name in saved or (inside and module_name.startswith(inside)):
                continue
            key = (
                f"{module_name}.base_layer.bias"
                if module_name in adapted
                else f"{module_name}.bias"
            )
            places.setdefault(key, bias)
    if not required_only and optional_targets:
        for module_name in adapted:
            weight = modules[module_name].weight
            places.setdefault(f"{module_name}.base_layer.weight", weight)  # type: ignore[arg-type]
    return places


def _peft_saved_aliases(
    config: LoRAConfig, saved: dict[str, nn.Module], modules: dict[str, nn.Module]
) -> dict[str, tuple[str | None, Tensor]]:
    """The extra keys PEFT's ``get_peft_model_state_dict`` writes for a modules_to_save module under
    ``bias="all"`` (it takes every state-dict key ending in ``.bias``, the wrapper's included), by
    file key -> (the key of the same tensor in our files or None, the model tensor):
    ``<module>.modules_to_save.<k>`` (the adapter's copy: the tensor of ``<module>.<k>``) and
    ``<module>.original_module.<k>`` (the original's, which training leaves as it was). PEFT drops
    its adapter name from a key only where it is the last part but one, so the copy of a module
    with submodules keeps it: ``layers.1.modules_to_save.default.mlp.down_proj.bias`` (for PEFT's
    adapter "default", the name a file of one adapter is written under).
    ``saved``: :func:`~lora.targets.saved_copies`. Empty for other bias modes."""
    if config.bias != "all":
        return {}
    out: dict[str, tuple[str | None, Tensor]] = {}
    for module_name, copy in saved.items():
        wrapper = modules.get(module_name)
        original = wrapper.original_module if isinstance(wrapper, ModulesToSaveWrapper) else copy
        for source, kind in ((copy, "modules_to_save"), (original, "original_module")):
            for k, t in source.state_dict(keep_vars=True).items():
                if k == "bias" or k.endswith(".bias"):
                    same = f"{module_name}.{k}" if kind == "modules_to_save" else None
                    where = f"{kind}.default" if kind == "modules_to_save" and "." in k else kind
                    out[f"{module_name}.{where}.{k}"] = (same, t)
    return out


# ================================================================================================
# Loading
# ================================================================================================
@dataclass
class _Load:
    """One module's checked tensors, ready to copy: A and B in the layout of the adapter receiving them."""

    module: str
    spec: _Spec
    A: Tensor
    B: Tensor  # as in the file: (out, r·k) for a merged adapter
    B_blocks: Tensor | None  # a merged adapter's B as MergedLinear holds it (Σ enabled sizes, r)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None
) -> nn.Module:
    """Load an adapter directory written by :func:`save_adapter` or by PEFT into ``model``.

    - The model has no LoRA layers: its modules are injected as the config says (``lora.inject``,
      fused slices restored from lora's metadata) and the adapter is loaded; it is named
      ``adapter_name`` (default "default") and active.
    - The model holds an adapter of that name (default: the active one): the tensors are copied into
      its parameters in place (resume). The adapter must have the same modules, kinds, ranks and scalings.
    - Otherwise the adapter is added under ``adapter_name``, inactive (:func:`lora.set_adapter`).

    Strict: every tensor must find its place with the right shape, and every LoRA parameter of the
    adapter (and each modules_to_save / bias tensor its config asks for) must receive one. A named
    adapter added next to others may not change the base model they share: its modules_to_save or
    bias tensors must equal the model's. A single ``.pt`` / ``.bin`` / ``.safetensors`` file with no
    ``adapter_config.json`` beside it is a loralib ``lora_state_dict``, loaded strictly: named keys
    (``<m>.lora_A.<name>``, several adapters) into each adapter's slots, loralib's into the layer's
    only adapter, or the active one when the file names none; every adapter it names must receive
    all its tensors, modules_to_save copies included (a file without them is refused). A file
    whose keys all carry PEFT's prefix (``base_model.model.``) is PEFT's adapter_model file without
    its config, refused as such; keys named as PEFT names them (``<m>.lora_A.weight``) are refused
    naming loralib's key (``<m>.lora_A``) and how to load a PEFT adapter. Under
    ``ensure_weight_tying`` the file decides whether a tied partner shares the named copy: only
    when it holds the partner's weight, equal (PEFT, finding no tie, writes the named copy alone:
    loaded untied, with a :class:`PeftCompatibilityWarning`).

    Returns ``model``. Raises :class:`AdapterError` naming the file and the keys or modules that do not
    match; the model is left unchanged when it does.
    """
    p = Path(path)
    if p.is_file() and not _peft_weights_file(p):
        return _load_lora_state_dict(model, p)
    files = read_adapter(p)
    # One walk of the module tree for every check below (the model is not changed until _apply).
    modules = dict(model.named_modules())
    aliases = [a for names in module_aliases(model).values() for a in names]
    config = _as_peft_reads(config_from_files(files), files, modules, aliases)
    layers = {n: m for n, m in modules.items() if isinstance(m, LoRALayer)}
    existing = multi.names_in_layers(model, layers.values())
    has_layers = bool(layers)
    _warn_if_other_base(model, files)
    if adapter_name is None:
        active = (layer.active_adapter_name for layer in layers.values())
        adapter_name = next((a for a in active if a is not None), None) if existing else "default"
        if adapter_name is None:
            raise AdapterError(
                f"load_adapter: {type(model).__name__} has adapters {existing} but none is active; "
                "pass adapter_name"
            )
    multi.check_adapter_name(adapter_name)
    mode = "in_place" if adapter_name in existing else ("add" if has_layers else "fresh")
    config = _ties_the_file_holds(model, config, files, modules)

    specs = _specs(model, config, str(files.config_path), modules)
    _warn_if_order_lost(config, specs, files)
    # Unmerged, every weight is the base weight (checks compare with it); merged again on the way out.
    merged = [layer for layer in layers.values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        problems: list[str] = []
        if mode == "in_place":
            problems += _in_place_copy_problems(model, config, modules, adapter_name)
        targets = _targets(modules, layers, adapter_name, specs, mode, problems)
        loads = _check_lora_tensors(files, specs, targets, problems)
        base = _check_base_tensors(
            model, files, config, specs, mode, problems, modules, adapter_name
        )
        if mode == "add":  # a new name: every module it saves gets a copy (fresh: inject checks)
            sharded = sharded_copies_problem(saved_owners(model, config, modules), modules)
            problems += [sharded] if sharded is not None else []
        if problems:
            raise AdapterError(_report(files, problems))
        _apply(model, adapter_name, config, mode, loads, base, modules)
    finally:
        for layer in merged:
            layer.merge()
    return model


def _warn_if_other_base(model: nn.Module, files: AdapterFiles) -> None:
    # The recorded base is a hint (a hub id or a path), not a proof: a warning, naming both.
    recorded = files.config.get("base_model_name_or_path")
    actual = getattr(model, "name_or_path", None)
    if not (isinstance(recorded, str) and recorded and isinstance(actual, str) and actual):
        return
    if recorded == actual or _same_path(recorded, actual):
        return
    warnings.warn(
        f"{files.config_path}: the adapter was trained on base model {recorded!r}; "
        f"loading it into {actual!r}",
        stacklevel=3,
    )


def _warn_if_order_lost(config: LoRAConfig, specs: dict, files: AdapterFiles) -> None:
    # The first matching key of a rank/alpha pattern counts; PEFT's save_pretrained writes the
    # keys sorted, so where keys in sorted order give one module different values, the order
    # they were trained with (and so the value) is not in the file.
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, key)
        if list(pattern) != sorted(pattern) or list(files.config.get(key) or {}) != list(pattern):
            continue
        for module in specs:
            values = pattern_values(pattern, module)
            if len(set(values)) > 1:
                keys = [k for k in pattern if pattern_values({k: 0}, module)]
                warnings.warn(
                    f"{files.config_path}: {key} keys {keys!r} all match {module!r}, with "
                    f"values {values!r}; the first counts (as in PEFT), but the keys are in "
                    "sorted order, as PEFT's save_pretrained writes them whatever order they "
                    "were given in, so the adapter may have been trained with another of them",
                    PeftCompatibilityWarning,
                    stacklevel=3,
                )
                break


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


@torch.no_grad()
def _apply(model, adapter_name, config, mode, loads, base, modules) -> None:
    """Change the model, once everything is checked: inject or add, then copy the tensors.
    ``modules``: the module tree as it was before (the plain modules that get wrapped)."""
    if mode == "fresh":
        with warnings.catch_warnings():  # the file's config, as PEFT reads it: nothing to fix here
            warnings.simplefilter("ignore", SavedTargetWarning)
            inject(model, config)
        for load in loads:
            model.get_submodule(load.module).adapter_name = adapter_name
        for _, wrapper in saved_modules(model):
            wrapper.rename_adapter("default", adapter_name)
        model_state.set_registered_configs(model, {adapter_name: config})
    if mode == "add":
        _add_adapter(model, adapter_name, config, loads, modules)
        settle(model)
        multi.register_adapter(model, adapter_name, config)
    else:
        for load in loads:
            layer = model.get_submodule(load.module)
            _copy_into(layer, layer.get_adapter(adapter_name), load)
    # modules_to_save: the adapter's own copies (made now where missing), then the tensors go there.
    fresh_copies = wrap_modules_to_save(model, config, adapter_name)
    if mode == "fresh":
        for wrapper in fresh_copies.values():
            wrapper.activate_adapter(adapter_name)
    places = _base_places(
        model,
        config,
        {load.module for load in loads},
        adapter_name,
        required_only=False,
        peft_aliases=True,
    )
    for key, (_, tensor) in base.items():
        places[key].copy_(tensor)


def _targets(modules, layers, adapter_name, specs, mode, problems) -> dict[str, tuple]:
    """For each module: (layer or None, the adapter receiving the tensors or None). In place, the
    model's adapter must be the file's, module for module. ``modules``: the module tree by name;
    ``layers``: its LoRA layers."""
    out = {}
    for n in specs:
        reason = _peft_incompatible(modules[n])
        if reason is not None:
            problems.append(
                f"module {n}: has {reason}; a PEFT-format adapter for it would compute something else here"
            )
        layer = modules[n] if isinstance(modules[n], LoRALayer) else None
        out[n] = (layer, layer.get_adapter(adapter_name) if layer is not None else None)
    if mode != "in_place":
        return out
    held = {n for n, layer in layers.items() if layer.get_adapter(adapter_name) is not None}
    for n in sorted(held - set(specs)):
        problems.append(
            f"module {n}: adapter {adapter_name!r} of the model adapts it; the file does not"
        )
    for n, spec in specs.items():
        layer, adapter = out[n]
        if adapter is None:
            problems.append(
                f"module {n}: the file adapts it ({spec.describe()}); "
                f"adapter {adapter_name!r} of the model does not"
            )
        elif not _same_adapter(layer, adapter, spec):
            problems.append(
                f"module {n}: the file's adapter is {spec.describe()}; the model's {adapter_name!r} is "
                f"{_describe(layer, adapter)}"
            )
    return out


def _same_adapter(layer, adapter, spec: _Spec) -> bool:
    mine = layer.adapter_structure(adapter)
    theirs = (
        ("merged", spec.r, spec.enable_lora, spec.split_sizes)
        if spec.kind == "merged"
        else (spec.kind, spec.r)
    )
    if mine != theirs and not (
        mine[0] == "merged" and spec.kind == "linear" and spec.r == mine[1] * sum(mine[2])
    ):
        return False
    return math.isclose(adapter.scaling, spec.scaling, rel_tol=1e-9)


def _describe(layer, adapter) -> str:
    s = layer.adapter_structure(adapter)
    if s[0] == "merged":
        return f"slices {list(s[2])} of r={s[1]} each, scaling {adapter.scaling:g}"
    return f"{s[0]} r={s[1]}, scaling {adapter.scaling:g}"


def _check_lora_tensors(files: AdapterFiles, specs, targets, problems) -> list[_Load]:
    tensors = {k[len(PREFIX) :]: v for k, v in files.tensors.items() if k.startswith(PREFIX)}
    loads = []
    for n, spec in specs.items():
        keys = spec.file_keys(n)
        missing = [PREFIX + k for k in keys if k not in tensors]
        if missing:
            problems.append(f"missing {missing} (the config adapts {n}: {spec.describe()})")
            continue
        A, B = tensors[keys[0]], tensors[keys[1]]
        bad = False
        for key, t, want in zip(keys, (A, B), spec.file_shapes):
            if tuple(t.shape) != want:
                problems.append(
                    f"{PREFIX}{key}: shape {tuple(t.shape)}, expected {want} "
                    f"(rank {spec.file_rank} for {n} in the config)"
                )
                bad = True
            elif not t.is_floating_point():
                problems.append(f"{PREFIX}{key}: dtype {t.dtype}, expected a floating-point tensor")
                bad = True
            elif not bool(torch.isfinite(t).all()):
                problems.append(
                    f"{PREFIX}{key}: holds NaN or infinite values (a diverged training run?)"
                )
                bad = True
        if bad:
            continue
        blocks = None
        layer, adapter = targets[n]
        blocky = spec.kind == "merged" or (
            adapter is not None and layer.adapter_structure(adapter)[0] == "merged"
        )
        if blocky:
            enable, split, r = (
                (spec.enable_lora, spec.split_sizes, spec.r)
                if spec.kind == "merged"
                else (adapter.enable_lora, adapter.split_sizes, adapter.r)
            )
            blocks = _blocks(B, split, enable, r)
            if not torch.equal(LF.merged_lora_B(blocks, split, enable, r), B):
                problems.append(
                    f"{PREFIX}{keys[1]}: non-zero entries outside the blocks of slices {list(enable)}; "
                    "it is not the fused-slice adapter the config names"
                )
                continue
        loads.append(_Load(n, spec, A, B, blocks))
    claimed = {k for n, spec in specs.items() for k in spec.file_keys(n)}
    extra = [k for k in tensors if k not in claimed and _is_lora_key(k)]
    for k in extra:
        owner = k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
        problems.append(f"{PREFIX}{k}: no place for it (the config does not adapt {owner})")
    return loads


def _is_lora_key(key: str) -> bool:
    return any(key.endswith("." + s) for s in _LORA_KEY_SUFFIXES)


def _blocks(B: Tensor, split_sizes, enable_lora, r: int) -> Tensor:
    """Inverse of LF.merged_lora_B: the (Σ enabled sizes, r) blocks of an expanded (out, r·k) B."""
    rows, row, col = [], 0, 0
    for size, enabled in zip(split_sizes, enable_lora):
        if enabled:
            rows.append(B[row : row + size, col : col + r])
            col += r
        row += size
    return torch.cat(rows, dim=0)


def _check_base_tensors(
    model, files, config, specs, mode, problems, modules, adapter_name
) -> dict[str, tuple[Tensor, Tensor]]:
    """Non-LoRA tensors: each must be a modules_to_save / bias place the config names (or a targeted
    module's base_layer.weight), with its shape; every required place must be in the file."""
    try:
        required = _base_places(model, config, set(specs), adapter_name, modules=modules)
    except InjectionError as e:
        problems.append(f"{e}")
        return {}
    optional = _base_places(
        model,
        config,
        set(specs),
        adapter_name,
        required_only=False,
        modules=modules,
        peft_aliases=True,
    )
    # modules_to_save tensors go into the adapter's own copies: an added adapter may bring its own.
    # (Everything else is the base model's, shared by every adapter.)
    saved = saved_copies(model, config, adapter_name, modules)
    aliases = {
        k: same for k, (same, _) in _peft_saved_aliases(config, saved, modules).items() if same
    }
    own = set(
        _base_places(
            model,
            dataclasses.replace(config, bias="none"),
            set(),
            adapter_name,
            required_only=False,
            modules=modules,
            optional_targets=False,
        )
    ) | set(aliases)
    tensors = {k[len(PREFIX) :]: v for k, v in files.tensors.items() if k.startswith(PREFIX)}
    out = {}
    for key, t in tensors.items():
        if _is_lora_key(key):
            continue
        place = optional.get(key)
        if place is None:
            problems.append(
                f"{PREFIX}{key}: no place for it (not a LoRA tensor, and the config's modules_to_save "
                f"and bias={config.bias!r} do not name it)"
            )
        elif place.shape != t.shape:
            problems.append(f"{PREFIX}{key}: shape {tuple(t.shape)}, expected {tuple(place.shape)}")
        elif (
            mode == "add"
            and key not in own
            and not torch.equal(t.to(place.dtype), place.detach().cpu().to(place.dtype))
        ):
            problems.append(
                f"{PREFIX}{key}: differs from the model's; a named adapter added next to others may not "
                "change the base model they share (load it alone)"
            )
        else:
            out[key] = (place, t)
    for key in required:
        if key not in tensors:
            problems.append(
                f"missing {PREFIX}{key} (the config's modules_to_save / bias={config.bias!r} name it)"
            )
    # One tensor under two keys (PEFT's bias="all" aliases of a copy's bias) must hold one value.
    # A modules_to_save key lands in the adapter's copy of its module, not in the place it names
    # before the copies exist (two named modules tied in the base model get a copy each). A tied
    # partner's weight under ensure_weight_tying equals its main's: _ties_the_file_holds unties
    # the config otherwise.
    shared: dict[object, str] = {}
    for key, (place, t) in out.items():
        landing: object = aliases.get(key, key) if key in own else id(place)
        first = shared.setdefault(landing, key)
        if first != key and not torch.equal(t, out[first][1]):
            problems.append(
                f"{PREFIX}{key} and {PREFIX}{first}: the same tensor (one tensor), but the "
                "file holds different values"
            )
    for key in files.tensors:
        if not key.startswith(PREFIX):
            problems.append(f"{key}: no place for it (PEFT's keys start with {PREFIX!r})")
    return out


def _report(files: AdapterFiles, problems: list[str]) -> str:
    return (
        f"{files.weights_path} does not fit the model ({len(problems)} problem(s); nothing was loaded):\n  "
        + listing(problems, 20, "\n  ")
    )


@torch.no_grad()
def _copy_into(layer: LoRALayer, adapter, load: _Load) -> None:
    adapter.lora_A.copy_(load.A)
    merged = layer.adapter_structure(adapter)[0] == "merged"
    adapter.lora_B.copy_(load.B_blocks if merged else load.B)


def _add_adapter(
    model: nn.Module,
    adapter_name: str,
    config: LoRAConfig,
    loads: list[_Load],
    modules: dict[str, nn.Module],
) -> None:
    """Put each module's tensors in a new inactive AdapterWeights, wrapping plain modules first."""
    for load in loads:
        spec, n = load.spec, load.module
        layer = modules[n]
        if not isinstance(layer, LoRALayer):
            layer = _wrap_without_adapter(layer, spec, config)
            set_submodule(model, n, layer)
        dtype = resolve_lora_dtype(layer.weight, "auto")
        device = layer.weight.device
        sliced = spec.kind == "merged"
        fields, blocks = layer.slot_fields(
            spec.r,
            spec.lora_alpha,
            spec.use_rslora,
            spec.enable_lora if sliced else (),
            spec.split_sizes if sliced else (),
        )
        A, B = load.A, (load.B_blocks if blocks and load.B_blocks is not None else load.B)
        A, B = (nn.Parameter(t.to(device=device, dtype=dtype).clone()) for t in (A, B))
        slot = AdapterWeights(adapter_name, fields, A, B, layer.dropout_for(config.lora_dropout))
        layer.store_adapter(slot)


def _wrap_without_adapter(module: nn.Module, spec: _Spec, config: LoRAConfig) -> LoRALayer:
    """The LoRA layer for ``module`` with no adapter of its own (r = 0): it computes ``module``."""
    cls = layer_class_for(module, sliced=spec.kind == "merged")
    assert cls is not None  # the plan checked that a layer kind takes every target
    layer = cls.wrap(
        module,
        0,
        fan_in_fan_out=config.fan_in_fan_out,
        enable_lora=spec.enable_lora,
        split_sizes=spec.split_sizes,
    )
    layer.adapter_name = None
    return layer


# --- loralib checkpoints --------------------------------------------------------------------------
def _lora_route(key: str, layers: dict[str, LoRALayer]) -> tuple[str, AdapterKey] | None:
    """``(layer name, route)`` when ``key`` is a LoRA tensor's state-dict key of one of ``layers``
    (``<m>.lora_A`` or ``<m>.lora_A.<name>``: :func:`~lora.layers.base.route_adapter_key`)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in ("lora_A", "lora_B"):
            module_name = ".".join(parts[:i])
            layer = layers.get(module_name)
            if layer is not None:
                route = route_adapter_key(layer, ".".join(parts[i:]), module_name)
                if route is not None:
                    return module_name, route
    return None


def _load_lora_state_dict(model: nn.Module, file: Path) -> nn.Module:
    """A loralib ``lora_state_dict`` file (model state-dict keys) into the model's adapters.

    LoRA keys go where ``load_state_dict`` puts them (:func:`~lora.layers.base.route_adapter_key`):
    ``<m>.lora_A.<name>`` to adapter ``name``'s slot of layer ``m`` (active or stored), loralib's
    ``<m>.lora_A`` to the layer's only adapter; in a file that names no adapter (one adapter's
    file) an unnamed key into a layer holding several goes to its active adapter. Every other key
    must be a bias or an entry of a modules_to_save copy of the model, with its shape. Every
    adapter the file names (a LoRA key or a copy's key; the active adapter when it names none)
    must receive each of its LoRA tensors, in every layer holding it, and every entry of each of
    its copies. A wrapper's frozen original takes none. Everything is checked before anything is
    copied."""
    if file.suffix == ".safetensors":
        tensors, _ = read_safetensors(file)
    else:
        tensors = read_torch_file(file)
    _refuse_a_lone_peft_file(model, file, tensors)
    target = _FileTarget.of(model, file)
    placing = _Placing(tensors)
    routes = {k: r for k in tensors if (r := _lora_route(k, target.layers)) is not None}
    one_adapter_file = not any(route.name for _, route in routes.values())
    received = placing.lora_keys(target, routes, one_adapter_file)
    placing.other_keys(target, [k for k in tensors if k not in routes])
    if not placing.named:
        if target.active is not None:
            placing.named[target.active] = None  # no adapter's tensors: the active's, all missing
        else:
            placing.problems.append("the file holds no adapter's tensors, and no adapter is active")
    placing.require_lora_tensors(target, received, one_adapter_file)
    short = placing.require_copies(target)
    placing.check_tied(target)
    if placing.problems:
        raise AdapterError(
            f"{file} does not fit the model ({len(placing.problems)} problem(s); nothing was "
            "loaded):\n  "
            + listing(placing.problems, 20, "\n  ")
            + _copies_note(short, target, tensors)
            + _peft_keys_note(placing.peft_named)
        )
    merged = [layer for layer in target.layers.values() if layer.merged]
    with torch.no_grad():
        for layer in merged:
            layer.unmerge()
        for k, t in tensors.items():
            placing.places[k].copy_(t)
        for layer in merged:
            layer.merge()
    return model


def _peft_named_key(key: str, layers: dict[str, LoRALayer]) -> str | None:
    """Why ``key`` has no place, when it is a LoRA layer's tensor as PEFT's adapter_model file
    names it and no state dict does (an embedding's ``<m>.lora_embedding_A``), else None."""
    for module_name, layer in layers.items():
        start = f"{module_name}." if module_name else ""
        rest = key[len(start) :] if key.startswith(start) else None
        if rest in layer.peft_keys and rest not in ("lora_A", "lora_B"):
            param = ("lora_A", "lora_B")[layer.peft_keys.index(rest)]
            return peft_named_problem(rest, f"{start}{param}")
    return None


def _refuse_a_lone_peft_file(model: nn.Module, file: Path, tensors: dict[str, Tensor]) -> None:
    """A file whose keys all carry PEFT's prefix is a PEFT adapter_model file, not a loralib one:
    without its adapter_config.json beside it (r, lora_alpha, target_modules) it cannot be read as
    one, so it is refused as what it is (not as a lora_state_dict whose keys have no place)."""
    if not tensors or not all(k.startswith(PREFIX) for k in tensors):
        return
    if any(n == PREFIX[:-1] or n.startswith(PREFIX) for n, _ in model.named_modules()):
        return  # the model's own keys start so: a lora_state_dict of it
    first = next(iter(tensors))
    raise AdapterError(
        f"{file}: a PEFT adapter_model file (its keys are PEFT's, {PREFIX}<m>.lora_A.weight: "
        f"{first!r}, ...; a lora_state_dict file has the model's own keys, <m>.lora_A), but there "
        f"is no {CONFIG_NAME} beside it, which PEFT's format needs (r, lora_alpha, "
        f"target_modules): put it as {WEIGHTS_NAME} in a directory with the {CONFIG_NAME} written "
        "with it, and load that directory: lora.load_adapter(model, directory)"
    )


def _peft_keys_note(keys: list[str]) -> str:
    """What a refusal adds when some keys are named as in a PEFT adapter_model file."""
    if not keys:
        return ""
    return (
        f"\n{len(keys)} key(s) are named as in a PEFT adapter_model file (<m>.lora_A.weight, "
        "<m>.lora_embedding_A), where a lora_state_dict file has loralib's (<m>.lora_A). A PEFT "
        f"adapter loads from its directory ({CONFIG_NAME} and {WEIGHTS_NAME}, keys "
        f"{PREFIX}<m>.lora_A.weight): lora.load_adapter(model, directory). Or rename the file's "
        "keys to loralib's: <m>.lora_A.weight -> <m>.lora_A (<m>.lora_embedding_A -> <m>.lora_A)."
    )


@dataclass
class _FileTarget:
    """What a model offers a loralib file: its LoRA layers and adapters, its parameters (for bias
    keys) and its modules_to_save wrappers with their copies' state-dict entries."""

    model_name: str
    layers: dict[str, LoRALayer]
    adapters: list[str]  # every adapter of a LoRA layer or a wrapper
    active: str | None
    params: dict[str, Tensor]
    wrappers: list[tuple[str, ModulesToSaveWrapper]]
    copy_prefixes: tuple[str, ...]  # "<wrapper>.modules_to_save.", one per wrapper
    original_prefixes: tuple[str, ...]  # "<wrapper>.original_module."
    copies: dict[str, Tensor]  # every adapter's copies: state-dict key -> the model's tensor
    aliases: dict[int, list[str]]  # one tensor under several keys (ensure_weight_tying)

    @classmethod
    def of(cls, model: nn.Module, file: Path) -> _FileTarget:
        layers = dict(lora_layers(model))
        if not any(layer.held_adapters() for layer in layers.values()):
            raise AdapterError(
                f"{file}: {type(model).__name__} has no LoRA adapter to load a lora_state_dict "
                "into (inject or build the LoRA layers first)"
            )
        adapters = multi.names_in_layers(model, layers.values())
        wrappers = list(saved_modules(model))
        adapters += [a for _, w in wrappers for a in w.adapter_names if a not in adapters]
        copy_prefixes, original_prefixes = saved_prefixes(model)
        copies: dict[str, Tensor] = {}
        aliases: dict[int, list[str]] = {}
        if copy_prefixes:
            entries = model.state_dict(keep_vars=True)
            copies = {k: t for k, t in entries.items() if k.startswith(copy_prefixes)}
            for k, t in copies.items():
                aliases.setdefault(id(t), []).append(k)
        active = next((a for a in map(multi.layer_active, layers.values()) if a is not None), None)
        return cls(
            type(model).__name__,
            layers,
            adapters,
            active,
            dict(model.named_parameters()),
            wrappers,
            copy_prefixes,
            original_prefixes,
            copies,
            aliases,
        )

    def lacks(self, adapter: str) -> str:
        return f"names adapter {adapter!r}, which {self.model_name} does not have (it has {self.adapters})"


@dataclass
class _Placing:
    """A loralib file's tensors on their way into a model: where each goes, which adapters the
    file fills, and what does not fit (everything is found before anything is copied)."""

    tensors: dict[str, Tensor]
    places: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # file key -> model tensor
    named: dict[str, None] = dataclasses.field(default_factory=dict)  # adapters filled, in order
    problems: list[str] = dataclasses.field(default_factory=list)
    peft_named: list[str] = dataclasses.field(default_factory=list)  # keys named as PEFT names them

    def _place(self, k: str, place: Tensor) -> None:
        t = self.tensors[k]
        if place.shape != t.shape:
            self.problems.append(f"{k}: shape {tuple(t.shape)}, expected {tuple(place.shape)}")
        else:
            self.places[k] = place

    def lora_keys(
        self, target: _FileTarget, routes: dict[str, tuple[str, AdapterKey]], one_adapter_file: bool
    ) -> dict[tuple[str, str, str], str]:
        """Place the LoRA keys; returns (layer, adapter, parameter) -> the file's key."""
        received: dict[tuple[str, str, str], str] = {}
        for k, (module_name, route) in routes.items():
            layer = target.layers[module_name]
            if route.adapter is None and not route.name and one_adapter_file:
                if layer.active_adapter_name is not None:  # loralib's file into the active adapter
                    route = route._replace(adapter=layer.active_adapter_name)
            if route.adapter is None:
                if route.peft:  # <m>.lora_A.weight: PEFT's name (route.problem says so)
                    self.peft_named.append(k)
                if route.name and route.name not in target.adapters and not route.peft:
                    self.problems.append(f"{k}: {target.lacks(route.name)}")
                else:
                    self.problems.append(f"{k}: {route.problem}")
                continue
            slot = (module_name, route.adapter, route.param)
            if slot in received:
                self.problems.append(
                    f"{received[slot]}, {k}: both are adapter {route.adapter!r}'s {route.param} of "
                    f"{module_name!r}; a file holds one"
                )
                continue
            received[slot] = k
            self.named[route.adapter] = None
            self._place(k, getattr(layer.get_adapter(route.adapter), route.param))
        return received

    def other_keys(self, target: _FileTarget, keys: list[str]) -> None:
        """Place the keys that are no LoRA tensor's: copies' entries and biases."""
        for k in keys:
            if k.startswith(target.original_prefixes):
                self.problems.append(
                    f"{k}: no place for it (the frozen original of a modules_to_save wrapper; "
                    "lora_state_dict leaves it out and loading never changes it)"
                )
                continue
            place = target.copies.get(k)
            owner = next(
                ((w, p) for w, p in zip(target.wrappers, target.copy_prefixes) if k.startswith(p)),
                None,
            )
            if owner is not None:  # <wrapper>.modules_to_save.<adapter>.<entry>
                (name, wrapper), prefix = owner
                adapter = k[len(prefix) :].partition(".")[0]
                if adapter not in target.adapters:
                    self.problems.append(f"{k}: {target.lacks(adapter)}")
                    continue
                if wrapper.get_adapter(adapter) is None:
                    self.problems.append(
                        f"{k}: names adapter {adapter!r}, which has no modules_to_save copy of "
                        f"{name!r} (copies: {wrapper.adapter_names})"
                    )
                    continue
                if place is not None:
                    self.named[adapter] = None
            if place is None and k.endswith("bias"):
                place = target.params.get(k)
            peft = _peft_named_key(k, target.layers) if place is None else None
            if peft is not None:
                self.peft_named.append(k)
                self.problems.append(f"{k}: {peft}")
            elif place is None:
                self.problems.append(
                    f"{k}: no place for it (not a LoRA parameter, bias or modules_to_save copy "
                    "entry of the model)"
                )
            else:
                self._place(k, place)

    def require_lora_tensors(
        self,
        target: _FileTarget,
        received: dict[tuple[str, str, str], str],
        one_adapter_file: bool,
    ) -> None:
        """Each adapter named gets its LoRA tensors in every layer holding it."""
        for adapter in self.named:
            for module_name, layer in target.layers.items():
                if layer.get_adapter(adapter) is None:
                    continue
                one_key = one_adapter_file and layer.active_adapter_name == adapter
                for key, (name, param) in adapter_state_keys(layer).items():
                    if name == adapter and (module_name, adapter, param) not in received:
                        want = param if one_key else key  # loralib's key, in a one-adapter file
                        self.problems.append(
                            f"missing {module_name}.{want}" if module_name else f"missing {want}"
                        )

    def require_copies(self, target: _FileTarget) -> dict[str, list[str]]:
        """Each adapter named gets every entry of each of its copies (a tied alias in the file
        counts: one tensor). Returns adapter -> the wrappers whose copy the file lacks part of."""
        short: dict[str, list[str]] = {}
        for adapter in self.named:
            for name, wrapper in target.wrappers:
                if wrapper.get_adapter(adapter) is None:
                    continue
                prefix = (
                    f"{name}.modules_to_save.{adapter}." if name else f"modules_to_save.{adapter}."
                )
                lacking = [
                    k
                    for k, t in target.copies.items()
                    if k.startswith(prefix)
                    and not any(a in self.tensors for a in target.aliases[id(t)])
                ]
                if lacking:
                    short.setdefault(adapter, []).append(name)
                    self.problems += [f"missing {k}" for k in lacking]
        return short

    def check_tied(self, target: _FileTarget) -> None:
        """Keys of one tensor in the model (tied copies) must hold equal values in the file."""
        for keys in target.aliases.values():
            held = [k for k in keys if k in self.places]
            if any(not torch.equal(self.tensors[held[0]], self.tensors[k]) for k in held[1:]):
                self.problems.append(
                    f"{', '.join(held)}: one tensor in the model (tied copies), different in the file"
                )


def _copies_note(
    short: dict[str, list[str]], target: _FileTarget, tensors: dict[str, Tensor]
) -> str:
    """What a refusal adds when the file lacks (part of) the modules_to_save copies."""
    if not short:
        return ""
    whose = "; ".join(f"adapter {a!r}: {sorted(w)}" for a, w in short.items())
    if any(k.startswith(target.copy_prefixes) for k in tensors):
        note = f"\nThe file lacks part of the modules_to_save copies of {whose}."
    else:
        note = (
            "\nThe file holds no modules_to_save copies (e.g. written by an older "
            "lora_state_dict, which left them out), but the adapters it fills have "
            f"copies ({whose})."
        )
    return note + (
        " model.load_state_dict(torch.load(file, weights_only=True), strict=False) loads "
        "it, leaving the model's copies as they are."
    )
