"""Phi-3's fused RMSNorm, SwiGLU and rotary embedding (lora.models.fused_ops): bitwise the composite's forward,
gradients against autograd through the plain ops, what they keep for backward, and the model's
paths that must keep working through them (checkpointing, autocast, compile)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import saved_bytes
from tiny import TINY_PHI3

import lora.models.fused_ops as FO
import lora.models.phi3 as phi3
from lora.models import Phi3Config, Phi3ForCausalLM

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Gradient tolerances against the composite, by dtype: the composite rounds its intermediates to
# the activation dtype, the fused backward does not.
GRAD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


@contextlib.contextmanager
def chunk_elements(n: int):
    """The row chunks' size (elements; RMSNorm's forward and backward, SwiGLU's backward), so
    that small cases run over several chunks."""
    with mock.patch.object(FO, "CHUNK_ELEMENTS", n):
        yield


def grads_close(got, want, dtype, name):
    rtol, atol = GRAD_TOL[dtype]
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(scale, 1.0), msg=name)


@st.composite
def norm_case(draw):
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    hidden = draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    x = (torch.randn(*lead, hidden, generator=g) * scale).to(dtype)
    weight_dtype = draw(st.sampled_from([dtype, torch.float32]))
    weight = (torch.rand(hidden, generator=g) + 0.5).to(weight_dtype)
    eps = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    return x, weight, eps, draw(st.booleans()), draw(st.booleans()), draw(st.integers(1, 200))


@given(norm_case())
@settings(max_examples=80, deadline=None)
def test_rms_norm_forward_is_bitwise_the_composite_and_gradients_match_it(case):
    x, weight, eps, x_grad, w_grad, chunk = case
    leaves = {}
    for name in ("fused", "ref"):
        leaves[name] = (
            x.clone().requires_grad_(x_grad),
            weight.clone().requires_grad_(w_grad),
        )
    with chunk_elements(chunk):
        got = FO.rms_norm(*leaves["fused"], eps)
        want = FO.rms_norm_reference(*leaves["ref"], eps)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want) or (torch.isnan(got) == torch.isnan(want)).all()
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        if not (x_grad or w_grad):
            assert got.grad_fn is None
            return
        upstream = torch.randn(got.shape).to(got.dtype)
        (got * upstream).sum().backward()
        (want * upstream).sum().backward()
    for i, name in enumerate(("x", "weight")):
        ours, ref = leaves["fused"][i], leaves["ref"][i]
        if not ours.requires_grad:
            assert ours.grad is None, name
            continue
        assert ours.grad.dtype == ours.dtype and ours.grad.shape == ours.shape
        # Normalised in fp32 (the default compute_dtype), fp64 included.
        precision = torch.float32 if x.dtype == torch.float64 else x.dtype
        grads_close(ours.grad, ref.grad, precision, name)


def test_rms_norm_in_bf16_is_closer_to_the_fp64_truth_than_the_composite():
    # The fused backward computes in fp32; the composite rounds g·weight to bf16 first.
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 96, generator=g) * 4).to(torch.bfloat16)
    weight = (torch.rand(96, generator=g) + 0.5).to(torch.bfloat16)
    upstream = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    errs = {}
    truth = None
    for name in ("truth", "fused", "ref"):
        xx = (x.double() if name == "truth" else x.clone()).requires_grad_()
        ww = (weight.double() if name == "truth" else weight.clone()).requires_grad_()
        if name == "truth":
            out = FO.rms_norm_reference(xx, ww, 1e-5, compute_dtype=torch.float64)
        else:
            out = (FO.rms_norm if name == "fused" else FO.rms_norm_reference)(xx, ww, 1e-5)
        (out * upstream.to(out.dtype)).sum().backward()
        if truth is None:
            truth = (xx.grad, ww.grad)
        else:
            errs[name] = [
                (a.double() - t).abs().max().item() for a, t in zip((xx.grad, ww.grad), truth)
            ]
    assert errs["fused"][0] <= errs["ref"][0] and errs["fused"][1] <= errs["ref"][1]


def test_rms_norm_passes_fp64_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(7, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    with chunk_elements(14):  # three chunks of two rows
        assert torch.autograd.gradcheck(
            lambda x, w: FO.rms_norm(x, w, 1e-2, compute_dtype=torch.float64), (x, w)
        )


def test_rms_norm_weight_gets_a_gradient_only_when_it_requires_one():
    x = torch.randn(3, 8, requires_grad=True)
    frozen = torch.ones(8)
    trainable = torch.full((8,), 2.0, requires_grad=True)
    FO.rms_norm(x, frozen, 1e-5).sum().backward()
    assert frozen.grad is None and x.grad is not None
    x.grad = None
    FO.rms_norm(x.detach(), trainable, 1e-5).square().sum().backward()
    assert x.grad is None and trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_rms_norm_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match=r"weight has shape \(7,\); expected \(hidden,\) = \(8,\)"):
        FO.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        FO.rms_norm(torch.ones(2, 8, dtype=torch.long), torch.ones(8), 1e-5)


@st.composite
def swiglu_case(draw):
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    width = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    gate_up = (torch.randn(*lead, 2 * width, generator=g) * scale).to(dtype)
    return gate_up, draw(st.integers(1, 200))


@given(swiglu_case())
@settings(max_examples=80, deadline=None)
def test_swiglu_forward_and_gradient_are_bitwise_the_composites(case):
    gate_up, chunk = case
    ours, ref = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    with chunk_elements(chunk):
        got, want = FO.swiglu(ours), FO.swiglu_reference(ref)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        upstream = torch.randn(got.shape).to(got.dtype)
        (got * upstream).sum().backward()
        (want * upstream).sum().backward()
    assert ours.grad.dtype == gate_up.dtype and ours.grad.shape == gate_up.shape
    # autograd's own backward ops, drawn again: bitwise its gradient, in every dtype
    assert torch.equal(ours.grad, ref.grad)


def test_swiglu_of_views_and_non_contiguous_input():
    # gate_up as a slice of a wider tensor, and transposed leading dims.
    base = torch.randn(6, 5, 20, dtype=torch.float64)
    for view in (base[..., 2:18], base.transpose(0, 1)[..., :16]):
        ours, ref = view.clone().requires_grad_(), view.clone().requires_grad_()
        ours_in = ours.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous, same values
        assert torch.equal(FO.swiglu(ours_in), FO.swiglu_reference(ref))
        FO.swiglu(ours_in).sum().backward()
        FO.swiglu_reference(ref).sum().backward()
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_swiglu_passes_fp64_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 10, dtype=torch.float64, generator=g, requires_grad=True)
    with chunk_elements(10):
        assert torch.autograd.gradcheck(FO.swiglu, (x,))


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match=r"gate_up has dtype torch.float32 and shape \(2, 7\)"):
        FO.swiglu(torch.randn(2, 7))


@st.composite
def rotary_case(draw):
    b = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    s = draw(st.integers(0, 9))
    half = draw(st.integers(1, 6))
    d = 2 * half + draw(st.sampled_from([0, 0, 1, 3, 4]))  # r = 2·half rotated of d (partial)
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # q as the model makes it: (b, s, heads, d) from a projection, transposed to (b, heads, s, d)
    x = torch.randn(b, s, heads, d, generator=g).to(dtype).transpose(1, 2)
    if draw(st.booleans()):
        x = x.contiguous()
    angles = torch.rand(b if draw(st.booleans()) else 1, s, half, generator=g) * 20
    angles = torch.cat((angles, angles), dim=-1)
    return x, angles.cos().to(dtype), angles.sin().to(dtype)


@given(rotary_case())
@settings(max_examples=80, deadline=None)
def test_rotary_forward_and_gradient_are_bitwise_the_composites(case):
    x, cos, sin = case
    ours, ref = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    got, want = FO.rotary(ours, cos, sin), FO.rotary_reference(ref, cos, sin)
    assert got.shape == want.shape == x.shape and got.dtype == x.dtype
    assert got.is_contiguous()
    assert torch.equal(got, want)
    upstream = torch.randn(got.shape).to(got.dtype)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert torch.equal(ours.grad, ref.grad)


def test_rotary_with_cos_and_sin_of_another_dtype_is_the_composites_promotion():
    x = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    angles = torch.rand(1, 3, 8)
    got = FO.rotary(x, angles.cos(), angles.sin())
    want = FO.rotary_reference(x, angles.cos(), angles.sin())
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_rotary_rotates_each_pair_by_its_angle():
    # An independent check of the composite's meaning (not only that the two agree): channel i and
    # i + r/2 of a head form the pair (a, b) that the angle θ_i turns into (a cosθ - b sinθ,
    # b cosθ + a sinθ); channels past r pass through.
    x = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    theta = torch.rand(1, 3, 2, dtype=torch.float64) * 6
    angles = torch.cat((theta, theta), dim=-1)
    out = FO.rotary(x, angles.cos(), angles.sin())
    c, s = theta.cos().unsqueeze(1), theta.sin().unsqueeze(1)
    a, b = x[..., 0:2], x[..., 2:4]
    torch.testing.assert_close(out[..., 0:2], a * c - b * s, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., 2:4], b * c + a * s, rtol=0, atol=1e-12)
    assert torch.equal(out[..., 4:], x[..., 4:])


def test_rotary_passes_fp64_gradcheck_and_keeps_only_cos_and_sin():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.rand(1, 5, 3, dtype=torch.float64, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    assert torch.autograd.gradcheck(lambda t: FO.rotary(t, cos, sin), (x,))
    # nothing of x is kept: cos and sin are shared by every layer and live anyway
    assert saved_bytes(lambda: FO.rotary(x, cos, sin), exclude=(x, cos, sin))[0] == 0


def test_a_second_derivative_through_them_raises():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.ones(1, 3, 8, dtype=torch.float64), torch.zeros(1, 3, 8, dtype=torch.float64)
    for fn in (
        lambda t: FO.rms_norm(t, torch.ones(8, dtype=t.dtype), 1e-5),
        FO.swiglu,
        lambda t: FO.rotary(t.view(1, 1, 3, 8), cos, sin),
    ):
        (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_functions_run_and_compute_what_the_composites_compute_there(dtype):
    """Forward bitwise the composite under autocast; gradients bitwise for SwiGLU and rotary (they
    run autograd's own ops), within the usual tolerance for RMSNorm's hand-derived fp32 backward
    (as outside autocast)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g).to(dtype).requires_grad_(True)
    w = (torch.rand(8, generator=g) + 0.5).requires_grad_(True)  # an fp32 weight, as under autocast
    cos, sin = (
        torch.rand(1, 6, 8, generator=g).to(dtype),
        torch.rand(1, 6, 8, generator=g).to(dtype),
    )
    q = x.view(1, 1, 6, 8)
    pairs = [
        (lambda: FO.rms_norm(x, w, 1e-5), lambda: FO.rms_norm_reference(x, w, 1e-5), "_RMSNorm"),
        (lambda: FO.swiglu(x), lambda: FO.swiglu_reference(x), "_SwiGLU"),
        (lambda: FO.rotary(q, cos, sin), lambda: FO.rotary_reference(q, cos, sin), "_Rotary"),
    ]
    for fused, composite, name in pairs:
        results = []
        for fn in (fused, composite):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fn()
            if fn is fused:
                assert type(y.grad_fn).__name__ == name + "Backward", name
            grads = torch.autograd.grad(y.float().square().sum(), (x, w), allow_unused=True)
            results.append((y, grads))
        (y, grads), (want, want_grads) = results
        assert y.dtype == want.dtype and torch.equal(y, want), name
        for got, exp in zip(grads, want_grads):
            assert (got is None) == (exp is None), name
            if got is None:
                continue
            if name == "_RMSNorm":
                grads_close(got, exp, got.dtype, name)
            else:
                assert torch.equal(got, exp), name


