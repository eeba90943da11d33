"""Calls that used to pass without a word, though what they do is never what was meant."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import ADAPTER_PHI3 as PHI3
from torch import nn

import lora
from lora.adapters import WEIGHTS_NAME
from lora.models import Phi3Config, Phi3ForCausalLM

CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj", "o_proj"]}


@pytest.mark.parametrize(
    "fn,name",
    [
        (lora.mark_only_lora_as_trainable, "mark_only_lora_as_trainable"),
        (lora.lora_state_dict, "lora_state_dict"),
    ],
)
def test_lora_helpers_on_a_model_without_lora_layers_raise(fn, name):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match=rf"{name}: Sequential has no LoRA layers \(call lora.inject"
    ):
        fn(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen


def test_inject_with_an_empty_target_list_raises():
    with pytest.raises(lora.InjectionError, match=r"target_modules=\[\]: nothing to adapt"):
        lora.inject(nn.Sequential(nn.Linear(4, 4)), lora.LoRAConfig(r=2, target_modules=[]))


@pytest.mark.parametrize("name", ["chat\n", "chat\r", "\nchat", ""])
def test_an_adapter_name_with_a_newline_is_refused(name, tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_name=.*letters, digits"):
        lora.load_adapter(model, path, adapter_name=name)
    assert lora.adapter_names(model) == ["default"]


@pytest.mark.parametrize("cls,args", [(lora.Linear, (4, 4)), (lora.MergedLinear, (4, 6))])
@pytest.mark.parametrize("bias", ["lora_only", "none", 1, None])
def test_a_layer_bias_that_is_not_a_bool_is_refused(cls, args, bias):
    with pytest.raises(
        TypeError, match=rf"bias={bias!r}: expected True or False .*LoRAConfig.bias"
    ):
        cls(*args, r=2, bias=bias)


def _saved(tmp_path):
    torch.manual_seed(0)
    model = lora.inject(Phi3ForCausalLM(Phi3Config(**PHI3)), CONFIG)
    return model, lora.save_adapter(model, tmp_path / "a", base_model_name_or_path="org/base-model")


def test_an_adapter_holding_nan_is_refused_and_the_model_is_untouched(tmp_path):
    _, path = _saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(path / WEIGHTS_NAME)
    )
    torch.manual_seed(0)
    fresh = Phi3ForCausalLM(Phi3Config(**PHI3))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lora.AdapterError, match=r"lora_A.weight: holds NaN or infinite values"):
        lora.load_adapter(fresh, path)
    assert not any(True for _ in lora.layers.lora_layers(fresh))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_an_adapter_for_another_base_model_warns_naming_both(tmp_path):
    _, path = _saved(tmp_path)
    torch.manual_seed(0)
    other = Phi3ForCausalLM(Phi3Config(**PHI3))
    other.name_or_path = "org/other-model"
    with pytest.warns(
        UserWarning,
        match=r"trained on base model 'org/base-model'; loading it into "
        r"'org/other-model'",
    ):
        lora.load_adapter(other, path)
    assert (
        json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "org/base-model"
    )


def test_from_pretrained_records_where_the_model_came_from(tmp_path):
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(**PHI3)).save_pretrained(tmp_path / "m")
    assert Phi3ForCausalLM.from_pretrained(tmp_path / "m").name_or_path == str(tmp_path / "m")
