"""One module registered under two names (T5's shared embedding, a layer reused by reference) is
one target: any of its names matches it, and its LoRA layer takes its place under every name.

``named_modules()`` lists such a module once, under its first name, so ``inject`` used to put the
LoRA layer there only: the path through the other name kept the plain module and skipped the
adapter, silently (and naming the other name matched nothing)."""

from __future__ import annotations

import pytest
import torch
from reference import dense_forward, randomize_lora
from torch import nn

import lora


class Reused(nn.Module):
    """``first`` and ``second`` are one Linear; ``head`` is another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(6, 6)
        self.first = shared
        self.block = nn.ModuleDict({"second": shared})
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block["second"](torch.tanh(self.first(x)))))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def reference(model: Reused, x):
    h = torch.tanh(dense_forward(model.first, x))
    return model.head(torch.tanh(dense_forward(model.first, h)))


@pytest.mark.parametrize(
    "targets", [["first"], ["second"], ["block.second"], r"block\.second", "all-linear"]
)
def test_either_name_adapts_the_module_under_both(targets):
    model = Reused()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=targets))
    assert isinstance(model.first, lora.Linear)
    assert model.block["second"] is model.first  # one layer, one adapter, as one module was
    randomize_lora(model.first)
    torch.testing.assert_close(model(X), reference(model, X))


def test_excluding_either_name_leaves_the_module_alone():
    model = Reused()
    lora.inject(
        model, lora.LoRAConfig(r=2, target_modules="all-linear", exclude_modules=["second"])
    )
    assert type(model.first) is nn.Linear and model.block["second"] is model.first
    assert isinstance(model.head, lora.Linear)


def test_merge_and_unload_puts_one_plain_module_under_both_names():
    model = Reused()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["first"]))
    randomize_lora(model.first)
    want = model(X)
    plain = lora.merge_and_unload(model)
    assert type(plain.first) is nn.Linear and plain.block["second"] is plain.first
    torch.testing.assert_close(plain(X), want)


def test_an_adapter_of_a_reused_module_round_trips(tmp_path):
    model = Reused()
    lora.inject(model, lora.LoRAConfig(r=2, target_modules=["second", "head"]))
    randomize_lora(model.first)
    randomize_lora(model.head)
    want = model(X)
    lora.save_adapter(model, tmp_path)
    loaded = lora.load_adapter(Reused(), tmp_path)
    assert loaded.block["second"] is loaded.first
    torch.testing.assert_close(loaded(X), want)