def test_compile_takes_the_composite():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.ones(8)
    assert type(FO.rms_norm(x, w, 1e-5).grad_fn).__name__ == "_RMSNormBackward"
    assert type(FO.swiglu(x).grad_fn).__name__ == "_SwiGLUBackward"
    q, cs = x.view(1, 1, 4, 8), torch.ones(1, 4, 8)
    assert type(FO.rotary(q, cs, cs).grad_fn).__name__ == "_RotaryBackward"
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        assert type(FO.rms_norm(x, w, 1e-5).grad_fn).__name__ == "MulBackward0"
        assert type(FO.swiglu(x).grad_fn).__name__ == "MulBackward0"
        assert type(FO.rotary(q, cs, cs).grad_fn).__name__ == "CatBackward0"


# --- in the model ------------------------------------------------------------------------------


@contextlib.contextmanager
def composite_phi3():
    """Phi-3 with the plain composites instead of the fused functions (the model as before)."""
    with (
        mock.patch.object(phi3, "rms_norm", FO.rms_norm_reference),
        mock.patch.object(phi3, "swiglu", FO.swiglu_reference),
        mock.patch.object(phi3, "rotary", FO.rotary_reference),
    ):
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norms_trainable", [False, True])
def test_a_decoder_layer_saves_less_by_the_fp32_copies_and_silu_output(dtype, norms_trainable):
    config = Phi3Config(**{**TINY_PHI3, "hidden_size": 64, "intermediate_size": 96})
    layer = phi3.Phi3DecoderLayer(config).to(dtype)
    layer.requires_grad_(False)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.requires_grad_(norms_trainable)
    b, s, h, inter = 2, 16, config.hidden_size, config.intermediate_size
    x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
    cos, sin = phi3.Phi3RotaryEmbedding(config)(torch.arange(s)[None])
    cos, sin = cos.to(dtype), sin.to(dtype)
    attn = phi3.build_attention_mask(None, b, s, 0, None, x.device)
    params = list(layer.parameters()) + [cos, sin]
    run = lambda: layer(x, cos, sin, attn)[0]  # noqa: E731
    fused, y_fused = saved_bytes(run, exclude=params)
    with composite_phi3():
        plain, y_plain = saved_bytes(run, exclude=params)
    assert torch.equal(y_fused, y_plain)
    tokens, size = b * s, torch.empty((), dtype=dtype).element_size()
    # Per norm the composite keeps x in fp32 (x itself when fp32), and with a trainable weight the
    # normalised activation in x's dtype; the fused one keeps x in its own dtype. Both keep the
    # (tokens, 1) fp32 reciprocal RMS. SwiGLU's composite also keeps silu(gate), (tokens, I).
    per_norm = tokens * h * (4 - size + (size if norms_trainable else 0))
    assert plain - fused == 2 * per_norm + tokens * inter * size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_is_bitwise_the_composite_in_forward_and_close_in_backward(dtype):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**TINY_PHI3)).to(dtype).train()
    ids = torch.randint(3, 96, (2, 11))
    runs = {}
    for name, ctx in (("fused", contextlib.nullcontext), ("plain", composite_phi3)):
        model.zero_grad(set_to_none=True)
        with ctx():
            out = model(ids, labels=ids, return_logits=True)
            out.loss.backward()
        runs[name] = (out.logits, {n: p.grad for n, p in model.named_parameters()})
    assert torch.equal(runs["fused"][0], runs["plain"][0])
    for n, g in runs["fused"][1].items():
        grads_close(g, runs["plain"][1][n], dtype, n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_through_them_is_bitwise_the_plain_step(reentrant):
    grads, logits = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Phi3ForCausalLM(Phi3Config(**{**TINY_PHI3, "resid_pdrop": 0.1})).train()
        model.to(torch.bfloat16)
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        torch.manual_seed(1)
        ids = torch.randint(3, 96, (2, 9))
        out = model(ids, labels=ids, return_logits=True)
        out.loss.backward()
        logits.append(out.logits)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert torch.equal(logits[0], logits[1])
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
