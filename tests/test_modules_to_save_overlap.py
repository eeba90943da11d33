"""LoRA targets that modules_to_save trains in full (a target inside a saved module, or the saved
module itself): PEFT's rule, the target gets no LoRA layer and the adapter's copy trains it; inject
warns, and the adapter saves and loads (it once trained, then load_adapter refused its file:
"target_modules: ['blocks.0.original_module.q_proj', ...] match no module")."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import MODULES_TO_SAVE_IDS as IDS
from tiny import MODULES_TO_SAVE_PHI3 as PHI3
from torch import nn

import lora
from lora.layers.saved import ModulesToSaveWrapper
from lora.models import Phi3Config, Phi3ForCausalLM


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        return self.o(torch.relu(self.q_proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def train_step(model, x=X):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()


def out(model, x=X):
    with torch.no_grad():
        return model(x)


def lora_names(model) -> set[str]:
    return {n for n, _ in lora.layers.lora_layers(model)}


def file_keys(directory) -> set[str]:
    return set(load_file(str(directory / "adapter_model.safetensors")))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_trained_adapter_loads_into_a_fresh_model(tmp_path):
    # The reproduction: trains, saves, then load_adapter refused the file (the adapter was lost).
    model = net()
    lora.inject(
        model, lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["blocks.0"])
    )
    train_step(model)
    lora.save_adapter(model, tmp_path / "a")
    fresh = lora.load_adapter(net(), tmp_path / "a")
    torch.testing.assert_close(out(fresh), out(model), rtol=0, atol=0)
    with lora.disabled(fresh):
        torch.testing.assert_close(out(fresh), out(net()), rtol=0, atol=0)


@pytest.mark.parametrize("targets", [["q_proj"], r".*q_proj", "all-linear"])
def test_a_target_inside_a_saved_module_trains_in_full_saves_and_loads(tmp_path, targets):
    model = net()
    cfg = lora.LoRAConfig(r=2, target_modules=targets, modules_to_save=["blocks.0"])
    with pytest.warns(lora.SavedTargetWarning, match=r"'blocks\.0' \(holds blocks\.0\.q_proj"):
        lora.inject(model, cfg)
    wrapper = model.blocks[0]
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert not lora_names(wrapper)  # neither the original nor the copy holds a LoRA layer
    assert "blocks.1.q_proj" in lora_names(model)
    original = wrapper.original_module.q_proj.weight.detach().clone()
    train_step(model)
    copy = wrapper.modules_to_save["default"]
    assert not torch.equal(copy.q_proj.weight, original)  # trained in full, in the copy
    torch.testing.assert_close(wrapper.original_module.q_proj.weight, original, rtol=0, atol=0)
    want = out(model)

    lora.save_adapter(model, tmp_path / "a")
    keys = file_keys(tmp_path / "a")
    assert {"base_model.model.blocks.0.q_proj.weight", "base_model.model.blocks.0.o.weight"} <= keys
    assert not [k for k in keys if "original_module" in k or "modules_to_save" in k]
    assert not [k for k in keys if k.startswith("base_model.model.blocks.0.") and "lora_" in k]
    body = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert body["modules_to_save"] == ["blocks.0"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading the file warns of nothing: its config is as meant
        fresh = lora.load_adapter(net(), tmp_path / "a")
    torch.testing.assert_close(out(fresh), want, rtol=0, atol=0)
    assert lora_names(fresh) == lora_names(model)
    lora.load_adapter(fresh, tmp_path / "a")  # in place (resume) too
    torch.testing.assert_close(out(fresh), want, rtol=0, atol=0)


def test_a_saved_module_that_is_also_a_target_is_trained_in_full(tmp_path):
    model = net()
    cfg = lora.LoRAConfig(r=2, target_modules=["lm_head", "q_proj"], modules_to_save=["lm_head"])
    with pytest.warns(lora.SavedTargetWarning, match=r"'lm_head' \(is that module\)"):
        lora.inject(model, cfg)
    assert isinstance(model.lm_head, ModulesToSaveWrapper) and "lm_head" not in lora_names(model)
    train_step(model)
    want = out(model)
    lora.save_adapter(model, tmp_path / "a")
    body = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert body["target_modules"] == ["lm_head", "q_proj"]  # as PEFT reads it: lm_head left out
    assert "base_model.model.lm_head.weight" in file_keys(tmp_path / "a")
    fresh = lora.load_adapter(net(), tmp_path / "a")
    torch.testing.assert_close(out(fresh), want, rtol=0, atol=0)


def test_exclude_modules_naming_the_overlap_silences_the_warning():
    model = net()
    cfg = lora.LoRAConfig(
        r=2,
        target_modules=["lm_head", "q_proj"],
        exclude_modules=["blocks.0.q_proj", "lm_head"],
        modules_to_save=["blocks.0", "lm_head"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.inject(model, cfg)
    assert lora_names(model) == {"blocks.1.q_proj"}


@pytest.mark.parametrize(
    ("targets", "saved"), [(["lm_head"], ["lm_head"]), (["q_proj"], ["blocks.0", "blocks.1"])]
)
def test_targets_all_inside_modules_to_save_are_refused_before_the_model_changes(targets, saved):
    model = net()
    before = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = lora.LoRAConfig(r=2, target_modules=targets, modules_to_save=saved)
    with pytest.raises(lora.InjectionError, match=r"nothing left to adapt") as e:
        lora.inject(model, cfg)
    assert f"target_modules={targets!r}" in str(e.value)
    assert f"modules_to_save={saved!r}" in str(e.value)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert getattr(model, "lora_config", None) is None


def test_a_tied_partner_that_is_a_target_shares_the_copy_instead(tmp_path):
    # ensure_weight_tying wraps embed_tokens too: it was a LoRA target, and inject raised midway.
    def tied():
        torch.manual_seed(0)
        return Phi3ForCausalLM(Phi3Config(**PHI3, tie_word_embeddings=True)).eval()

    model = tied()
    cfg = lora.LoRAConfig(
        r=2,
        target_modules=["embed_tokens", "o_proj"],
        modules_to_save=["lm_head"],
        ensure_weight_tying=True,
    )
    with pytest.warns(lora.SavedTargetWarning, match=r"'model\.embed_tokens' \(is that module\)"):
        lora.inject(model, cfg)
    assert isinstance(model.model.embed_tokens, ModulesToSaveWrapper)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.add_(0.3)
        want = model(IDS).logits
    lora.save_adapter(model, tmp_path / "a")
    fresh = lora.load_adapter(tied(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, want, rtol=0, atol=0)


def test_an_added_adapter_may_not_copy_a_module_holding_other_adapters_layers(tmp_path):
    model = lora.inject(net(), lora.LoRAConfig(r=2, target_modules=["q_proj"]))
    cfg = lora.LoRAConfig(r=2, target_modules=["lm_head"], modules_to_save=["blocks.0"])
    lora.save_adapter(lora.inject(net(), cfg), tmp_path / "b")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(
        lora.AdapterError, match=r"'blocks\.0' holds LoRA layers .*\(blocks\.0\.q_proj\)"
    ):
        lora.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert lora.adapter_names(model) == ["default"]
