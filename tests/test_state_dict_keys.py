"""lora_state_dict / state_dict keys that do not depend on which adapter is active (issue 8).

One adapter in a layer: loralib's keys (``q_proj.lora_A``). Several: ``q_proj.lora_A.<name>`` for
each, so a state dict saved with "a" active loads a's tensors into a's slots whatever is active now.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, ids):
        h = self.embed(ids)
        return self.v_proj(self.q_proj(h))


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def with_adapters(names, seed=0, targets=("q_proj", "v_proj", "embed")):
    """A Toy holding adapters ``names`` (the first from inject, the others added), each random."""
    torch.manual_seed(0)  # the same base model each time; ``seed`` draws the adapters
    model = Toy().eval()
    first, *rest = names
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=list(targets)))
    if first != "default":
        rename(model, first)
    for name in rest:
        lora.add_weighted_adapter(model, [first], [1.0], name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora.layers.lora_layers(model):
            for adapter in layer.held_adapters().values():
                for p in (adapter.lora_A, adapter.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g))
    lora.set_adapter(model, first)
    return model


def rename(model, name):
    configs = lora.multi.adapter_configs(model)  # {"default": config}, made before renaming
    for _, layer in lora.layers.lora_layers(model):
        layer.adapter_name = name
    configs[name] = configs.pop("default")


def outputs(model, names):
    out = {}
    for n in names:
        lora.set_adapter(model, n)
        with torch.no_grad():
            out[n] = model(IDS)
    return out


def test_one_adapter_keeps_loralibs_keys():
    model = with_adapters(["default"])
    assert sorted(lora.lora_state_dict(model)) == sorted(
        f"{m}.lora_{x}" for m in ("embed", "q_proj", "v_proj") for x in "AB"
    )


def test_several_adapters_name_each_adapter_whichever_is_active():
    model = with_adapters(["a", "b"])
    keys_a = sorted(lora.lora_state_dict(model))
    lora.set_adapter(model, "b")
    assert sorted(lora.lora_state_dict(model)) == keys_a
    assert "q_proj.lora_A.a" in keys_a and "q_proj.lora_B.b" in keys_a
    assert not any("inactive" in k for k in keys_a)


def test_the_issue_scenario_saved_with_a_active_loaded_after_switching_to_b():
    model = with_adapters(["a", "b"])
    want = outputs(model, ["a", "b"])
    lora.set_adapter(model, "a")
    saved = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    other = with_adapters(["a", "b"], seed=7)  # same structure, other tensors
    lora.set_adapter(other, "b")
    other.load_state_dict(saved, strict=False)
    assert lora.active_adapter(other) == "b"
    got = outputs(other, ["a", "b"])
    for n in ("a", "b"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_whole_model_state_dict_loads_strictly_after_switching():
    model = with_adapters(["a", "b"])
    want = outputs(model, ["a", "b"])
    saved = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    other = with_adapters(["a", "b"], seed=3)
    lora.set_adapter(other, None)
    other.load_state_dict(saved)
    got = outputs(other, ["a", "b"])
    for n in ("a", "b"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_a_key_naming_an_adapter_the_layer_lacks_is_an_error_naming_it():
    saved = lora.lora_state_dict(with_adapters(["a", "b"]))
    other = with_adapters(["a", "c"])
    with pytest.raises(RuntimeError, match=r"names adapter 'b'.*holds \['a', 'c'\]"):
        other.load_state_dict(saved, strict=False)


def test_unnamed_keys_into_a_layer_of_several_adapters_is_an_error():
    saved = lora.lora_state_dict(with_adapters(["default"]))
    other = with_adapters(["a", "b"])
    with pytest.raises(RuntimeError, match=r"without an adapter name.*holds adapters \['a', 'b'\]"):
        other.load_state_dict(saved, strict=False)


def test_unnamed_keys_go_to_the_layers_only_adapter_even_when_inactive():
    model = with_adapters(["a"])
    want = outputs(model, ["a"])["a"]
    saved = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    other = with_adapters(["a"], seed=5)
    with lora.disabled(other):
        assert sorted(lora.lora_state_dict(other)) == sorted(saved)
        other.load_state_dict(saved, strict=False)
    torch.testing.assert_close(outputs(other, ["a"])["a"], want, rtol=0, atol=0)


def test_missing_named_keys_are_reported_by_strict_loading():
    model = with_adapters(["a", "b"])
    state = model.state_dict()
    del state["q_proj.lora_A.b"]
    other = with_adapters(["a", "b"], seed=2)
    with pytest.raises(
        RuntimeError, match=r"Missing key\(s\) in state_dict: \"q_proj\.lora_A\.b\""
    ):
        other.load_state_dict(state)
    lora.set_adapter(other, "b")  # the same key, wherever b lives now
    assert other.load_state_dict(state, strict=False).missing_keys == ["q_proj.lora_A.b"]


names = st.lists(
    st.sampled_from(["a", "b", "c", "chat", "sql-1"]), min_size=1, max_size=4, unique=True
)


@settings(max_examples=25, deadline=None)
@given(names=names, data=st.data())
def test_property_any_names_any_switch_orders_load_into_the_right_slots(names, data):
    model = with_adapters(names)
    want = outputs(model, names)
    switches = st.lists(st.sampled_from([*names, None]), min_size=1, max_size=4)
    for name in data.draw(switches, label="switches before saving"):
        lora.set_adapter(model, name)
    saved = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    other = with_adapters(names, seed=11)
    for after in data.draw(switches, label="switches before loading"):
        lora.set_adapter(other, after)
    assert sorted(lora.lora_state_dict(other)) == sorted(saved)
    other.load_state_dict(saved, strict=False)
    assert lora.active_adapter(other) == after
    got = outputs(other, names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
