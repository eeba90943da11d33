"""Merging a LoRA layer whose weight another module holds too (a tied ``lm_head`` and
``embed_tokens``, two layers sharing one weight) leaves that module's weight alone.

Merging used to add ΔW into the shared Parameter: the embedding then looked up W + ΔW_head, the
merged model computed something else than the unmerged one, and unmerging both tied layers did not
even restore W. PEFT still writes into the shared weight (it warns that tied targets "can lead to
complications")."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import randomize_lora
from tiny import ADAPTER_PHI3
from torch import nn

import lora
from lora.layers.utils import lora_layers
from lora.models import Phi3Config, Phi3ForCausalLM

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
TARGETS = {"head": ["lm_head"], "both": ["lm_head", "embed_tokens"]}


def tied_phi3(targets, **config) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**dict(ADAPTER_PHI3, tie_word_embeddings=True))).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=targets, **config))
    for _, layer in lora_layers(model):
        randomize_lora(layer)
    return model


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("which", sorted(TARGETS))
def test_merging_a_tied_head_keeps_the_embedding_and_the_logits(which):
    model = tied_phi3(TARGETS[which])
    shared = model.model.embed_tokens.weight
    if which == "both":
        shared = model.model.embed_tokens.base_weight
    before = shared.detach().clone()
    assert model.lm_head.shares_weight
    want = model(IDS).logits
    lora.merge(model)
    assert torch.equal(shared, before)  # the Parameter both hold was not written
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    assert _tied(model) and model.lm_head.weight is shared  # the tie itself is back
    assert torch.equal(model(IDS).logits, want)


@pytest.mark.parametrize("order", list(itertools.permutations(["lm_head", "model.embed_tokens"])))
def test_tied_layers_merge_and_unmerge_in_any_order(order):
    model = tied_phi3(TARGETS["both"])
    want = model(IDS).logits
    shared = model.lm_head.weight
    before = shared.detach().clone()
    layers = [model.get_submodule(n) for n in order]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    for layer in layers:  # unmerge in the order of merging, not the reverse
        layer.unmerge()
    assert torch.equal(shared, before) and _tied(model)
    assert torch.equal(model(IDS).logits, want)


def test_merge_on_eval_with_a_tied_head():
    model = tied_phi3(TARGETS["head"], merge_weights=True)
    model.train()
    want = model(IDS).logits
    model.eval()  # merge_weights: eval() merges
    assert model.lm_head.merged and not _tied(model)
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    model.train()
    assert not model.lm_head.merged and _tied(model)
    assert torch.equal(model(IDS).logits, want)


@pytest.mark.parametrize("which", sorted(TARGETS))
def test_merge_and_unload_unties_and_saves_both_weights(which, tmp_path):
    model = tied_phi3(TARGETS[which])
    want = model(IDS).logits
    plain = lora.merge_and_unload(model)
    assert type(plain.lm_head) is nn.Linear and not _tied(plain)
    assert plain.config.tie_word_embeddings is False
    torch.testing.assert_close(plain(IDS).logits, want, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    assert not _tied(loaded)
    torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_a_state_dict_of_a_merged_tied_layer_holds_the_base_weight():
    model = tied_phi3(TARGETS["head"])
    base = model.lm_head.weight.detach().clone()
    lora.merge(model)
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], base)
    assert torch.equal(state["model.embed_tokens.weight"], base)


def test_two_layers_sharing_one_weight_each_merge_their_own():
    torch.manual_seed(1)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight  # one weight, used twice (ALBERT-like sharing)
    model = nn.Sequential(first, nn.Tanh(), second)
    x = torch.randn(3, 6)
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["0", "2"]))
    randomize_lora(model[0])
    randomize_lora(model[2])
    assert model[0].shares_weight and model[2].shares_weight
    want = model(x)
    shared = model[0].weight
    before = shared.detach().clone()
    lora.merge(model)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    lora.unmerge(model)
    assert torch.equal(shared, before) and model[2].weight is shared
    plain = lora.merge_and_unload(model)
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


def test_a_weight_nobody_else_holds_is_still_merged_in_place():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4))
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["0"]))
    randomize_lora(model[0])
    weight = model[0].weight
    assert not model[0].shares_weight
    lora.merge(model)
    assert model[0].weight is weight  # no second weight: W + ΔW written where W was
    plain = lora.merge_and_unload(model)
    assert plain[0].weight is weight


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # PEFT's
def test_merged_tied_head_gives_peft_s_unmerged_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    base = Phi3ForCausalLM(Phi3Config(**dict(ADAPTER_PHI3, tie_word_embeddings=True))).eval()
    base.save_pretrained(tmp_path / "base")
    model = tied_phi3(TARGETS["head"])
    model.load_state_dict(base.state_dict(), strict=False)  # the base weights of the saved model
    lora.save_adapter(model, tmp_path / "adapter")
    hf = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = theirs(IDS).logits  # unmerged: what the adapter computes
        merged = lora.merge_and_unload(model)(IDS).logits
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
