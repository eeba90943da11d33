"""lora.targets: the public constructor, the layer-kind lookup, fused splits asked of the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lora
from lora.targets import InjectionError, fused_splits, layer_class_for


@pytest.mark.parametrize(
    "module, kind, x",
    [
        (nn.Linear(6, 4), lora.Linear, torch.randn(2, 6)),
        (nn.Embedding(10, 4), lora.Embedding, torch.tensor([0, 3, 9])),
        (nn.Conv1d(2, 4, 3), lora.Conv1d, torch.randn(2, 2, 5)),
        (nn.Conv2d(2, 4, 3), lora.Conv2d, torch.randn(2, 2, 5, 5)),
        (nn.Conv3d(2, 4, 3), lora.Conv3d, torch.randn(2, 2, 5, 5, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_lora_layer_for_picks_the_kind_and_shares_the_weight(module, kind, x):
    layer = lora.lora_layer_for(module, 2, lora_alpha=4)
    assert type(layer) is kind and layer.weight is module.weight and layer.base_module is module
    torch.testing.assert_close(layer(x), module(x))  # B = 0: the base module's output


def test_lora_layer_for_slices_makes_a_merged_linear():
    layer = lora.lora_layer_for(
        nn.Linear(8, 12), 2, split={"q": 6, "k": 3, "v": 3}, slices=("q", "v")
    )
    assert type(layer) is lora.MergedLinear
    assert layer.enable_lora == (True, False, True) and layer.split_sizes == (6, 3, 3)


def test_lora_layer_for_refuses_what_no_kind_takes():
    assert (
        layer_class_for(nn.LayerNorm(4)) is None
        and layer_class_for(nn.Embedding(3, 2), sliced=True) is None
    )
    with pytest.raises(InjectionError, match="LayerNorm"):
        lora.lora_layer_for(nn.LayerNorm(4), 2)


def test_unwrap_gives_the_plain_module_back_with_the_same_tensors():
    base = nn.Linear(6, 4)
    layer = lora.lora_layer_for(base, 2)
    assert layer.unwrap() is base and base.weight is layer.weight and base.bias is layer.bias
    hand = lora.Linear(6, 4, r=2, fan_in_fan_out=True)
    plain = hand.unwrap()
    assert type(plain) is nn.Linear and torch.equal(plain.weight, hand.weight.T)
    hand.eval()  # merge_weights: merged in eval mode
    with pytest.raises(RuntimeError, match="unmerge"):
        hand.unwrap()


def test_fused_splits_come_from_the_model_or_its_registered_layout():
    phi3 = SimpleNamespace(
        model_type="phi3",
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=48,
        head_dim=None,
    )
    assert fused_splits(SimpleNamespace(config=phi3)) == {
        "qkv_proj": {"q": 32, "k": 16, "v": 16},
        "gate_up_proj": {"gate": 48, "up": 48},
    }
    # Another architecture with the same config keys: no Phi-3 names assumed.
    llama = SimpleNamespace(**{**vars(phi3), "model_type": "llama"})
    assert fused_splits(SimpleNamespace(config=llama)) == {}
    declared = {"c_attn": {"q": 8, "k": 8, "v": 8}}
    assert fused_splits(SimpleNamespace(fused_splits=declared, config=phi3)) is declared


def test_phi3_declares_the_split_its_attention_uses():
    from lora.models import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    attention = model.model.layers[0].self_attn
    assert attention.split_sizes == list(model.fused_splits["qkv_proj"].values()) == [32, 16, 16]


@pytest.mark.parametrize(
    "wrap,match",
    [
        (
            lambda m: nn.utils.parametrizations.weight_norm(m),
            r"net\.1 .*parametrization.*remove_parametrizations",
        ),
        (lambda m: nn.utils.spectral_norm(m), r"net\.1 .*forward hook.*remove_spectral_norm"),
    ],
    ids=["weight_norm", "spectral_norm"],
)
def test_a_target_whose_weight_is_computed_is_refused_and_the_model_untouched(wrap, match):
    # A LoRA layer shares the stored weight; over a computed one it would adapt a stale tensor
    # (spectral_norm) or fail deep in torch (a parametrization's weight is not a Parameter).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), wrap(nn.Linear(6, 3)))
    model = nn.ModuleDict(
        {"net": net}
    ).eval()  # spectral_norm's power iteration runs in training only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4)
    y = model["net"](x)
    with pytest.raises(lora.InjectionError, match=match):
        lora.inject(model, lora.LoRAConfig(r=2, target_modules=["net.0", "net.1"]))
    assert type(model["net"][0]) is nn.Linear and not any(
        isinstance(m, lora.LoRALayer) for m in model.modules()
    )
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model["net"](x), y, rtol=0, atol=0)
