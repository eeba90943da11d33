"""bias="all" / "lora_only" together with modules_to_save: a saved module's bias is its adapter
copy's (file key ``<module>.bias``), never the untouched original's, and the original stays frozen."""

from __future__ import annotations

import pytest
import torch
from reference import randomize_lora
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import Toy

import lora
from lora.adapters import WEIGHTS_NAME

IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
P = "base_model.model."


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


def run(model):
    with torch.no_grad():
        return model(IDS)


def keys(path) -> set[str]:
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return set(f.keys())


def trained(bias: str, seed: int = 0, saved: tuple[str, ...] = ("lm_head",)):
    """A Toy injected with a LoRA on q_proj (and ``saved`` as modules_to_save), random A and B,
    then one SGD step: the copy and the biases ``bias`` names move."""
    config = lora.LoRAConfig(
        r=2, target_modules=["q_proj"], modules_to_save=list(saved) or None, bias=bias
    )
    model = lora.inject(toy(), config)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lora.layers.lora_layers(model):
        randomize_lora(layer, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    torch.nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
    torch.optim.SGD(params, lr=1.0).step()
    return model.eval()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_saved_module_bias_is_saved_once_as_the_copys_and_round_trips(tmp_path, bias):
    model = trained(bias)
    original = toy().lm_head.bias
    head = model.lm_head
    torch.testing.assert_close(head.original_module.bias, original, rtol=0, atol=0)  # untouched
    assert not torch.equal(head.bias, original)  # the copy trained its bias
    want = run(model)
    lora.save_adapter(model, tmp_path)
    saved = keys(tmp_path)
    assert {P + "lm_head.weight", P + "lm_head.bias"} <= saved
    assert not any(".original_module." in k or ".modules_to_save." in k for k in saved)
    assert (P + "blocks.0.norm.bias" in saved) == (bias == "all")
    fresh = lora.load_adapter(toy(), tmp_path)
    torch.testing.assert_close(run(fresh), want, rtol=0, atol=0)
    torch.testing.assert_close(fresh.lm_head.original_module.bias, original, rtol=0, atol=0)
    lora.load_adapter(fresh, tmp_path)  # in place (resume) takes it too
    torch.testing.assert_close(run(fresh), want, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_mark_only_lora_as_trainable_leaves_the_wrapper_as_it_is(bias):
    model = lora.inject(
        toy(),
        lora.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], bias=bias),
    )
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    lora.mark_only_lora_as_trainable(model, bias=bias)  # as loralib scripts call it after inject
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert after == before
    assert {
        "lm_head.modules_to_save.default.weight",
        "lm_head.modules_to_save.default.bias",
    } <= after
    assert not any("original_module" in n for n in after)
    assert ("blocks.0.norm.bias" in after) == (bias == "all")


def _with_base_biases_of(path, source: dict[str, torch.Tensor]):
    """Rewrite the adapter file at ``path`` with the base-model biases (not its head's) of ``source``."""
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in tensors:
        if "lora_" not in k and "lm_head" not in k:
            tensors[k] = source[k[len(P) :].replace(".base_layer", "")].detach().clone()
    save_file(tensors, str(path / WEIGHTS_NAME))
    return tensors


@pytest.mark.parametrize("first_saves_the_head", [True, False])
def test_a_second_named_adapter_brings_its_own_head_bias_and_saves_only_it(
    tmp_path, first_saves_the_head
):
    if first_saves_the_head:
        first = trained("all", seed=0)
    else:
        first = trained("none", seed=0, saved=())
    second = trained("all", seed=1)
    lora.save_adapter(first, tmp_path / "a")
    lora.save_adapter(second, tmp_path / "b")
    model = lora.load_adapter(toy(), tmp_path / "a", adapter_name="a")
    # b trained the base biases the model's "a" shares: refused, naming one.
    with pytest.raises(lora.AdapterError, match=r"blocks\.0\.norm\.bias: differs from the model's"):
        lora.load_adapter(model, tmp_path / "b", adapter_name="b")
    # b with the model's base biases: its head (weight and bias) is its own copy, accepted.
    tensors = _with_base_biases_of(tmp_path / "b", dict(model.named_parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert model.lm_head.adapter_names == (["a", "b"] if first_saves_the_head else ["b"])
    # nothing of the model's changed, the original head included
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0, msg=n)
    lora.set_adapter(model, "b")
    torch.testing.assert_close(model.lm_head.bias, second.lm_head.bias, rtol=0, atol=0)
    base_head = toy().lm_head
    for param in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(model.lm_head.original_module, param), getattr(base_head, param), rtol=0, atol=0
        )
    lora.save_adapter(model, tmp_path / "b_again", adapter_name="b")
    assert keys(tmp_path / "b_again") == keys(tmp_path / "b")
    with safe_open(str(tmp_path / "b_again" / WEIGHTS_NAME), "pt") as f:
        for k in tensors:
            torch.testing.assert_close(f.get_tensor(k), tensors[k], rtol=0, atol=0, msg=k)
