"""add_weighted_adapter: the combined adapter's config says what it is (bias, lora_dropout,
task_type, fan_in_fan_out, ...), so it saves and loads as it runs; trained biases, which are the
base model's and shared by every adapter, combine only where orig + Σ wᵢ (biasᵢ − orig) is known
(a ValueError otherwise, leaving the model as it was)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from reference import effective_weight, randomize_lora
from torch import nn

import lora
from lora.adapters import CONFIG_NAME
from lora.config import BIAS_MODES

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
BIASED = ("q_proj", "v_proj", "head")  # every module with a bias
TARGETS = (["q_proj"], ["v_proj"], ["q_proj", "v_proj"])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.q_proj(x) * torch.sigmoid(self.v_proj(x)))


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def covered(config: lora.LoRAConfig) -> set[str]:
    """The biases an adapter of this config trains (and its file holds)."""
    if config.bias == "all":
        return set(BIASED)
    return set(config.target_modules) if config.bias == "lora_only" else set()


def delta(name: str) -> torch.Tensor:
    """What training moved the bias of module ``name`` by (the same in every adapter training it:
    there is one bias, shared)."""
    g = torch.Generator().manual_seed(len(name) * 7 + ord(name[0]))
    return torch.randn(8 if name != "head" else 4, generator=g)


def trained_toy(names: set[str]) -> Toy:
    model = toy()
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).bias.add_(delta(n))
    return model


def in_one_model(directory: Path, configs: dict[str, lora.LoRAConfig]) -> Toy:
    """A Toy holding one adapter per config (the first loaded fresh and active, the others added),
    whose biases are those the adapters trained. Each adapter's file comes from its own model."""
    trained = set().union(*(covered(c) for c in configs.values()))
    for seed, (name, config) in enumerate(configs.items()):
        source = lora.inject(trained_toy(trained), config)
        g = torch.Generator().manual_seed(seed + 1)
        for _, layer in lora.layers.lora_layers(source):
            randomize_lora(layer, generator=g, scale=0.3)
        lora.save_adapter(source, directory / name)
    model = trained_toy(trained)
    for name in configs:
        lora.load_adapter(model, directory / name, adapter_name=name)
    return model


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def reference(model, configs, weights) -> torch.Tensor:
    """The plain Toy with W + Σ wᵢ ΔWᵢ and b₀ + Σ wᵢ (bᵢ − b₀) (bᵢ = b₀ + δ where adapter i trained
    the bias, b₀ where it did not), built from the sources alone."""
    plain = toy()
    active = lora.active_adapter(model)
    with torch.no_grad():
        for (name, config), w in zip(configs.items(), weights):
            lora.set_adapter(model, name)
            for module in ("q_proj", "v_proj"):
                layer = model.get_submodule(module)
                if isinstance(layer, lora.layers.LoRALayer) and layer.has_adapter:
                    plain.get_submodule(module).weight.add_(
                        w * (effective_weight(layer) - layer.weight)
                    )
            for module in covered(config):
                plain.get_submodule(module).bias.add_(w * delta(module))
    lora.set_adapter(model, active)
    return run(plain)


def bias_weight_sums(configs, weights) -> dict[str, float]:
    """For each bias some adapter trains: the sum of the weights of the adapters training it."""
    sums: dict[str, list[float]] = {}
    for config, w in zip(configs.values(), weights):
        for module in covered(config):
            sums.setdefault(module, []).append(w)
    return {m: math.fsum(ws) for m, ws in sums.items()}


@given(
    sources=st.lists(
        st.tuples(st.sampled_from(BIAS_MODES), st.sampled_from(range(len(TARGETS)))),
        min_size=1,
        max_size=3,
    ),
    weights=st.lists(
        st.sampled_from([1.0, 1.0, 0.5, 0.5, -0.5, 0.25, 0.75, 2.0]), min_size=3, max_size=3
    ),
    combination_type=st.sampled_from(["cat", "svd"]),
)
def test_a_combination_runs_saves_and_loads_its_formula_or_is_refused(
    sources, weights, combination_type
):
    configs = {
        f"s{i}": lora.LoRAConfig(r=2, lora_alpha=4, bias=mode, target_modules=TARGETS[t])
        for i, (mode, t) in enumerate(sources)
    }
    weights = weights[: len(configs)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = in_one_model(directory, configs)
        names = list(configs)
        sums = bias_weight_sums(configs, weights)
        bad = {m: s for m, s in sums.items() if abs(s - 1.0) > 1e-9}
        # svd at the rank of the sum is exact (the sum has rank <= 2 per source)
        kwargs = {"svd_rank": 2 * len(configs)} if combination_type == "svd" else {}
        if bad:
            event("refused")
            first = next(m for m in BIASED if m in bad)
            with pytest.raises(ValueError, match=rf"{first}\.bias is trained by .*not 1"):
                lora.add_weighted_adapter(model, names, weights, "mix", combination_type, **kwargs)
            assert lora.adapter_names(model) == names  # nothing was added
            return
        lora.add_weighted_adapter(model, names, weights, "mix", combination_type, **kwargs)
        want = reference(model, configs, weights)
        modes = {c.bias for c in configs.values()}
        config = model.lora_configs["mix"]
        event(f"combined with bias={config.bias!r}")
        assert config.bias == (
            "all" if "all" in modes else "lora_only" if "lora_only" in modes else "none"
        )
        lora.set_adapter(model, "mix")
        torch.testing.assert_close(run(model), want, rtol=1e-5, atol=1e-5)  # in the model
        lora.save_adapter(model, directory / "mix")
        fresh = lora.load_adapter(toy(), directory / "mix")
        torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)  # and from its file


