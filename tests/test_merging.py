"""Merging without loralib's traps. Each defect test runs on ours and, when installed, on loralib,
where it is expected to fail (xfail strict): the test shows the defect and that it is gone here."""

from __future__ import annotations

import pickle

import pytest
import torch
from reference import randomize_lora
from torch import nn

import lora

try:
    import loralib
except ImportError:  # optional peer
    loralib = None

IMPLS = [
    pytest.param(lora, id="lora"),
    pytest.param(
        loralib,
        id="loralib",
        marks=[
            pytest.mark.skipif(loralib is None, reason="loralib not installed"),
            pytest.mark.xfail(strict=True, reason="loralib's known defect"),
        ],
    ),
]


class Net(nn.Module):
    def __init__(self, impl, dtype=torch.float32):
        super().__init__()
        self.fc1 = impl.Linear(8, 16, r=4, lora_alpha=8, dtype=dtype)
        self.qkv = impl.MergedLinear(16, 24, r=2, enable_lora=[True, False, True], dtype=dtype)
        self.emb = impl.Embedding(10, 8, r=2, dtype=dtype)

    def forward(self, ids):
        return self.qkv(torch.tanh(self.fc1(self.emb(ids))))


def pretrained(impl, dtype=torch.float32):
    torch.manual_seed(0)
    net = Net(impl, dtype)
    for m in (net.fc1, net.qkv):
        randomize_lora(m)
    with torch.no_grad():
        net.emb.lora_A.normal_()
    return net


IDS = torch.tensor([[1, 4, 9, 0], [3, 3, 2, 7]])


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_taken_while_merged_is_not_merged_twice(impl):
    net = pretrained(impl)
    net.eval()  # merges
    want = net(IDS)
    saved = net.state_dict()
    base_keys = {k: v for k, v in saved.items() if "lora_" not in k}
    fresh = Net(impl)
    fresh.load_state_dict(base_keys, strict=False)  # the "pretrained" checkpoint
    fresh.load_state_dict({k: v for k, v in saved.items() if "lora_" in k}, strict=False)
    fresh.eval()
    torch.testing.assert_close(fresh(IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_train_eval_cycles_never_drift_the_base_weight(impl, dtype):
    net = pretrained(impl, dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(5):
        net.eval()
        net.train()
    after = net.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    weights = [net.fc1.weight, net.qkv.weight, net.emb.weight]
    assert all(
        torch.equal(w, before[n])
        for w, n in zip(weights, ["fc1.weight", "qkv.weight", "emb.weight"])
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_loading_lora_weights_into_a_merged_model_uses_the_new_weights(impl):
    net = pretrained(impl)
    other = pretrained(impl)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_" in name:
                p.mul_(-2.0)
    other.eval()
    want = other(IDS)
    net.eval()  # merged with the old adapter
    net.load_state_dict(impl.lora_state_dict(other), strict=False)
    torch.testing.assert_close(net(IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_layers_pickle_with_dropout_zero(impl):
    layer = impl.Linear(4, 4, r=2)
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 4)
    assert torch.equal(clone(x), layer(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_pretrained_conv_state_dict_loads_with_strict_false(impl):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = impl.Conv2d(3, 4, 3, r=2, padding=1)
    result = layer.load_state_dict(base.state_dict(), strict=False)
    assert not result.missing_keys or all("lora_" in k for k in result.missing_keys)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nd", [1, 3])
def test_conv1d_and_conv3d_with_kernel_above_one_run(impl, nd):
    layer = getattr(impl, f"Conv{nd}d")(2, 4, 3, r=2)
    with torch.no_grad():
        layer.lora_B.normal_() if hasattr(layer, "lora_B") else None
    out = layer(torch.randn(1, 2, *([5] * nd)))
    assert out.shape == (1, 4, *([3] * nd))


def test_merge_is_idempotent_and_model_wide():
    net = pretrained(lora)
    net.train()
    want = net(IDS)
    lora.merge(net)
    lora.merge(net)
    assert all(m.merged for m in (net.fc1, net.qkv, net.emb))
    torch.testing.assert_close(net(IDS), want, rtol=1e-5, atol=1e-5)
    lora.unmerge(net)
    lora.unmerge(net)
    assert not any(m.merged for m in (net.fc1, net.qkv, net.emb))
    assert torch.equal(net(IDS), want)


def test_merge_weights_false_never_merges_on_eval():
    layer = lora.Linear(4, 4, r=2, merge_weights=False)
    layer.eval()
    assert not layer.merged
    layer.merge()
    assert layer.merged
    layer.train()  # an explicit merge stays until an explicit unmerge
    assert layer.merged


def test_merged_state_dict_holds_the_base_weight_and_merged_layer_holds_w_plus_delta():
    layer = randomize_lora(lora.Linear(5, 3, r=2))
    W = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.state_dict()["weight"], W)
    torch.testing.assert_close(
        layer.weight.detach(), W + layer.lora_B @ layer.lora_A * layer.scaling
    )
