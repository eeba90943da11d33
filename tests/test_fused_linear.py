"""The fused LoRA linear (lora.functional.lora_linear_fused): gradients against autograd on a dense
reference, what it saves for backward, its dropout's statistics, and determinism under the RNG."""

from __future__ import annotations

import math
import shutil
import threading
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import randomize_lora, saved_bytes
from tiny import TINY_PHI3
from torch.utils._python_dispatch import TorchDispatchMode

import lora
import lora._dropout as D
import lora.functional as LF
from lora import _matmul


def dense_reference(x, W, b, A, B, s, keep, p, fifo):
    """x Wᵀ + b + s · ((x ⊙ keep / (1 - p')) Aᵀ) Bᵀ with plain differentiable ops."""
    Wm = W.T if fifo else W
    y = x @ Wm.T + (b if b is not None else 0)
    if keep is not None:
        x = x * keep.to(x.dtype) / (1 - LF.realised_dropout_p(p))
    return y + s * (x @ A.T) @ B.T


@st.composite
def fused_case(draw):
    tokens = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    fin, fout, r = draw(st.integers(1, 40)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dt = torch.float64
    fifo = draw(st.booleans())
    W = torch.randn((fin, fout) if fifo else (fout, fin), generator=g, dtype=dt)
    b = torch.randn(fout, generator=g, dtype=dt) if draw(st.booleans()) else None
    A, B = torch.randn(r, fin, generator=g, dtype=dt), torch.randn(fout, r, generator=g, dtype=dt)
    x = torch.randn(*tokens, fin, generator=g, dtype=dt)
    p = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 0.9]))
    grads = dict(
        x=draw(st.booleans()),
        W=draw(st.booleans()),
        b=draw(st.booleans()),
        A=draw(st.booleans()),
        B=True,
    )
    return x, W, b, A, B, draw(st.sampled_from([0.5, 2.0])), p, fifo, grads


@given(fused_case(), st.sampled_from(["positions", "bits"]))
@settings(max_examples=60, deadline=None)
def test_fused_forward_and_gradients_match_autograd_on_dense_reference(case, kind):
    """Both ways of drawing the mask (the CPU's positions, CUDA's bits, here on the CPU)."""
    with mock.patch.object(D, "_draws_positions", lambda device: kind == "positions"):
        _check_fused_against_dense_reference(case)


def _check_fused_against_dense_reference(case):
    x, W, b, A, B, s, p, fifo, grads = case
    seed = 1234
    leaves = dict(x=x, W=W, b=b, A=A, B=B)
    ours = {
        k: (v.clone().requires_grad_(grads[k]) if v is not None else None)
        for k, v in leaves.items()
    }
    ref = {
        k: (v.clone().requires_grad_(grads[k]) if v is not None else None)
        for k, v in leaves.items()
    }
    y = LF.lora_linear_fused(
        ours["x"], ours["W"], ours["b"], ours["A"], ours["B"], s, p, fifo, seed=seed
    )
    keep = LF.dropout_keep_mask(x.shape, p, seed) if p > 0 else None
    want = dense_reference(ref["x"], ref["W"], ref["b"], ref["A"], ref["B"], s, keep, p, fifo)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want)
    (y * weights).sum().backward()
    (want * weights).sum().backward()
    for k in leaves:
        if ours[k] is None:
            continue
        if grads[k]:
            torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-10, atol=1e-10, msg=k)
        else:
            assert ours[k].grad is None, k


def test_fused_passes_gradcheck_with_dropout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(4, 7, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda x, b, A, B: LF.lora_linear_fused(x, W, b, A, B, 1.5, 0.3, seed=99)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, B))


def test_fused_rejects_a_bad_dropout_p():
    x, W, A, B = torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1)
    with pytest.raises(ValueError, match="dropout_p=1.0"):
        LF.lora_linear_fused(x, W, None, A, B, 1.0, 1.0)


# --- dropout statistics ------------------------------------------------------------------------


def _use_mask_kind(monkeypatch, kind):
    """Make the CPU draw its mask as ``kind``: "positions" (its own way) or "bits" (CUDA's)."""
    monkeypatch.setattr(D, "_draws_positions", lambda device: kind == "positions")


