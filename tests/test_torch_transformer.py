"""LoRA inside torch's own transformer modules, which compute with some submodules' weights without
calling those submodules.

- ``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``: a
  LoRA layer on ``out_proj`` would change nothing and get no gradient (PEFT wraps it anyway).
  Naming it is an InjectionError; "all-linear" leaves it out.
- ``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel over ``linear1``/``linear2``'s
  weights (and ``nn.TransformerEncoder`` packs a nested tensor for it, given a padding mask):
  adapters there used to be silently left out of every evaluation (PEFT's still are)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from reference import randomize_lora
from torch import nn

import lora
from lora.layers.utils import lora_layers

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PyTorch API of nested tensors:UserWarning"  # torch's own, about its fused path
)
# Tolerances 1e-4: in eval mode nn.MultiheadAttention takes its own fused kernel (no adapter in
# it), which rounds differently from its train-mode path.
X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
PAD = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])


def encoder(layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def adapted(model: nn.Module, **config) -> nn.Module:
    lora.inject(model, lora.LoRAConfig(r=2, **config))
    for _, layer in lora_layers(model):
        randomize_lora(layer)
    return model


@pytest.mark.parametrize(
    "targets", [["out_proj"], ["self_attn.out_proj", "linear1"], r".*\.(out_proj|linear2)"]
)
def test_naming_multihead_attention_s_out_proj_is_refused(targets):
    model = encoder()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(lora.InjectionError, match=r"layers\.0\.self_attn\.out_proj.*never calls"):
        lora.inject(model, lora.LoRAConfig(r=2, target_modules=targets))
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing changed


def test_all_linear_leaves_out_proj_out_and_exclude_modules_lets_the_rest_in():
    model = adapted(encoder(), target_modules="all-linear")
    names = [n for n, _ in lora_layers(model)]
    assert names == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    other = adapted(encoder(), target_modules=["out_proj", "linear1"], exclude_modules=["out_proj"])
    assert [n for n, _ in lora_layers(other)] == ["layers.0.linear1", "layers.1.linear1"]


def test_a_lone_multihead_attention_has_no_linear_for_all_linear():
    with pytest.raises(lora.InjectionError, match="no Linear layer"):
        lora.inject(nn.MultiheadAttention(16, 4), lora.LoRAConfig(target_modules="all-linear"))


@pytest.mark.parametrize("mask", [None, PAD], ids=["no-mask", "padding-mask"])
def test_eval_mode_runs_the_adapters(mask):
    model = adapted(encoder(), target_modules="all-linear")
    with torch.no_grad():
        model.train()  # dropout 0: train mode computes the same function, module by module
        want = model(X, src_key_padding_mask=mask)
        model.eval()
        got = model(X, src_key_padding_mask=mask)
    assert not got.is_nested
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base = encoder()
    with torch.no_grad():
        plain = base(X, src_key_padding_mask=mask)
    if mask is not None:  # the fused path zeroes padded positions; compare the real ones
        got, plain = (
            got[~mask],
            plain.to_padded_tensor(0.0)[~mask] if plain.is_nested else plain[~mask],
        )
    assert (got - plain).abs().max() > 1e-3  # the adapters do change the output


def test_an_encoder_layer_alone_runs_its_adapters_in_eval_and_survives_copies():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    adapted(layer, target_modules=["linear1", "linear2"])
    with torch.no_grad():
        want = layer(X)
        layer.eval()
        torch.testing.assert_close(layer(X), want, rtol=1e-4, atol=1e-4)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(clone(X), want, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_gives_torch_its_fast_paths_back():
    model = adapted(encoder(), target_modules="all-linear")
    with torch.no_grad():
        want = model(X)
    plain = lora.merge_and_unload(model)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in plain.layers)
    assert plain.use_nested_tensor
    with torch.no_grad():
        torch.testing.assert_close(plain(X), want, rtol=1e-4, atol=1e-4)


def test_load_adapter_into_a_fresh_encoder_runs_the_adapters_in_eval(tmp_path):
    model = adapted(encoder(), target_modules="all-linear")
    with torch.no_grad():
        want = model(X)
    lora.save_adapter(model, tmp_path)
    loaded = lora.load_adapter(encoder(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), want, rtol=1e-4, atol=1e-4)
