"""lora._matmul: bf16/fp16 matmuls on a CPU without native kernels go through fp32, rounded once.

Each helper is checked, forced to fp32, against an fp64 reference rounded to the dtype (what a
native kernel that accumulates in fp32 gives, to within one rounding), and forced native against
torch's own op; the LoRA layer, the Phi-3 model and the chunked loss give the same results (to
bf16 rounding) and the same gradients in either mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lora
from lora import _matmul
from lora.models.phi3 import Phi3Config, Phi3ForCausalLM, linear_cross_entropy

LOW = [torch.bfloat16, torch.float16]


def _close_to_rounded(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """got within two of dtype's roundings of the fp64 result (fp32 sums in another order)."""
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = exact.abs().max().item() + 1e-6
    assert (got.double() - exact).abs().max().item() <= 2 * eps * scale


@pytest.mark.parametrize("dtype", LOW)
@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    m=st.integers(1, 50),
    slab=st.sampled_from([1, 7, 64, 1 << 22]),
    seed=st.integers(0, 2**16),
)
def test_helpers_in_fp32_equal_the_rounded_exact_product(dtype, n, k, m, slab, seed):
    old, _matmul._SLAB_ELEMENTS = _matmul._SLAB_ELEMENTS, slab  # slabs of 1 row to one whole
    try:
        _check_helpers(dtype, n, k, m, seed)
    finally:
        _matmul._SLAB_ELEMENTS = old


def _check_helpers(dtype, n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(k, m, generator=g).to(dtype)
    w = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(m, generator=g).to(dtype)
    c = torch.randn(n, m, generator=g).to(dtype)
    with _matmul.mode("fp32"):
        assert _matmul.upcasts(a)
        _close_to_rounded(_matmul.mm(a, b), a.double() @ b.double(), dtype)
        out = torch.empty(n, m, dtype=dtype)
        assert _matmul.mm(a, b, out=out) is out
        _close_to_rounded(out, a.double() @ b.double(), dtype)
        exact_lin = a.double() @ w.double().T + bias.double()
        _close_to_rounded(_matmul.linear(a, w, bias), exact_lin, dtype)
        # a transposed (strided) weight, as a fan_in_fan_out base gives
        _close_to_rounded(_matmul.linear(a, w.T.contiguous().T), a.double() @ w.double().T, dtype)
        c2 = c.clone()
        assert _matmul.addmm_(c2, a, b) is c2
        _close_to_rounded(c2, c.double() + a.double() @ b.double(), dtype)


def test_native_mode_and_other_dtypes_and_devices_leave_torch_alone():
    a, b = torch.randn(5, 6, dtype=torch.bfloat16), torch.randn(6, 7, dtype=torch.bfloat16)
    with _matmul.mode("native"):
        assert not _matmul.upcasts(a)
        assert torch.equal(_matmul.mm(a, b), a @ b)
    with _matmul.mode("fp32"):
        assert not _matmul.upcasts(torch.randn(3, 3))  # fp32 itself
        assert not _matmul.upcasts(torch.empty(3, 3, dtype=torch.bfloat16, device="meta"))
        a32, b32 = a.float(), b.float()
        assert torch.equal(_matmul.mm(a32, b32), a32 @ b32)


def test_bad_mode_names_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="mode='fast'"):
        with _matmul.mode("fast"):
            pass
    monkeypatch.setenv("LORA_LOWP_MATMUL", "fast")
    with pytest.raises(ValueError, match="LORA_LOWP_MATMUL='fast'"):
        _matmul.upcasts(torch.zeros(1, dtype=torch.bfloat16))


def _grads(module, x, mode):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout seed
    with _matmul.mode(mode):
        y = module(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _assert_bf16_close(a, b, rel=2e-2):
    scale = b.float().abs().max().item() + 1e-6
    assert (a.float() - b.float()).abs().max().item() <= rel * scale


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_linear_fp32_route_matches_native(dropout, fan_in_fan_out):
    torch.manual_seed(0)
    layer = lora.Linear(
        48, 40, r=4, lora_alpha=8, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out
    )
    torch.nn.init.normal_(layer.lora_B)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    y_n, gx_n, g_n = _grads(layer, x, "native")
    y_f, gx_f, g_f = _grads(layer, x, "fp32")
    _assert_bf16_close(y_f, y_n)
    _assert_bf16_close(gx_f, gx_n)
    assert g_f.keys() == g_n.keys() == {"lora_A", "lora_B", "bias"}
    for name in g_n:
        _assert_bf16_close(g_f[name], g_n[name])


def test_frozen_linear_fp32_route_matches_native_with_trainable_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 30).to(torch.bfloat16)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, t):
            return _matmul.frozen_linear(self.lin, t)

    y_n, gx_n, g_n = _grads(Wrap(), x, "native")
    y_f, gx_f, g_f = _grads(Wrap(), x, "fp32")
    _assert_bf16_close(y_f, y_n)
    _assert_bf16_close(gx_f, gx_n)
    for name in ("lin.weight", "lin.bias"):
        assert g_f[name].dtype == torch.bfloat16
        _assert_bf16_close(g_f[name], g_n[name])


class _MatmulDtypes(TorchDispatchMode):
    """The dtypes of the matmuls (and attention) that ran."""

    OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu")

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _tiny_phi3():
    cfg = Phi3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize(
    "targets", [["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["o_proj"]]
)
def test_phi3_bf16_step_fp32_route_matches_native(targets):
    """Every matmul of a bf16 Phi-3 step (LoRA layers, plain frozen projections, attention, the
    chunked loss over a frozen head): loss and adapter gradients as with torch's bf16 kernels."""
    results = {}
    for mode in ("native", "fp32"):
        model = _tiny_phi3()
        lora.inject(model, lora.LoRAConfig(r=4, lora_alpha=8, target_modules=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        lora.mark_only_lora_as_trainable(model)
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[:, :4] = -100
        with _matmul.mode(mode), _MatmulDtypes() as seen:
            out = model(ids, labels=labels)
            out.loss.backward()
        # every matmul of the step, forward and backward, in fp32 on the fp32 route
        assert seen.dtypes == ({torch.float32} if mode == "fp32" else {torch.bfloat16})
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (out.loss.detach(), grads)
    (loss_n, g_n), (loss_f, g_f) = results["native"], results["fp32"]
    assert abs(loss_f.item() - loss_n.item()) <= 2e-2 * abs(loss_n.item())
    assert g_f.keys() == g_n.keys() and len(g_n) == 4 * len(targets)
    for name in g_n:
        _assert_bf16_close(g_f[name], g_n[name], rel=5e-2)


def test_chunked_loss_fp32_route_matches_native():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.bfloat16)
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (37,))
    out = {}
    for mode in ("native", "fp32"):
        h = hidden.clone().requires_grad_(True)
        with _matmul.mode(mode):
            loss = linear_cross_entropy(h, weight, targets, chunk=8)
            loss.backward()
        out[mode] = (loss.detach(), h.grad)
    ref = F.cross_entropy((hidden.double() @ weight.double().T), targets, reduction="sum")
    for loss, _ in out.values():
        assert abs(loss.item() - ref.item()) <= 1e-2 * abs(ref.item())
    _assert_bf16_close(out["fp32"][1], out["native"][1])
