"""Entry order: a config lists target_modules, exclude_modules, modules_to_save and the
rank_pattern / alpha_pattern keys in whatever order, and what is trained, saved and loaded must
not depend on it. Drawn configs with overlapping and nested entries (``["mlp", "down_proj"]``,
``"proj"`` / ``"self_attn.proj"``, ``"head"`` / ``"lm_head"``) are applied in two orders of the
same entries, and must give the same modules (LoRA layers with r, alpha, scaling; modules_to_save
wrappers), the same trainable parameters with the same values after the same seeded init and
training step, the same adapter file (tensor names and values; the config as a set of entries),
and the same logits after loading it, in ours and, when peft and transformers are installed, in
PEFT (which reads either file to the same logits).

Pattern keys are the exception by design, in both: where two keys that match one module give it
different values, the first key counts (PEFT's ``get_pattern_key``), so their order is the
config's meaning; those keys keep their order in the drawn pair, and a fixed test below checks
that ours and PEFT read either order alike.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from diff_models import CUSTOM_IDS, PHI3, PHI3_IDS, Custom
from hypothesis import currently_in_test_context, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lora
from lora.adapters import AdapterError, PeftCompatibilityWarning
from lora.config import pattern_values
from lora.layers.saved import saved_modules
from lora.models import Phi3Config, Phi3ForCausalLM

try:
    import peft_diff as D
except ImportError:  # no peft / transformers: ours alone
    D = None  # type: ignore[assignment]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Entries that overlap: suffixes of one another at a dot ("proj" / "self_attn.proj" /
# "layers.0.self_attn.proj"), string endings ("head" / "lm_head", "norm" / "layernorm"), modules
# inside others ("mlp" / "down_proj" / "layers.1"), and slices of a fused projection.
POOLS = {
    "custom": {
        "targets": [
            "q_proj",
            "v_proj",
            "proj",
            "self_attn.proj",
            "layers.0.self_attn.proj",
            "down_proj",
            "mlp.down_proj",
            "layers.1.mlp.down_proj",
            "up_proj",
            "head",
            "lm_head",
            "embed",
            "conv",
        ],
        "saved": [
            "mlp",
            "down_proj",
            "mlp.down_proj",
            "layers.0.mlp",
            "self_attn.proj",
            "proj",
            "self_attn",
            "head",
            "lm_head",
            "embed",
            "layers.1",
            "norm",
        ],
        "keys": [
            "proj",
            "q_proj",
            r".*proj",
            "self_attn.proj",
            r"layers\.0\..*",
            "head",
            "lm_head",
            "down_proj",
        ],
    },
    "phi3": {
        "targets": [
            "qkv_proj",
            "qkv_proj[q,v]",
            "self_attn.qkv_proj[q,v]",
            "o_proj",
            "self_attn.o_proj",
            "model.layers.1.self_attn.o_proj",
            "gate_up_proj",
            "down_proj",
            "mlp.down_proj",
            "layers.0.mlp.down_proj",
            "lm_head",
            "embed_tokens",
        ],
        "saved": [
            "mlp",
            "down_proj",
            "mlp.down_proj",
            "layers.0.mlp",
            "o_proj",
            "self_attn",
            "layers.1",
            "head",
            "lm_head",
            "embed_tokens",
            "norm",
            "layernorm",
            "model.norm",
        ],
        "keys": [
            "o_proj",
            "qkv_proj",
            r".*proj",
            r"layers\.0\.self_attn\.o_proj",
            "down_proj|o_proj",
            r"mlp\..*",
            "lm_head",
        ],
    },
}
LISTS = ("target_modules", "exclude_modules", "modules_to_save")
PATTERNS = ("rank_pattern", "alpha_pattern")


# --- the models (ours; PEFT's side loads the same state into transformers' Phi-3) ---------------
@functools.cache
def _state(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**PHI3)) if kind == "phi3" else Custom()
    with torch.no_grad():  # biases are zero at init: give them values, or a lost bias hides
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(kind: str) -> torch.nn.Module:
    model = Phi3ForCausalLM(Phi3Config(**PHI3)) if kind == "phi3" else Custom()
    model.load_state_dict(_state(kind))
    return model.eval()


@functools.cache
def _names(kind: str) -> tuple[str, ...]:
    return tuple(n for n, _ in _model(kind).named_modules() if n)


def _forward(kind: str, model: torch.nn.Module) -> torch.Tensor:
    if kind == "phi3":
        return model(input_ids=PHI3_IDS).logits
    return model(CUSTOM_IDS)


def _logits(kind: str, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return _forward(kind, model.eval())


def _train_step(kind: str, model: torch.nn.Module) -> None:
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    _forward(kind, model).float().pow(2).mean().backward()
    opt.step()


def event(what: str) -> None:
    """hypothesis' statistics (``--hypothesis-show-statistics``), in a drawn test only."""
    if currently_in_test_context():
        _event(what)


