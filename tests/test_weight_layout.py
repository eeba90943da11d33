"""Which layout a linear layer's weight has, (out, in) or (in, out), is read from the module's type
where the type says it; ``fan_in_fan_out`` decides only for other types.

``fan_in_fan_out=True`` over a torch ``nn.Linear`` used to read its (out, in) weight transposed:
wrong outputs from the moment of injection (an error only where in != out). It is now set right
with a warning, as PEFT does. GPT-2's Conv1D is (in, out) whatever the argument says."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from reference import dense_forward, effective_weight, randomize_lora
from torch import nn

import lora
from lora.layers.linear import stores_in_out

WARNS = r"fan_in_fan_out=True: ignored for Linear, a torch nn.Linear, whose weight is stored \(out_features, in_features\)"


class Conv1D(nn.Module):
    """GPT-2's layer as transformers writes it (recognised by its name and ``nf``): weight (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class InOut(nn.Module):
    """A layer of a type the library does not know, storing (in, out): only the argument can say."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_f, out_f))
        self.bias = nn.Parameter(torch.randn(out_f))

    def forward(self, x):
        return x @ self.weight + self.bias


@contextlib.contextmanager
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("in_f,out_f", [(8, 8), (8, 5)])
def test_inject_with_fan_in_fan_out_true_reads_torch_linears_as_out_in(in_f, out_f):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_f, out_f), nn.Tanh(), nn.Linear(out_f, 3))
    x = torch.randn(4, in_f)
    want = model(x)
    with pytest.warns(UserWarning, match=WARNS):
        lora.inject(model, lora.LoRAConfig(r=2, target_modules=["0", "2"], fan_in_fan_out=True))
    assert not model[0].fan_in_fan_out and not model[2].fan_in_fan_out
    assert model[0].lora_A.shape == (2, in_f) and model[0].lora_B.shape == (out_f, 2)
    torch.testing.assert_close(model(x), want)  # a fresh adapter adds nothing
    randomize_lora(model[0])
    torch.testing.assert_close(model[0](x), dense_forward(model[0], x))
    merged_weight = effective_weight(model[0])
    plain = lora.merge_and_unload(model)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain[0].weight, merged_weight)


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_from_base_over_a_torch_linear_with_fan_in_fan_out_true_warns_and_computes_the_base(kind):
    torch.manual_seed(1)
    base = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    want = base(x)
    with pytest.warns(UserWarning, match=WARNS):
        if kind == "linear":
            layer = lora.Linear.from_base(base, r=2, fan_in_fan_out=True)
        else:
            layer = lora.MergedLinear.from_base(
                base, r=2, enable_lora=[True, False], fan_in_fan_out=True
            )
    assert not layer.fan_in_fan_out and layer.weight is base.weight
    torch.testing.assert_close(layer(x), want)
    randomize_lora(layer)
    torch.testing.assert_close(layer(x), dense_forward(layer, x))


@pytest.mark.parametrize("nf,nx", [(7, 7), (7, 4)])
def test_from_base_over_gpt2_conv1d_stores_in_out_without_being_told(nf, nx):
    torch.manual_seed(2)
    base = Conv1D(nf, nx)
    x = torch.randn(5, nx)
    want = base(x)
    with no_warning():
        layer = lora.Linear.from_base(base, r=3)  # fan_in_fan_out left at its default, False
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (nx, nf)
    torch.testing.assert_close(layer(x), want)
    randomize_lora(layer)
    torch.testing.assert_close(layer(x), dense_forward(layer, x))


def test_a_layer_of_another_type_takes_the_argument_without_a_warning():
    torch.manual_seed(3)
    base = InOut(5, 5)
    x = torch.randn(2, 5)
    with no_warning():
        layer = lora.Linear.from_base(base, r=2, fan_in_fan_out=True)
    assert layer.fan_in_fan_out
    torch.testing.assert_close(layer(x), base(x))
    assert stores_in_out(base) is False  # and without the argument: (out, in), as a Linear


def test_a_lora_layer_answers_with_its_own_layout():
    stored = lora.Linear(4, 3, r=2, fan_in_fan_out=True)
    plain = lora.Linear(4, 3, r=2)
    with no_warning():
        assert stores_in_out(stored, False) is True
        assert stores_in_out(plain, True) is False


def test_an_adapter_saved_under_fan_in_fan_out_true_loads_back_the_same(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    config = lora.LoRAConfig(r=2, target_modules=["0", "2"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match=WARNS):
        lora.inject(model, config)
    for i in (0, 2):
        randomize_lora(model[i])
    want = model(x)
    lora.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match=WARNS):
        loaded = lora.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(loaded(x), want)


def test_peft_reads_the_same_layout(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs_base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs_base.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=WARNS):
        lora.inject(model, lora.LoRAConfig(r=2, target_modules=["0", "2"], fan_in_fan_out=True))
    for i in (0, 2):
        randomize_lora(model[i])
    lora.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own note that it set fan_in_fan_out to False
        theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), model(x))
