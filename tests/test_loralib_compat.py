"""Drop-in compatibility with loralib: same parameters give the same outputs, its checkpoints load."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lora

loralib = pytest.importorskip("loralib")


def copy_params(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict(src.state_dict(), strict=True)


@given(
    fin=st.integers(1, 10),
    fout=st.integers(1, 10),
    r=st.integers(1, 4),
    alpha=st.sampled_from([1, 4, 16]),
    fifo=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_linear_same_parameters_same_outputs(fin, fout, r, alpha, fifo, bias, seed):
    torch.manual_seed(seed)
    theirs = loralib.Linear(fin, fout, r=r, lora_alpha=alpha, fan_in_fan_out=fifo, bias=bias)
    nn.init.normal_(theirs.lora_B)
    ours = lora.Linear(fin, fout, r=r, lora_alpha=alpha, fan_in_fan_out=fifo, bias=bias)
    copy_params(theirs, ours)
    x = torch.randn(3, fin)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


@given(
    n=st.integers(1, 3),
    per=st.integers(1, 4),
    fin=st.integers(1, 8),
    r=st.integers(1, 3),
    data=st.data(),
    fifo=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_merged_linear_same_parameters_same_outputs(n, per, fin, r, data, fifo, seed):
    enable = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    torch.manual_seed(seed)
    theirs = loralib.MergedLinear(
        fin, n * per, r=r, lora_alpha=2, enable_lora=enable, fan_in_fan_out=fifo
    )
    nn.init.normal_(theirs.lora_B)
    ours = lora.MergedLinear(
        fin, n * per, r=r, lora_alpha=2, enable_lora=enable, fan_in_fan_out=fifo
    )
    copy_params(theirs, ours)
    x = torch.randn(2, 3, fin)
    torch.testing.assert_close(ours(x), theirs(x))


@given(
    num=st.integers(2, 10), dim=st.integers(1, 6), r=st.integers(1, 3), seed=st.integers(0, 1000)
)
def test_embedding_same_parameters_same_outputs(num, dim, r, seed):
    torch.manual_seed(seed)
    theirs = loralib.Embedding(num, dim, r=r, lora_alpha=4)
    nn.init.normal_(theirs.lora_A)
    ours = lora.Embedding(num, dim, r=r, lora_alpha=4)
    copy_params(theirs, ours)
    ids = torch.randint(0, num, (2, 5))
    torch.testing.assert_close(ours(ids), theirs(ids))


class Model(nn.Module):
    """The seed's recipe: a model with its layers swapped for LoRA layers, built with either library."""

    def __init__(self, impl):
        super().__init__()
        self.emb = impl.Embedding(20, 8, r=2)
        self.fc = impl.Linear(8, 12, r=4, lora_alpha=8)
        self.qkv = impl.MergedLinear(12, 12, r=2, enable_lora=[True, False, True])
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        return self.head(self.qkv(torch.relu(self.fc(self.emb(ids)))))


def test_loralib_checkpoints_load_into_ours():
    torch.manual_seed(0)
    theirs = Model(loralib)
    pretrained = {k: v.clone() for k, v in theirs.state_dict().items() if "lora_" not in k}
    loralib.mark_only_lora_as_trainable(theirs)
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 20, (4, 6))
    for _ in range(3):
        opt.zero_grad()
        theirs(ids).square().mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(loralib.lora_state_dict(theirs), buf)
    buf.seek(0)

    ours = Model(lora)
    ours.load_state_dict(pretrained, strict=False)
    result = ours.load_state_dict(torch.load(buf, weights_only=True), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(k for k in pretrained)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(ids), theirs(ids))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_marking_and_lora_state_dict_keys_match_loralib(bias):
    a, b = Model(loralib), Model(lora)
    loralib.mark_only_lora_as_trainable(a, bias=bias)
    lora.mark_only_lora_as_trainable(b, bias=bias)
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {
        n for n, p in b.named_parameters() if p.requires_grad
    }
    assert loralib.lora_state_dict(a, bias=bias).keys() == lora.lora_state_dict(b, bias=bias).keys()


def test_lora_only_bias_covers_conv_biases():
    model = nn.Sequential(lora.Conv2d(2, 3, 3, r=2), nn.Conv2d(3, 3, 1))
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    assert model[0].bias.requires_grad and not model[1].bias.requires_grad
    assert set(lora.lora_state_dict(model, bias="lora_only")) == {"0.lora_A", "0.lora_B", "0.bias"}


def test_loralib_conv_base_keys_load_into_ours():
    theirs = loralib.Conv2d(3, 4, 1, r=2)
    ours = lora.Conv2d(3, 4, 1, r=2)
    ours.load_state_dict(
        {k: v for k, v in theirs.state_dict().items() if "lora_" not in k}, strict=False
    )
    assert torch.equal(ours.weight, theirs.conv.weight) and torch.equal(ours.bias, theirs.conv.bias)