def _values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- drawing a config in two orders ----------------------------------------------------------
def _conflicts(kind: str, pattern: dict) -> bool:
    """Whether some module matches two keys of ``pattern`` with different values (the first
    counts: then the keys' order is the config's meaning)."""
    return any(len(set(pattern_values(pattern, n))) > 1 for n in _names(kind))


@st.composite
def two_orders(draw, kind: str) -> tuple[dict, dict]:
    """A LoRAConfig dict with overlapping entries, and the same config with its lists and
    pattern keys in another order (pattern keys whose order decides a value keep it)."""
    pool = POOLS[kind]

    def entries(which: str, hi: int):
        return st.lists(st.sampled_from(pool[which]), min_size=1, max_size=hi, unique=True)

    cfg = draw(
        st.fixed_dictionaries(
            {
                "r": st.sampled_from([2, 4]),
                "lora_alpha": st.sampled_from([4, 8, 3]),
                "target_modules": entries("targets", 4),
            },
            optional={
                "exclude_modules": entries("targets", 2),
                "modules_to_save": entries("saved", 3),
                "rank_pattern": st.dictionaries(
                    st.sampled_from(pool["keys"]), st.sampled_from([1, 3, 0]), max_size=3
                ),
                "alpha_pattern": st.dictionaries(
                    st.sampled_from(pool["keys"]), st.sampled_from([2, 6, 16]), max_size=3
                ),
                "bias": st.sampled_from(["none", "all", "lora_only"]),
                "use_rslora": st.booleans(),
                "init_lora_weights": st.booleans(),
                "ensure_weight_tying": st.booleans(),
            },
        )
    )
    other = dict(cfg)
    for key in LISTS:
        if key in cfg:
            order = draw(st.permutations(cfg[key]))
            other[key] = order if order != cfg[key] else cfg[key][::-1]
    for key in PATTERNS:
        if cfg.get(key) and not _conflicts(kind, cfg[key]):
            items = list(cfg[key].items())
            order = draw(st.permutations(items))
            other[key] = dict(order if order != items else items[::-1])
    return cfg, other


# --- what one order gives ---------------------------------------------------------------------
@dataclass
class Outcome:
    refused: str | None = None  # "inject: InjectionError" / "save: AdapterError"
    built: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)
    file_tensors: dict = field(default_factory=dict)
    file_config: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None
    loaded_logits: torch.Tensor | None = None
    loaded_built: dict = field(default_factory=dict)
    warned: bool = False  # save_adapter's PeftCompatibilityWarning: PEFT cannot read it as is
    path: object = None


def _built(model: torch.nn.Module) -> dict:
    return {
        "layers": {
            n: (type(layer).__name__, layer.r, float(layer.lora_alpha), float(layer.scaling))
            for n, layer in lora.layers.lora_layers(model)
            if layer.has_adapter
        },
        "saved": sorted(n for n, _ in saved_modules(model)),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    }


def _as_set(body: dict) -> dict:
    """The file's config with each list as the set of its entries (their order is the user's)."""
    return {k: sorted(v) if isinstance(v, list) else v for k, v in body.items()}