@pytest.mark.parametrize("kind", ["positions", "bits"])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_drops_each_element_with_probability_p(p, kind, monkeypatch):
    _use_mask_kind(monkeypatch, kind)
    monkeypatch.setattr(D, "_CPU_CHUNK_ELEMENTS", 1 << 16)  # several chunks, cheaply
    shape = (300, 1000)
    n = math.prod(shape)
    p_real = LF.realised_dropout_p(p)
    assert p_real == p if kind == "positions" else abs(p_real - p) <= 2**-17
    drop = ~LF.dropout_keep_mask(shape, p, seed=5)
    sigma = math.sqrt(p_real * (1 - p_real) / n)
    assert abs(drop.float().mean().item() - p_real) < 5 * sigma
    # Independence: neighbours along a row and down a column, and across a chunk boundary.
    d = drop.double()
    for a, b in ((d[:, 1:], d[:, :-1]), (d[1:], d[:-1])):
        joint = (a * b).mean().item()
        sigma2 = math.sqrt(p_real**2 * (1 - p_real**2) / a.numel())
        assert abs(joint - p_real**2) < 5 * sigma2
    # Rows and columns each have the same rate (no per-row or per-column pattern).
    rows, cols = d.mean(1), d.mean(0)
    assert abs(rows.mean().item() - p_real) < 5 * sigma
    assert rows.std().item() < 2 * math.sqrt(p_real * (1 - p_real) / shape[1])
    assert cols.std().item() < 2 * math.sqrt(p_real * (1 - p_real) / shape[0])


@pytest.mark.parametrize("kind", ["positions", "bits"])
def test_dropout_chunks_are_distinct_and_seeds_differ(kind, monkeypatch):
    _use_mask_kind(monkeypatch, kind)
    monkeypatch.setattr(D, "_CPU_CHUNK_ELEMENTS", 1 << 16)
    shape = (1024, 512)
    chunk = D._chunk_rows(shape[0], shape[1], torch.device("cpu"))
    assert chunk < shape[0]  # the test spans chunks
    m = LF.dropout_keep_mask(shape, 0.5, seed=11)
    assert not torch.equal(m[:chunk], m[chunk : 2 * chunk])
    assert not torch.equal(m, LF.dropout_keep_mask(shape, 0.5, seed=12))
    assert torch.equal(m, LF.dropout_keep_mask(shape, 0.5, seed=11))


def test_dropped_positions_are_a_bernoulli_sequence_exactly():
    """Every one of the 2^3 patterns of 3 elements comes with probability p^k (1-p)^(3-k): the
    gaps start at the first element (no offset) and nothing between them is left out."""
    p, seeds = 0.3, 6000
    counts = torch.zeros(8)
    for seed in range(seeds):
        pos = D._dropped_positions(3, p, D._position_rng(seed))
        counts[int(sum(1 << int(i) for i in pos))] += 1
    for pattern in range(8):
        k = bin(pattern).count("1")
        want = p**k * (1 - p) ** (3 - k)
        sigma = math.sqrt(want * (1 - want) / seeds)
        assert abs(counts[pattern].item() / seeds - want) < 5 * sigma, (pattern, counts)


@pytest.mark.parametrize("p", [0.001, 0.05, 0.9])
def test_dropped_positions_gaps_are_geometric_and_a_short_draw_draws_on(p, monkeypatch):
    n = 400_000
    full = D._dropped_positions(n, p, D._position_rng(1))
    # no margin: the first batch of gaps falls short of n about half the time, then more are drawn
    monkeypatch.setattr(D, "_GAP_MARGIN", (0.0, 0.0))
    short = [D._dropped_positions(n, p, D._position_rng(s)) for s in range(4)]
    for pos in [full, *short]:
        assert pos.dtype == torch.int64 and int(pos.min()) >= 0 and int(pos.max()) < n
        assert bool((pos[1:] > pos[:-1]).all())  # sorted, no position twice
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(pos.numel() - n * p) < 5 * sigma, (pos.numel(), n * p)
    gaps = torch.diff(full).double()
    # Geometric(p) on {1, 2, ...}: P(gap = 1) = p, mean 1/p
    ones = (gaps == 1).double().mean().item()
    assert abs(ones - p) < 5 * math.sqrt(p * (1 - p) / gaps.numel())
    sd_mean = math.sqrt((1 - p) / p**2 / gaps.numel())
    assert abs(gaps.mean().item() - 1 / p) < 5 * sd_mean