def test_the_combined_config_carries_the_sources_settings(tmp_path):
    common = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    configs = {
        "a": lora.LoRAConfig(**common, lora_dropout=0.1, bias="all"),
        "b": lora.LoRAConfig(**common, lora_dropout=0.2),
    }
    model = in_one_model(tmp_path, configs)
    lora.add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "ab")
    lora.add_weighted_adapter(model, ["b", "a"], [0.5, 1.0], "ba", "svd")
    for name, p in (("ab", 0.1), ("ba", 0.2)):  # lora_dropout: the first adapter's, as PEFT
        config = model.lora_configs[name]
        assert (config.bias, config.lora_dropout, config.task_type) == ("all", p, "CAUSAL_LM")
        assert config.use_rslora is False and config.init_lora_weights is True
        dropout = model.q_proj.lora_inactive[name].lora_dropout
        assert isinstance(dropout, nn.Dropout) and dropout.p == p  # the layers have it too
    lora.set_adapter(model, "ab")
    want = run(model)
    lora.save_adapter(model, tmp_path / "ab")
    body = json.loads((tmp_path / "ab" / CONFIG_NAME).read_text())
    assert (body["bias"], body["lora_dropout"], body["task_type"]) == ("all", 0.1, "CAUSAL_LM")
    fresh = lora.load_adapter(toy(), tmp_path / "ab")
    assert isinstance(fresh.q_proj.lora_dropout, nn.Dropout) and fresh.q_proj.lora_dropout.p == 0.1
    torch.testing.assert_close(run(fresh), want, rtol=1e-5, atol=1e-5)  # the trained biases came


def test_a_trained_bias_at_another_weight_than_one_is_refused_naming_it(tmp_path):
    model = in_one_model(
        tmp_path,
        {
            "a": lora.LoRAConfig(r=2, target_modules=["q_proj"], bias="lora_only"),
            "b": lora.LoRAConfig(r=2, target_modules=["v_proj"]),
        },
    )
    message = (
        r"weights=\[0.5, 1.0\]: q_proj.bias is trained by 'a' \(bias='lora_only', weight 0.5\), "
        r"whose weights sum to 0.5, not 1\. A bias is the base model's, one tensor shared by "
        r"every adapter .* or combine adapters trained with bias='none'"
    )
    with pytest.raises(ValueError, match=message):
        lora.add_weighted_adapter(model, ["a", "b"], [0.5, 1.0], "mix")
    assert lora.adapter_names(model) == ["a", "b"] and "mix" not in model.lora_configs
    assert "mix" not in model.q_proj.held_adapters()
    lora.add_weighted_adapter(model, ["b"], [0.5], "mix")  # b trains no bias: any weight
    assert model.lora_configs["mix"].bias == "none"


def test_task_types_must_agree_and_an_unnamed_one_takes_the_others(tmp_path):
    configs = {
        "causal": lora.LoRAConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        "unnamed": lora.LoRAConfig(r=2, target_modules=["q_proj"]),
        "cls": lora.LoRAConfig(r=2, target_modules=["v_proj"], task_type="SEQ_CLS"),
    }
    model = in_one_model(tmp_path, configs)
    lora.add_weighted_adapter(model, ["unnamed", "causal"], [1.0, 1.0], "mix")
    assert model.lora_configs["mix"].task_type == "CAUSAL_LM"
    with pytest.raises(
        ValueError,
        match=r"name different task types \('causal': 'CAUSAL_LM', 'cls': 'SEQ_CLS'\)",
    ):
        lora.add_weighted_adapter(model, ["causal", "cls"], [1.0, 1.0], "bad")
    assert "bad" not in lora.adapter_names(model)


def test_fan_in_fan_out_says_what_the_layers_store(tmp_path):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    def gpt2_like():
        torch.manual_seed(0)
        return nn.Sequential(conv1d(12, 8), nn.GELU(), conv1d(8, 12)).eval()

    cfg = lora.LoRAConfig(r=2, target_modules=["0", "2"], fan_in_fan_out=True)
    source = lora.inject(gpt2_like(), cfg)
    for _, layer in lora.layers.lora_layers(source):
        randomize_lora(layer)
    lora.save_adapter(source, tmp_path / "a")
    model = lora.load_adapter(gpt2_like(), tmp_path / "a", adapter_name="a")
    lora.add_weighted_adapter(model, ["a"], [0.5], "mix")
    assert model.lora_configs["mix"].fan_in_fan_out is True  # GPT-2's (in, out) layout
    plain = lora.inject(toy(), lora.LoRAConfig(r=2, target_modules=["q_proj"]))
    lora.add_weighted_adapter(plain, ["default"], [0.5], "mix")
    assert plain.lora_configs["mix"].fan_in_fan_out is False