def outcome(kind: str, cfg: dict, path) -> Outcome:
    model = _model(kind)
    torch.manual_seed(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora.inject(model, lora.LoRAConfig(**copy.deepcopy(cfg)))
    except ValueError as e:  # InjectionError; a ValueError where rank_pattern zeroes every target
        return Outcome(refused=f"inject: {type(e).__name__}")
    out = Outcome(built=_built(model), init=_values(model), path=path)
    _train_step(kind, model)
    out.trained, out.logits = _values(model), _logits(kind, model)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            lora.save_adapter(model, path)
        except AdapterError as e:
            out.refused = f"save: {type(e).__name__}"
            return out
    out.warned = any(issubclass(w.category, PeftCompatibilityWarning) for w in said)
    out.file_tensors = load_file(str(path / "adapter_model.safetensors"))
    out.file_config = _as_set(json.loads((path / "adapter_config.json").read_text()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = lora.load_adapter(_model(kind), path)
    out.loaded_built, out.loaded_logits = _built(back), _logits(kind, back)
    return out


def _same_tensors(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: values differ for {differ[:6]}"


def check_ours(kind: str, a_cfg: dict, b_cfg: dict, tmp) -> tuple[Outcome, Outcome]:
    a = outcome(kind, a_cfg, tmp / "a")
    b = outcome(kind, b_cfg, tmp / "b")
    assert a.refused == b.refused
    if a.built or b.built:
        assert a.built == b.built
        _same_tensors(a.init, b.init, "trainable parameters after the seeded init")
        _same_tensors(a.trained, b.trained, "trainable parameters after one step")
        assert torch.equal(a.logits, b.logits)
    if a.refused is None:
        _same_tensors(a.file_tensors, b.file_tensors, "adapter file")
        assert a.file_config == b.file_config
        assert a.warned == b.warned
        assert a.loaded_built == b.loaded_built
        assert torch.equal(a.loaded_logits, b.loaded_logits)
        torch.testing.assert_close(a.loaded_logits, a.logits, rtol=0, atol=1e-5)
    return a, b


# --- PEFT's side ------------------------------------------------------------------------------
def _peft_model(kind: str, cfg: dict):
    """PEFT's model for ``cfg`` (seeded as ours), or the name of its error."""
    torch.manual_seed(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return D.peft.get_peft_model(
                D.peft_side(kind, _state(kind)), D.peft.LoraConfig(**copy.deepcopy(cfg))
            )
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return type(e).__name__


def _peft_trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_peft(kind: str, a_cfg: dict, b_cfg: dict, a: Outcome, b: Outcome) -> None:
    """PEFT builds the same for both orders (it matches modules in model order, target_modules
    as a set), and reads our two files to the same logits, ours."""
    if any(isinstance(t, str) and "[" in t for t in a_cfg["target_modules"]):
        theirs = None  # slices are ours alone (save_adapter writes the fused module)
    else:
        theirs = _peft_model(kind, a_cfg), _peft_model(kind, b_cfg)
    if theirs is not None:
        ta, tb = theirs
        if isinstance(ta, str) or isinstance(tb, str):
            assert ta == tb, "PEFT refuses one order only"
            event(f"PEFT refuses both: {ta}")
        else:
            event("PEFT builds the same for both")
            assert D.peft_structure(ta) == D.peft_structure(tb)
            _same_tensors(_peft_trainable(ta), _peft_trainable(tb), "PEFT after the seeded init")
    if a.refused is not None:
        return
    logits = []
    for out in (a, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = D.peft.PeftModel.from_pretrained(D.peft_side(kind, _state(kind)), out.path)
        logits.append(D.run(kind, loaded.eval()))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    event("PEFT reads our two files to the same logits" + (" (save warned)" if a.warned else ""))
    if not a.warned:
        torch.testing.assert_close(logits[0], a.logits, rtol=0, atol=D.ATOL)


def check(kind: str, a_cfg: dict, b_cfg: dict, tmp) -> None:
    a, b = check_ours(kind, a_cfg, b_cfg, tmp)
    event(f"{kind}: {a.refused or 'built, saved and loaded'}")
    if D is not None:
        check_peft(kind, a_cfg, b_cfg, a, b)


# --- fixed cases --------------------------------------------------------------------------------
def test_target_entry_order_gives_the_same_seeded_init(tmp_path):
    # Layers were built in the order of the entries, each drawing its init from the generator:
    # ["q_proj", "v_proj"] and ["v_proj", "q_proj"] gave every q_proj and v_proj other values.
    a = outcome("custom", {"target_modules": ["q_proj", "v_proj"]}, tmp_path / "a")
    b = outcome("custom", {"target_modules": ["v_proj", "q_proj"]}, tmp_path / "b")
    _same_tensors(a.init, b.init, "trainable parameters after the seeded init")
    _same_tensors(a.file_tensors, b.file_tensors, "adapter file")


class ThreeTied(nn.Module):
    """One weight in three modules: an embedding and two heads."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.out = nn.Linear(4, 6, bias=False)
        self.head.weight = self.out.weight = self.embed.weight
        self.q_proj = nn.Linear(4, 4)

    def forward(self, ids):
        h = self.q_proj(self.embed(ids))
        return self.head(h) + 2 * self.out(h)


def test_a_partner_tied_to_two_named_modules_shares_the_same_copy_in_either_order(tmp_path):
    # ensure_weight_tying: out (not named) shares the copy of the first named module it is
    # tied to; that was the first entry, so the two orders trained different functions.
    ids = torch.tensor([[1, 2, 3, 5]])
    logits, files = [], []
    for entries in (["embed", "head"], ["head", "embed"]):
        torch.manual_seed(0)
        model = ThreeTied()
        cfg = lora.LoRAConfig(
            target_modules=["q_proj"], modules_to_save=entries, ensure_weight_tying=True
        )
        lora.inject(model, cfg)
        copy_of = {n: model.get_submodule(n).modules_to_save["default"].weight for n in entries}
        assert model.out.modules_to_save["default"].weight is copy_of["embed"]  # the model's first
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(ids).pow(2).mean().backward()
        opt.step()
        path = tmp_path / "-".join(entries)
        lora.save_adapter(model, path)
        logits.append(_logits_of(model, ids))
        files.append(load_file(str(path / "adapter_model.safetensors")))
        torch.manual_seed(0)
        back = lora.load_adapter(ThreeTied(), path)
        torch.testing.assert_close(_logits_of(back, ids), logits[-1], rtol=0, atol=1e-6)
    assert torch.equal(logits[0], logits[1])
    _same_tensors(files[0], files[1], "adapter file")


def _logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize(
    ("kind", "a_cfg"),
    [
        ("custom", {"target_modules": ["q_proj"], "modules_to_save": ["mlp", "down_proj"]}),
        ("phi3", {"target_modules": ["o_proj"], "modules_to_save": ["layers.0.mlp", "down_proj"]}),
        ("custom", {"target_modules": ["proj", "self_attn.proj", "layers.0.self_attn.proj"]}),
        (
            "custom",
            {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["head", "lm_head"]},
        ),
        ("phi3", {"target_modules": ["qkv_proj[q,v]", "self_attn.qkv_proj[q,v]", "o_proj"]}),
        (
            "phi3",
            {"target_modules": ["o_proj"], "modules_to_save": ["norm", "model.norm", "layernorm"]},
        ),
    ],
    ids=["mlp-down_proj", "phi3-mlp-down_proj", "proj-suffixes", "head-lm_head", "slices", "norms"],
)
def test_nested_entries_in_reverse_order(tmp_path, kind, a_cfg):
    b_cfg = {k: v[::-1] if isinstance(v, list) else v for k, v in a_cfg.items()}
    check(kind, a_cfg, b_cfg, tmp_path)


@pytest.mark.parametrize("key", PATTERNS)
def test_overlapping_pattern_keys_first_one_counts_in_ours_and_peft(tmp_path, key):
    # Not order-independent, by design: "self_attn.proj" and "proj" both match
    # layers.0.self_attn.proj, and the first key gives it its value, in PEFT as in ours.
    value = (
        {"self_attn.proj": 1, "proj": 3}
        if key == "rank_pattern"
        else {"self_attn.proj": 2, "proj": 6}
    )
    first, second = list(value)
    built = {}
    for keys in ((first, second), (second, first)):
        cfg = {"target_modules": ["proj"], key: {k: value[k] for k in keys}}
        model = lora.inject(_model("custom"), lora.LoRAConfig(**cfg))
        layer = dict(lora.layers.lora_layers(model))["layers.0.self_attn.proj"]
        got = layer.r if key == "rank_pattern" else layer.lora_alpha
        assert got == value[keys[0]]
        built[keys] = D.peft_structure(_peft_model("custom", cfg)) if D is not None else None
        if D is not None:
            assert built[keys] == D.our_structure(model)
            out = outcome("custom", cfg, tmp_path / "-".join(keys))
            check_peft("custom", cfg, cfg, out, out)


# --- drawn configs -------------------------------------------------------------------------------
@settings(max_examples=5)
@given(data=st.data())
def test_drawn_configs_in_two_orders_agree(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["custom", "phi3"]))
    a_cfg, b_cfg = data.draw(two_orders(kind))
    check(kind, a_cfg, b_cfg, tmp_path_factory.mktemp("order"))


@pytest.mark.slow
@settings(max_examples=300)
@given(data=st.data())
def test_drawn_configs_in_two_orders_agree_many(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["custom", "phi3"]))
    a_cfg, b_cfg = data.draw(two_orders(kind))
    check(kind, a_cfg, b_cfg, tmp_path_factory.mktemp("order"))