def test_dropped_positions_at_extreme_p_stay_in_range():
    """A tiny p makes gaps of ~1e300 elements (capped before the integer sums), a p near 1
    drops nearly everything; either way the positions are sorted, unique and in range."""
    n = 5000
    assert D._dropped_positions(n, 1e-300, D._position_rng(0)).numel() == 0
    for p in (1e-9, 1 - 1e-12):
        pos = D._dropped_positions(n, p, D._position_rng(1))
        assert bool(((pos >= 0) & (pos < n)).all()) and bool((pos[1:] > pos[:-1]).all())
    assert pos.numel() == n  # p = 1 - 1e-12: all dropped but for a ~5e-9 chance


def test_fused_dropout_is_unbiased():
    """E[output] equals the dropout-free output: kept elements are scaled by 1 / (1 - p')."""
    torch.manual_seed(0)
    layer = lora.Linear(64, 8, r=4, lora_alpha=4, lora_dropout=0.3, bias=False)
    randomize_lora(layer)
    x = torch.randn(16, 64)
    with torch.no_grad():
        lora_out = torch.stack([layer(x) for _ in range(400)]).mean(0) - F.linear(x, layer.weight)
        want = x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    # Each mean is over 400 draws of a sum over 64 inputs: allow 5 standard errors.
    err = (lora_out - want).abs().max().item()
    assert err < 5 * want.abs().mean().item() * math.sqrt(0.3 / 0.7 / 400) * 3


# --- determinism -------------------------------------------------------------------------------


