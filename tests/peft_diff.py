"""Differential harness: one LoRA config applied by ``lora`` and by PEFT, compared.

``compare(model_kind, cfg, tmp)`` builds the model twice with the same base weights (transformers'
tiny Phi-3 for PEFT and ``lora.models.Phi3ForCausalLM`` for us, or one small custom module), applies
``cfg`` on both sides and returns a list of differences (empty: they agree):

1. the adapted modules, each with its r, lora_alpha and scaling;
2. the modules_to_save wrappers, and the trainable parameters (names normalised, counts);
3. the outputs after the adapter travels through the file, both ways: our ``save_adapter`` ->
   PEFT ``PeftModel.from_pretrained``, and PEFT ``save_pretrained`` -> our ``load_adapter``, with
   random adapter weights (and trained biases / copies) on the writing side. The structure the
   reading side builds from the file is compared too.

A config that one side refuses is returned as ``("refused", side, message)``: the caller decides
whether that is fine (ours refusing with an error naming the key is; ours accepting what PEFT
refuses is looked at). Used by tests/test_peft_fuzz.py and by hand (tools/peft_fuzz_hunt.py).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import peft
import torch
import transformers
from diff_models import CUSTOM_IDS, MLP, PHI3, PHI3_IDS, Attn, Block, Custom  # noqa: F401
from torch import nn

import lora
from lora.adapters import PeftCompatibilityWarning
from lora.layers.saved import saved_modules
from lora.models import Phi3Config, Phi3ForCausalLM

transformers.logging.set_verbosity_error()

ATOL = 1e-5


def base_state(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = (
        transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3))
        if kind == "phi3"
        else Custom()
    )
    with torch.no_grad():  # biases are zero at init: give them values, or a lost bias hides
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def peft_side(kind: str, state) -> nn.Module:
    model = (
        transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3))
        if kind == "phi3"
        else Custom()
    )
    model.load_state_dict(state)
    return model.eval()


def our_side(kind: str, state) -> nn.Module:
    model = Phi3ForCausalLM(Phi3Config(**PHI3)) if kind == "phi3" else Custom()
    model.load_state_dict(state)
    return model.eval()


def run(kind: str, model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if kind == "phi3":
            return model(input_ids=PHI3_IDS).logits
        return model(CUSTOM_IDS)


# --- what each side built ------------------------------------------------------------------------
def _strip(name: str) -> str:
    return re.sub(r"^base_model\.model\.", "", name)


def our_structure(model: nn.Module) -> dict:
    layers = {
        n: (layer.r, float(layer.lora_alpha), round(float(layer.scaling), 9))
        for n, layer in lora.layers.lora_layers(model)
        if layer.has_adapter
    }
    saved = sorted(n for n, _ in saved_modules(model))
    trainable = {_normal(n): p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return {"layers": layers, "modules_to_save": saved, "trainable": trainable}


def peft_structure(model: nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    inner = model.base_model.model if isinstance(model, peft.PeftModel) else model
    layers = {}
    for n, m in inner.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.r:
            layers[n] = (
                m.r["default"],
                float(m.lora_alpha["default"]),
                round(float(m.scaling["default"]), 9),
            )
    saved = sorted(n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper))
    trainable = {
        _normal(_strip(n)): p.numel() for n, p in model.named_parameters() if p.requires_grad
    }
    return {"layers": layers, "modules_to_save": saved, "trainable": trainable}


def _normal(name: str) -> str:
    """A trainable parameter's name, the same on both sides: ``x.lora_A``, ``x.bias``,
    ``x.modules_to_save.weight``."""
    name = name.replace(".base_layer.", ".")
    name = re.sub(r"\.lora_embedding_([AB])\.default$", r".lora_\1", name)
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", name)
    name = name.replace(".modules_to_save.default.", ".modules_to_save.")
    return name


def _structure_diff(ours: dict, theirs: dict, what: str) -> list[str]:
    out = []
    for key in ("layers", "modules_to_save", "trainable"):
        a, b = ours[key], theirs[key]
        if a == b:
            continue
        if isinstance(a, dict):
            only_a = {k: a[k] for k in sorted(set(a) - set(b))}
            only_b = {k: b[k] for k in sorted(set(b) - set(a))}
            differ = {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}
            out.append(
                f"{what} {key}: only ours {only_a}; only PEFT {only_b}; differ (ours, PEFT) {differ}"
            )
        else:
            out.append(f"{what} {key}: ours {a}; PEFT {b}")
    return out


# --- setting the adapter weights --------------------------------------------------------------------
def _perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)


def _trainable(model: nn.Module):
    return [p for _, p in sorted(model.named_parameters()) if p.requires_grad]


# --- the comparison -------------------------------------------------------------------------------
def compare(kind: str, cfg: dict, tmp: str | Path) -> list:
    """Differences between ours and PEFT for config ``cfg`` (PEFT's LoraConfig keys) on model
    ``kind`` ("phi3" or "custom"); ``[("refused", side, message)]`` when a side refuses it."""
    tmp = Path(tmp)
    state = base_state(kind)
    peft_cfg = dict(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(
                peft_side(kind, state), peft.LoraConfig(**copy.deepcopy(peft_cfg))
            )
    except Exception as e:  # noqa: BLE001 - any refusal counts
        theirs, peft_error = None, f"{type(e).__name__}: {e}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = lora.inject(our_side(kind, state), lora.LoRAConfig(**copy.deepcopy(cfg)))
    except Exception as e:  # noqa: BLE001
        ours, our_error = None, f"{type(e).__name__}: {e}"
    if theirs is None and ours is None:
        return [("refused", "both", our_error, peft_error)]
    diffs: list = []
    if theirs is None:
        diffs.append(("refused", "peft", peft_error))
    if ours is None:
        diffs.append(("refused", "ours", our_error))
    if theirs is not None and ours is not None:
        mine, peft_built = our_structure(ours), peft_structure(theirs)
        nested = [
            n
            for n in peft_built["modules_to_save"]
            if n.rpartition(".")[0] in peft_built["modules_to_save"]
        ]
        if nested:
            # PEFT wraps a module named in modules_to_save again inside the wrapper of its
            # parent, also named (a dead copy; the live one frozen): a PEFT bug, which
            # load_adapter warns about. Ours: the parent's copy trains it.
            diffs.append(("known", "PEFT nests modules_to_save wrappers", nested))
            ours_names = [
                f"{p}.modules_to_save.{c}" for p, _, c in (n.rpartition(".") for n in nested)
            ]
            mine = _without(mine, set(ours_names))
            peft_built = _without(peft_built, set(nested))
        diffs += _structure_diff(mine, peft_built, "inject")
    if ours is not None:
        diffs += _ours_to_peft(kind, state, ours, tmp / "ours")
    if theirs is not None:
        diffs += _peft_to_ours(kind, state, theirs, tmp / "peft")
    return diffs


def _without(built: dict, names: set[str]) -> dict:
    inside = tuple(f"{n}." for n in names)
    return {
        "layers": built["layers"],
        "modules_to_save": [n for n in built["modules_to_save"] if n not in names],
        "trainable": {k: v for k, v in built["trainable"].items() if not k.startswith(inside)},
    }


def _close(got: torch.Tensor, want: torch.Tensor) -> str | None:
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    return None if err <= ATOL * scale else f"logits differ by {err:.3g} (of {scale:.3g})"


def _ours_to_peft(kind: str, state, ours: nn.Module, path: Path) -> list:
    """Random adapter weights, our save_adapter, PEFT's from_pretrained: the same modules and
    logits."""
    _perturb(_trainable(ours), 1)
    want = run(kind, ours)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        lora.save_adapter(ours, path)
    announced = [
        ("warned", "save", str(w.message))
        for w in said
        if issubclass(w.category, PeftCompatibilityWarning)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = peft.PeftModel.from_pretrained(
                peft_side(kind, state), path, is_trainable=True
            ).eval()
        except Exception as e:  # noqa: BLE001
            return announced + [f"ours -> PEFT: PEFT refuses our file: {type(e).__name__}: {e}"]
    diffs = announced + [
        f"ours -> PEFT: PEFT warns {str(w.message)[:300]}"
        for w in caught
        if "missing adapter keys" in str(w.message) or "unexpected" in str(w.message).lower()
    ]
    diffs += _structure_diff(our_structure(ours), peft_structure(loaded), "ours -> PEFT")
    bad = _close(run(kind, loaded), want)
    diffs += [f"ours -> PEFT: {bad}"] if bad else []
    # ... and written again by PEFT (which sorts the config's keys), back into ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save_pretrained(path / "again")
        try:
            back = lora.load_adapter(our_side(kind, state), path / "again")
        except Exception as e:  # noqa: BLE001
            return diffs + [f"ours -> PEFT -> ours: refused: {type(e).__name__}: {e}"]
    diffs += _structure_diff(our_structure(ours), our_structure(back), "ours -> PEFT -> ours")
    bad = _close(run(kind, back), want)
    return diffs + ([f"ours -> PEFT -> ours: {bad}"] if bad else [])


def _peft_to_ours(kind: str, state, theirs: nn.Module, path: Path) -> list:
    """Random adapter weights, PEFT's save_pretrained, our load_adapter: the same modules and
    logits (or a refusal, reported as ("refused", "load", message))."""
    _perturb(_trainable(theirs), 2)
    theirs.eval()
    want = run(kind, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(path)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            back = lora.load_adapter(our_side(kind, state), path)
        except Exception as e:  # noqa: BLE001
            return [("refused", "load", f"{type(e).__name__}: {e}")]
    diffs: list = [
        ("warned", "load", str(w.message))
        for w in said
        if issubclass(w.category, PeftCompatibilityWarning)
    ]
    diffs += _structure_diff(our_structure(back), peft_structure(theirs), "PEFT -> ours")
    bad = _close(run(kind, back), want)
    return diffs + ([f"PEFT -> ours: {bad}"] if bad else [])


# Refusals that are fine: the error types ours raises for a config or file that does not fit, and
# anything PEFT refuses (where ours accepts more, its file must still load in PEFT as it runs).
CLEAR_ERRORS = ("InjectionError", "AdapterError", "ValueError", "TypeError")


def problems(diffs: list) -> list:
    """The differences of :func:`compare` that are bugs: a refusal by ours with an error of another
    type than :data:`CLEAR_ERRORS` (a crash), and any difference in what was built or computed,
    except on a path where ours warned (PeftCompatibilityWarning) that the file cannot say it:
    ours -> PEFT after save_adapter's warning, PEFT -> ours after load_adapter's."""
    warned = {d[1] for d in diffs if isinstance(d, tuple) and d[0] == "warned"}
    out = []
    for d in diffs:
        if isinstance(d, tuple):
            if d[0] == "refused" and d[1] in ("ours", "load", "both"):
                if not str(d[2]).startswith(CLEAR_ERRORS):
                    out.append(d)
            continue
        if ("save" in warned and d.startswith("ours -> PEFT")) or (
            "load" in warned and d.startswith("PEFT -> ours")
        ):
            continue
        out.append(d)
    return out


# --- drawing configs ---------------------------------------------------------------------------------
# Entries for target_modules / exclude_modules / modules_to_save / pattern keys: suffixes, partial
# names (not on a dot boundary), dotted partial paths, full names, containers, names that match
# nothing, and regexes.
POOLS = {
    "phi3": {
        "targets": [
            "qkv_proj",
            "o_proj",
            "gate_up_proj",
            "down_proj",
            "embed_tokens",
            "lm_head",
            "proj",
            "_proj",
            "self_attn.qkv_proj",
            "layers.0.mlp.down_proj",
            "mlp.down_proj",
            "model.layers.1.self_attn.o_proj",
            "q_proj",
            "mlp",
        ],
        "regexes": [
            r".*_proj",
            r".*\.layers\.0\..*",
            r".*(qkv|o)_proj",
            r"model\.layers\.\d+\.mlp\.down_proj",
            r".*proj",
            "lm_head",
            r".*embed_tokens",
            r"(.*\.)?o_proj",
            r".*\.1\..*_proj",
        ],
        "keys": [
            "o_proj",
            "qkv_proj",
            "proj",
            "_proj",
            r".*proj",
            r"layers\.0\.self_attn\.o_proj",
            "layers.1.mlp.down_proj",
            r"^model\.layers\.0\..*",
            "down_proj|o_proj",
            "lm_head",
            "embed_tokens",
            "self_attn.*",
            r"mlp\..*",
        ],
        "saved": [
            "lm_head",
            "embed_tokens",
            "head",
            "layers.0.mlp",
            "mlp.down_proj",
            "down_proj",
            "o_proj",
            "norm",
            "layers.1",
        ],
    },
    "custom": {
        "targets": [
            "q_proj",
            "v_proj",
            "proj",
            "_proj",
            "down_proj",
            "up_proj",
            "embed",
            "conv",
            "image",
            "head",
            "lm_head",
            "self_attn.proj",
            "layers.0.mlp.down_proj",
            "mlp",
            "norm",
            "k_proj",
        ],
        "regexes": [
            r".*_proj",
            r".*proj",
            r"layers\.0\..*",
            r".*\.(q|v)_proj",
            r"(embed|conv|image)",
            r".*head",
            r"layers\.\d\.self_attn\.proj",
            r"proj|head",
        ],
        "keys": [
            "proj",
            "_proj",
            "q_proj",
            r".*proj",
            "head",
            "lm_head",
            r"layers\.0\..*",
            "self_attn.proj",
            "embed|conv",
            "image",
            r"^layers\.1\.mlp\.down_proj",
        ],
        "saved": [
            "head",
            "lm_head",
            "proj",
            "embed",
            "conv",
            "layers.0.mlp",
            "mlp",
            "down_proj",
            "self_attn.proj",
            "layers.1",
        ],
    },
}


def config_strategy(kind: str):
    """A hypothesis strategy of PEFT LoraConfig dicts for model ``kind``."""
    from hypothesis import strategies as st

    pool = POOLS[kind]
    names = st.lists(st.sampled_from(pool["targets"]), min_size=1, max_size=3, unique=True)
    regex = st.sampled_from(pool["regexes"])
    targets = st.one_of(names, regex, st.just("all-linear"))
    exclude = st.one_of(
        st.none(),
        st.lists(st.sampled_from(pool["targets"]), min_size=1, max_size=2, unique=True),
        regex,
    )
    keys = st.sampled_from(pool["keys"])
    saved = st.one_of(
        st.none(), st.lists(st.sampled_from(pool["saved"]), min_size=1, max_size=2, unique=True)
    )
    return st.fixed_dictionaries(
        {
            "r": st.sampled_from([2, 4]),
            "lora_alpha": st.sampled_from([4, 8, 3]),
            "target_modules": targets,
        },
        optional={
            "exclude_modules": exclude,
            "rank_pattern": st.dictionaries(keys, st.sampled_from([1, 3, 5, 0]), max_size=2),
            "alpha_pattern": st.dictionaries(keys, st.sampled_from([2, 6, 16]), max_size=2),
            "use_rslora": st.booleans(),
            "bias": st.sampled_from(["none", "all", "lora_only"]),
            "modules_to_save": saved,
            "init_lora_weights": st.booleans(),
        },
    )