def _step(layer, x, seed):
    torch.manual_seed(seed)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_same_rng_state_gives_bit_identical_output_and_gradients(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = lora.Linear(50, 6, r=3, lora_dropout=0.2)
    else:
        layer = lora.MergedLinear(50, 9, r=3, lora_dropout=0.2, enable_lora=[True, False, True])
    randomize_lora(layer)
    x = torch.randn(3, 40, 50)
    first, again, other = _step(layer, x, 7), _step(layer, x, 7), _step(layer, x, 8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_reused_chunk_buffer_is_per_thread_and_per_dtype(monkeypatch):
    """The masked chunks go through one reused scratch buffer (per thread and dtype): layers of
    other shapes and dtypes in between, or in another thread at the same time, change nothing."""
    monkeypatch.setattr(D, "_CPU_CHUNK_ELEMENTS", 64 * 40)  # several chunks of 64 rows

    def run(fin, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(300, fin, generator=g).to(dtype).requires_grad_()
        W = torch.randn(7, fin, generator=g).to(dtype)
        A = torch.randn(3, fin, generator=g).requires_grad_()
        B = torch.randn(7, 3, generator=g).requires_grad_()
        y = LF.lora_linear_fused(x, W, None, A, B, 2.0, 0.3, seed=seed)
        y.square().sum().backward()
        return [t.detach().clone() for t in (y, x.grad, A.grad, B.grad)]

    jobs = [(40, torch.float32, 1), (25, torch.bfloat16, 2), (40, torch.float64, 3)]
    alone = []
    for job in jobs:
        D._scratch.buffers.clear()
        alone.append(run(*job))
    results: dict[int, list] = {}

    def worker(i):
        for _ in range(12):  # interleaved with the other threads' layers
            results[i] = [run(*jobs[j]) for j in range(len(jobs))]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        for expected, got in zip(alone, results[i]):
            for a, b in zip(expected, got):
                assert torch.equal(a, b)


def test_rng_state_restore_replays_the_same_masks():
    """What resume relies on: the mask seeds come from torch's global generator."""
    torch.manual_seed(3)
    layer = lora.Linear(20, 5, r=2, lora_dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(8, 20)
    state = torch.get_rng_state()
    a = layer(x)
    torch.set_rng_state(state)
    assert torch.equal(layer(x), a)


def test_gradient_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    layer = lora.Linear(30, 6, r=2, lora_dropout=0.4)
    randomize_lora(layer)
    x = torch.randn(10, 30, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        y.square().sum().backward()
        grads.append((x.grad.clone(), layer.lora_A.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# --- memory: what is saved, and no fp32 copies of bf16 activations ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "merged"])
def test_saved_for_backward_is_the_input_plus_the_rank_r_activation(kind, dtype):
    tokens, fin, r = 64, 96, 4
    base = torch.nn.Linear(fin, 3 * 32, bias=False, dtype=dtype)
    if kind == "linear":
        layer = lora.Linear.from_base(base, r=r, lora_dropout=0.1, lora_dtype=torch.float32)
    else:
        layer = lora.MergedLinear.from_base(
            base, r=r, enable_lora=[True, False, True], lora_dropout=0.1, lora_dtype=torch.float32
        )
    x = torch.randn(tokens, fin, dtype=dtype, requires_grad=True)
    params = list(layer.parameters())
    got, y = saved_bytes(lambda: layer(x), exclude=params + [x])
    k = 2 if kind == "merged" else 1
    # Only the (tokens, r·k) rank-r activation: no dropped copy of x, no mask, no expanded B.
    allowance = tokens * r * k * x.element_size()
    assert got <= allowance, got
    y.sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


class _RecordOutputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out


def test_no_fp32_copy_of_a_bf16_activation():
    tokens, fin, fout = 32, 64, 48
    base = torch.nn.Linear(fin, fout, bias=False, dtype=torch.bfloat16)
    layer = lora.Linear.from_base(base, r=4, lora_dropout=0.1, lora_dtype=torch.float32)
    x = torch.randn(tokens, fin, dtype=torch.bfloat16, requires_grad=True)
    # torch's bf16 kernels (LORA_LOWP_MATMUL=auto/fp32 casts to fp32 on purpose: lora._matmul)
    with _RecordOutputs() as rec, _matmul.mode("native"):
        layer(x).sum().backward()
    big_fp32 = [o for o in rec.outputs if o[1] == torch.float32 and o[2] >= tokens * min(fin, fout)]
    assert not big_fp32, big_fp32


def test_layers_use_the_fused_function(monkeypatch):
    calls = []
    real = LF.lora_linear_fused
    monkeypatch.setattr(LF, "lora_linear_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 8)
    lora.Linear(8, 4, r=2, lora_dropout=0.1)(x)
    lora.MergedLinear(8, 6, r=2, enable_lora=[True, False, True])(x)
    assert len(calls) == 2


# --- torch.compile: the composite path, with the compiler's own RNG ------------------------------


def _decoder_layer_with_lora(dropout):
    from lora.models.phi3 import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**TINY_PHI3))
    lora.inject(
        model, lora.LoRAConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules="all-linear")
    )
    for layer in model.modules():
        if isinstance(layer, lora.LoRALayer):
            randomize_lora(layer)
    return model


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(
                    shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="inductor needs a C compiler",
                ),
            ],
        ),
    ],
)
def test_compiled_model_with_lora_training_matches_eager(backend):
    torch._dynamo.reset()
    model = _decoder_layer_with_lora(dropout=0.0).train()
    ids = torch.randint(3, 96, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, backend=backend, fullgraph=True)
    loss2 = model(ids, labels=ids).loss
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            key = n.replace("._orig_mod", "")
            torch.testing.assert_close(p.grad, want[key], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("route", ["auto", "fp32"])
def test_a_bf16_model_compiles_fullgraph_on_either_matmul_route(route):
    # The check for the CPU's bf16 kernels (lora._matmul, read under "auto") is done once, not
    # traced: before, a bf16 decoder layer broke the graph there (fullgraph=True raised).
    torch._dynamo.reset()
    model = _decoder_layer_with_lora(dropout=0.0).to(torch.bfloat16).train()
    ids = torch.randint(3, 96, (2, 12))
    with _matmul.mode(route):
        loss = model(ids, labels=ids).loss
        loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        for i, layer in enumerate(model.model.layers):
            model.model.layers[i] = torch.compile(layer, backend="aot_eager", fullgraph=True)
        loss2 = model(ids, labels=ids).loss
        loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-2, atol=1e-2)
    got = {
        n.replace("._orig_mod", ""): p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    assert got.keys() == want.keys() and want
    # Compiled, the layers run the plain composite, which rounds to bf16 more often than the
    # eager fast path: measured against fp64 on this model, 4-30% off the largest gradient entry
    # (the fast path 2-8%), so the two agree only to that.
    for n, g in got.items():
        scale = want[n].abs().max().clamp(min=1e-30)
        assert torch.isfinite(g).all() and ((g - want[n]).abs().max() / scale).item() < 0.5, n


def test_compiled_layer_with_dropout_runs_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=2, lora_dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()
    with torch.no_grad():
        base = F.linear(x, layer.weight, layer.bias)
        assert not torch.equal(y, base)  # the adapter contributed


# --- the chunked cross-entropy of a frozen output head -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_cross_entropy_matches_full_logits(dtype):
    from lora.models.phi3 import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_(True)
    W = torch.randn(50, 16, generator=g).to(dtype)
    t = torch.randint(0, 50, (37,), generator=g)
    got = linear_cross_entropy(hidden, W, t, chunk=8)
    got.backward()
    h2 = hidden.detach().clone().requires_grad_(True)
    acc = torch.float32 if dtype == torch.bfloat16 else dtype
    want = F.cross_entropy((h2 @ W.T).to(acc), t, reduction="sum")
    want.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad, h2.grad, rtol=tol, atol=tol)


def test_model_loss_with_a_frozen_head_uses_the_chunked_path_and_equals_the_plain_one(monkeypatch):
    from lora.models import phi3

    model = _decoder_layer_with_lora(dropout=0.0).double()
    model.chunked_loss = True  # the default; set here so that the test says what it covers
    ids = torch.randint(3, 96, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    calls = []
    real = phi3.linear_cross_entropy
    monkeypatch.setattr(
        phi3, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    loss = model(ids, labels=labels).loss
    loss.backward()
    assert calls
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.requires_grad_(True)  # a trainable head takes the plain path
    loss2 = model(ids, labels=labels).loss
    loss2.backward()
    assert len(calls) == 1
    # The plain path computes the loss in fp32 (.float()) even for a float64 model.
    torch.testing.assert_close(loss, loss2.to(loss.dtype), rtol=1e-6, atol=1e-6)
    for n, grad in got.items():
        torch.testing.assert_close(grad, model.get_parameter(n).grad, rtol=1e-5, atol=1e-7, msg=n)


# --- autocast: the fast path in autocast's dtype ------------------------------------------------


def _fp32_lora_layer(kind, p):
    torch.manual_seed(0)
    if kind in ("linear", "linear-fan-in-fan-out"):
        fifo = kind == "linear-fan-in-fan-out"  # weight stored (in, out), as GPT-2's Conv1D
        layer = lora.Linear(64, 96, r=4, lora_alpha=8, lora_dropout=p, fan_in_fan_out=fifo)
    else:
        layer = lora.MergedLinear(
            64, 96, r=4, lora_alpha=8, lora_dropout=p, enable_lora=[True, False, True]
        )
    randomize_lora(layer)
    with torch.no_grad():
        layer.bias.normal_()
    layer.weight.requires_grad_(False)
    return layer


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["linear", "linear-fan-in-fan-out", "merged"])
def test_under_autocast_a_layer_computes_bitwise_what_it_computes_on_bf16_inputs(kind, p):
    """Autocast over an fp32 layer gives bitwise what the layer gives with its base (W, b) and
    input in bf16 outside autocast (the fast path both times, A and B fp32: it casts them), the
    same dropout mask from the same RNG state, and the same gradients, in fp32."""
    layer = _fp32_lora_layer(kind, p)
    ref = _fp32_lora_layer(kind, p)
    ref.weight.data = ref.weight.data.bfloat16()
    ref.bias.data = ref.bias.data.bfloat16()
    x = torch.randn(2, 12, 64, requires_grad=True)
    xb = x.detach().bfloat16().requires_grad_(True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.manual_seed(7)
    want = ref(xb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    g = torch.randn(y.shape).bfloat16()
    y.backward(g)
    want.backward(g)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, xb.grad.float())
    for name in ("lora_A", "lora_B", "bias"):
        got, exp = getattr(layer, name).grad, getattr(ref, name).grad
        assert got.dtype == torch.float32, name
        assert torch.equal(got, exp.float()), name


def test_under_autocast_no_16_bit_copy_of_the_weight_is_kept_for_backward():
    # autocast's own F.linear keeps the bf16 copy of a frozen fp32 weight for the input gradient:
    # for a whole model, the base in 16 bits once more. The fast path casts it again in backward.
    layer = _fp32_lora_layer("linear", 0.1)
    x = torch.randn(24, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, y = saved_bytes(lambda: layer(x), exclude=list(layer.parameters()) + [x])
    # the bf16 input (for dA) and the (tokens, r) activation, nothing the weight's size
    assert got <= 24 * 64 * 2 + 24 * 4 * 2, got
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


def test_a_weight_of_another_dtype_is_refused_outside_autocast_and_float64_keeps_its_dtype():
    layer = _fp32_lora_layer("linear", 0.0)
    with pytest.raises(
        RuntimeError, match=r"weight dtype torch\.float32 and input dtype torch\.bfloat16"
    ):
        layer(torch.randn(3, 64).bfloat16())
    layer.double()
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, layer(x), rtol=1e-12, atol=1e-12)


def test_a_phi3_model_trains_under_autocast_with_the_chunked_loss():
    """An fp32 model under CPU autocast: the chunked loss computes the logits in bf16 (as
    autocast's head would) and the softmax in fp32, so it equals the plain head's loss there."""
    model = _decoder_layer_with_lora(dropout=0.0)
    ids = torch.randint(3, 96, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    results = []
    for chunked in (True, False):
        model.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (plain_loss, plain_grads) = results
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for n, grad in grads.items():
        assert grad.dtype == torch.float32, n
        torch.testing.assert_close(grad, plain_grads[n], rtol=2e-2, atol=2e-3, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "merged", "nf4-lora", "nf4-plain"])
def test_a_layer_output_is_its_own_tensor_and_takes_in_place_ops(kind, dtype):
    """A (b, s, out) output is not a view of the 2-D result inside: FSDP2 drops its pre-backward
    all-gather on an in-place op on a module output that is a view (and warns of any such output),
    and an in-place add on the output gives the gradients of the out-of-place one."""
    torch.manual_seed(0)
    if kind == "merged":
        layer = lora.MergedLinear(64, 96, r=4, lora_alpha=8, enable_lora=[True, False, True])
    else:
        layer = lora.Linear(64, 96, r=4, lora_alpha=8, lora_dropout=0.1)
    randomize_lora(layer)
    layer.weight.requires_grad_(False)
    if kind.startswith("nf4"):
        layer = torch.nn.Sequential(layer)
        if kind == "nf4-plain":
            layer[0] = torch.nn.Linear(64, 96, bias=False)
            layer[0].weight.requires_grad_(False)
        lora.quantize(layer, "nf4")
    layer = layer.to(dtype) if kind == "linear" or kind == "merged" else layer
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    grads = []
    for in_place in (False, True):
        torch.manual_seed(1)  # the same dropout mask both times
        x.grad = None
        y = layer(x)
        assert y._base is None and y.shape == (2, 5, 96)
        y = y.add_(1.0) if in_place else y + 1.0
        (y.float() ** 2).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["plain", "fan_in_fan_out", "nf4", "nf4-slabs"])
def test_the_base_input_gradient_adds_into_out_when_given(kind):
    # The fused backward writes dx's adapter part first and lets the base's matmul add g W into
    # it: with out=, the result must be out + g W, in out's own storage; without, g W alone.
    from lora.quant import NF4Weight

    torch.manual_seed(0)
    dense = torch.randn(96, 64, dtype=torch.float64) * 0.1
    weight, fifo, as_dense = dense, False, dense
    if kind == "fan_in_fan_out":
        weight, fifo = dense.T.contiguous(), True
    elif kind.startswith("nf4"):
        weight = NF4Weight.from_float(dense)
        if kind == "nf4-slabs":  # several slabs of output rows, each accumulated in turn
            weight.chunk_elements = 64 * 64
        as_dense = weight.dequantize()
        assert kind == "nf4" or weight.rows_per_chunk() < 96
    g = torch.randn(10, 96, dtype=torch.float64)
    start = torch.randn(10, 64, dtype=torch.float64)
    out = start.clone()
    got = LF.base_linear_input_grad(g, weight, fifo, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, start + g @ as_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        LF.base_linear_input_grad(g, weight, fifo), g @ as_dense, rtol=1e-12, atol=1e-12
    )
