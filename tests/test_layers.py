"""Property tests: every LoRA layer against a dense reference, over random shapes, ranks, options."""

from __future__ import annotations

import copy
import io
import pickle
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import dense_forward, effective_weight, randomize_lora

import lora

KINDS = ["linear", "merged", "embedding", "conv1d", "conv2d", "conv3d"]


@st.composite
def layer_and_input(draw, kinds=tuple(KINDS), dtype=torch.float64, min_r=1):
    """A LoRA layer of a random kind and configuration, with random non-zero A/B, and an input."""
    kind = draw(st.sampled_from(kinds))
    r = draw(st.integers(min_r, 4))
    alpha = draw(st.sampled_from([1, 2, 8, 16.0]))
    rslora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    common = dict(r=r, lora_alpha=alpha, use_rslora=rslora)
    if kind in ("linear", "merged"):
        fin, bias = draw(st.integers(1, 12)), draw(st.booleans())
        fifo = draw(st.booleans())
        batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
        if kind == "linear":
            fout = draw(st.integers(1, 12))
            layer = lora.Linear(fin, fout, fan_in_fan_out=fifo, bias=bias, dtype=dtype, **common)
        else:
            n = draw(st.integers(1, 3))
            enable = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
            if draw(st.booleans()):
                sizes = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
                fout = sum(sizes)
            else:
                sizes, fout = None, n * draw(st.integers(1, 4))
            layer = lora.MergedLinear(
                fin,
                fout,
                enable_lora=enable,
                split_sizes=sizes,
                fan_in_fan_out=fifo,
                bias=bias,
                dtype=dtype,
                **common,
            )
        x = torch.randn(*batch, fin, generator=g, dtype=dtype)
    elif kind == "embedding":
        num, dim = draw(st.integers(2, 12)), draw(st.integers(1, 8))
        padding_idx = draw(st.one_of(st.none(), st.integers(0, num - 1)))
        max_norm = draw(st.one_of(st.none(), st.floats(0.5, 3.0)))
        layer = lora.Embedding(
            num, dim, padding_idx=padding_idx, max_norm=max_norm, dtype=dtype, **common
        )
        x = torch.randint(0, num, (draw(st.integers(1, 3)), draw(st.integers(1, 5))), generator=g)
    else:
        nd = int(kind[-2])
        groups = draw(st.sampled_from([1, 1, 2]))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
        layer_cls = {1: lora.Conv1d, 2: lora.Conv2d, 3: lora.Conv3d}[nd]
        layer = layer_cls(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
            bias=draw(st.booleans()),
            dtype=dtype,
            **common,
        )
        spatial = [
            dilation[i] * (kernel[i] - 1) + 1 + draw(st.integers(max(padding[i], 0), 4))
            for i in range(nd)
        ]
        x = torch.randn(draw(st.integers(1, 2)), cin, *spatial, generator=g, dtype=dtype)
    randomize_lora(layer, g)
    return layer, x


def close(a, b, dtype=torch.float64):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@given(layer_and_input())
def test_forward_equals_dense_reference(case):
    layer, x = case
    close(layer(x), dense_forward(layer, x))


@given(layer_and_input())
def test_merged_forward_equals_unmerged_and_unmerge_restores_weight_exactly(case):
    layer, x = case
    layer.merge_weights = False
    W = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    close(layer.weight.detach(), effective_weight(layer))
    close(layer(x), unmerged)
    layer.merge()  # idempotent: merging twice is impossible
    close(layer(x), unmerged)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight.detach(), W)


@given(layer_and_input(dtype=torch.float32))
def test_merged_forward_equals_unmerged_fp32(case):
    layer, x = case
    unmerged = layer(x)
    layer.eval()  # merge_weights=True: eval() merges
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


@given(layer_and_input())
def test_gradients_match_autograd_on_dense_reference(case):
    layer, x = case
    is_float = x.is_floating_point()
    if is_float:
        x.requires_grad_(True)
    out = layer(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    got = [layer.lora_A.grad, layer.lora_B.grad] + ([x.grad] if is_float else [])
    assert layer.weight.grad is None  # the base weight is frozen

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True) if is_float else x
    ref_layer = copy.deepcopy(layer)
    del ref_layer.lora_A, ref_layer.lora_B
    ref_layer.lora_A, ref_layer.lora_B = (
        A,
        B,
    )  # plain tensors: effective_weight builds W + s·ΔW from them
    W = _effective_weight_differentiable(layer, A, B)
    (dense_forward(layer, x2, weight=W) * weights).sum().backward()
    want = [A.grad, B.grad] + ([x2.grad] if is_float else [])
    for g_got, g_want in zip(got, want):
        close(g_got, g_want)


def _effective_weight_differentiable(layer, A, B):
    W, s = layer.weight.detach(), layer.scaling
    if isinstance(layer, lora.MergedLinear):
        rows, src, j = [], 0, 0
        for size, enabled in zip(layer.split_sizes, layer.enable_lora):
            if enabled:
                rows.append(B[src : src + size] @ A[j * layer.r : (j + 1) * layer.r])
                src += size
                j += 1
            else:
                rows.append(torch.zeros(size, layer.in_features, dtype=A.dtype))
        delta = torch.cat(rows) * s
        return W + (delta.T if layer.fan_in_fan_out else delta)
    if isinstance(layer, lora.Linear):
        delta = (B @ A) * s
        return W + (delta.T if layer.fan_in_fan_out else delta)
    if isinstance(layer, lora.Embedding):
        return W + (B @ A).T * s
    out, r = B.shape[0], B.shape[1]
    return W + (B.reshape(out, r) @ A.reshape(r, -1)).reshape(W.shape) * s


@given(layer_and_input(), st.sampled_from(["none", "all", "lora_only"]))
def test_lora_state_dict_round_trip_into_fresh_model(case, bias):
    layer, x = case
    model = torch.nn.Sequential(layer)
    want = model(x)
    pretrained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    saved = lora.lora_state_dict(model, bias=bias)
    assert all("lora_" in k or k.endswith("bias") for k in saved)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(pretrained, strict=False)
    fresh.load_state_dict(saved, strict=False)
    close(fresh(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_layer_computes_exactly_its_base_layer(kind):
    torch.manual_seed(1)
    if kind in ("linear", "merged"):
        layer = (
            lora.Linear(5, 6, r=3)
            if kind == "linear"
            else lora.MergedLinear(5, 6, r=3, enable_lora=[True, False, True])
        )
        base = torch.nn.Linear(5, 6)
        x = torch.randn(4, 5)
    elif kind == "embedding":
        layer, base = (
            lora.Embedding(7, 4, r=3, padding_idx=0),
            torch.nn.Embedding(7, 4, padding_idx=0),
        )
        x = torch.tensor([[0, 3, 6]])
    else:
        nd = int(kind[-2])
        layer = getattr(lora, f"Conv{nd}d")(2, 4, 3, r=2, padding=1)
        base = getattr(torch.nn, f"Conv{nd}d")(2, 4, 3, padding=1)
        x = torch.randn(1, 2, *([5] * nd))
    base.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(layer(x), base(x))
    layer.eval()
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", KINDS)
def test_rank_zero_is_the_plain_torch_layer(kind):
    layers = {
        "linear": (lora.Linear(3, 4), torch.nn.Linear(3, 4)),
        "merged": (lora.MergedLinear(3, 4, enable_lora=[True, False]), torch.nn.Linear(3, 4)),
        "embedding": (lora.Embedding(5, 3), torch.nn.Embedding(5, 3)),
        "conv1d": (lora.Conv1d(2, 3, 3), torch.nn.Conv1d(2, 3, 3)),
        "conv2d": (lora.Conv2d(2, 3, 3), torch.nn.Conv2d(2, 3, 3)),
        "conv3d": (lora.Conv3d(2, 3, 3), torch.nn.Conv3d(2, 3, 3)),
    }
    ours, theirs = layers[kind]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(p.requires_grad for p in ours.parameters())
    assert not ours.has_adapter


def test_scaling_and_init():
    layer = lora.Linear(8, 5, r=4, lora_alpha=16)
    assert layer.scaling == 4.0
    assert lora.Linear(8, 5, r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (5, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = (1 / 8) ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 8: bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    emb = lora.Embedding(10, 3, r=2)
    assert emb.lora_A.shape == (2, 10) and emb.lora_B.shape == (3, 2)
    assert torch.count_nonzero(emb.lora_A) == 0 and torch.count_nonzero(emb.lora_B) > 0


def test_merged_linear_shapes_follow_loralib_and_split_sizes():
    m = lora.MergedLinear(16, 24, r=4, enable_lora=[True, False, True])
    assert m.lora_A.shape == (8, 16) and m.lora_B.shape == (16, 4)
    gqa = lora.MergedLinear(16, 32, r=4, enable_lora=[True, False, True], split_sizes=[16, 8, 8])
    assert gqa.lora_A.shape == (8, 16) and gqa.lora_B.shape == (24, 4)
    assert not lora.MergedLinear(16, 24, r=4, enable_lora=[False, False]).has_adapter


@pytest.mark.parametrize("cls,args", [(lora.Linear, (64, 48)), (lora.MergedLinear, (64, 48))])
def test_forward_never_builds_the_out_by_in_delta(cls, args):
    """Record every intermediate tensor of the forward and backward: none is (out, in) but the base W."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kwargs = {"enable_lora": [True, False, True]} if cls is lora.MergedLinear else {}
    layer = cls(*args, r=4, **kwargs)
    randomize_lora(layer)
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not func.is_view:  # a view of W is no new tensor
                    shapes.append(tuple(t.shape))
            return out

    x = torch.randn(3, 64, requires_grad=True)
    with Record():
        layer(x).sum().backward()
    assert (48, 64) not in shapes and (64, 48) not in shapes, shapes


def test_dropout_is_identity_at_zero_and_dropout_otherwise():
    assert isinstance(lora.Linear(3, 3, r=1).lora_dropout, torch.nn.Identity)
    layer = lora.Linear(3, 3, r=1, lora_dropout=0.5)
    assert isinstance(layer.lora_dropout, torch.nn.Dropout) and layer.lora_dropout.p == 0.5


def test_dropout_only_touches_the_adapter_path():
    torch.manual_seed(0)
    layer = lora.Linear(6, 5, r=2, lora_dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)  # the mask's seed is drawn from the global generator
    seed = int(torch.randint(0, 1 << 62, (1,)).item())
    dropped = x * lora.functional.dropout_keep_mask(x.shape, 0.5, seed) / (1 - 0.5)
    want = (
        torch.nn.functional.linear(x, layer.weight, layer.bias)
        + dropped @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_deepcopy_and_torch_save(kind, tmp_path):
    layer = _small(kind, lora_dropout=0.1 if kind != "embedding" else None)
    randomize_lora(layer)
    layer.eval()
    x = _small_input(kind)
    want = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(clone(x), want)
    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(layer), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own file: whole-module pickling must work
    assert torch.equal(loaded(x), want)


def _small(kind, **kw):
    kw = {k: v for k, v in kw.items() if v is not None}
    return {
        "linear": lambda: lora.Linear(4, 3, r=2, **kw),
        "merged": lambda: lora.MergedLinear(4, 6, r=2, enable_lora=[True, False], **kw),
        "embedding": lambda: lora.Embedding(6, 3, r=2, **kw),
        "conv1d": lambda: lora.Conv1d(2, 3, 3, r=2, **kw),
        "conv2d": lambda: lora.Conv2d(2, 3, 3, r=2, **kw),
        "conv3d": lambda: lora.Conv3d(2, 3, 3, r=2, **kw),
    }[kind]()


def _small_input(kind):
    g = torch.Generator().manual_seed(0)
    if kind in ("linear", "merged"):
        return torch.randn(2, 4, generator=g)
    if kind == "embedding":
        return torch.tensor([[1, 5, 0]])
    return torch.randn(1, 2, *([4] * int(kind[-2])), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_device_dtype_and_meta_construction(kind):
    ctor = {
        "linear": lambda **f: lora.Linear(4, 3, r=2, **f),
        "merged": lambda **f: lora.MergedLinear(4, 6, r=2, enable_lora=[True, False], **f),
        "embedding": lambda **f: lora.Embedding(6, 3, r=2, **f),
        "conv1d": lambda **f: lora.Conv1d(2, 3, 3, r=2, **f),
        "conv2d": lambda **f: lora.Conv2d(2, 3, 3, r=2, **f),
        "conv3d": lambda **f: lora.Conv3d(2, 3, 3, r=2, **f),
    }[kind]
    layer = ctor(dtype=torch.float64)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    meta = ctor(device="meta")
    assert meta.lora_A.is_meta and meta.lora_B.is_meta and meta.weight.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert not meta.lora_A.is_meta
    if kind == "embedding":
        assert torch.count_nonzero(meta.lora_A) == 0 and torch.count_nonzero(meta.lora_B) > 0
    else:
        assert torch.count_nonzero(meta.lora_B) == 0 and torch.count_nonzero(meta.lora_A) > 0
    x = _small_input(kind)
    layer = layer.to(torch.float32)
    assert layer.lora_A.dtype == torch.float32
    layer.eval()
    merged = layer.to(torch.float64)  # the stashed base weight follows .to()
    assert merged._unmerged_weight.dtype == torch.float64
    merged.train()
    assert merged.weight.dtype == torch.float64 and not merged.merged
    assert merged(x.double() if x.is_floating_point() else x).dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_fullgraph_has_no_graph_break(kind):
    torch._dynamo.reset()
    layer = _small(kind, lora_dropout=0.1 if kind != "embedding" else None)
    randomize_lora(layer)
    layer.eval()
    layer.merge_weights = False
    layer.merged = False
    x = _small_input(kind)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))
    layer.merge()
    torch.testing.assert_close(compiled(x), layer(x))


def test_fp32_adapter_on_bf16_base_runs_adapter_in_fp32():
    layer = lora.Linear(8, 4, r=2, dtype=torch.bfloat16)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(4, 2)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    want = (
        torch.nn.functional.linear(x, layer.weight, layer.bias)
        + (x.float() @ layer.lora_A.T @ layer.lora_B.T * layer.scaling).bfloat16()
    )
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)


def test_embedding_padding_row_gets_no_gradient():
    emb = lora.Embedding(6, 3, r=2, padding_idx=2)
    randomize_lora(emb)
    emb(torch.tensor([[2, 2, 4]])).sum().backward()
    assert torch.count_nonzero(emb.lora_A.grad[:, 2]) == 0
    assert torch.count_nonzero(emb.lora_A.grad[:, 4]) > 0


def test_public_namespace_has_no_wildcard_leakage():
    for name in ("torch", "nn", "F", "math", "Tensor", "Optional", "List"):
        assert not hasattr(lora, name), name
    for name in lora.__all__:
        assert hasattr(lora, name)
    for cls in (
        lora.Linear,
        lora.MergedLinear,
        lora.Embedding,
        lora.Conv1d,
        lora.Conv2d,
        lora.Conv3d,
    ):
        assert issubclass(cls, lora.LoRALayer)
    assert issubclass(lora.Linear, torch.nn.Linear) and issubclass(lora.Conv2d, torch.nn.Conv2d)
    assert not issubclass(lora.MergedLinear, lora.Linear)


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_with_inductor_matches_eager(kind):
    """The default backend generates C++ (about 2 s a layer on 2 cores). It caught torch 2.13 inductor
    miscompiling ``torch.add(matmul, other, alpha=s)`` on CPU, which the layers therefore avoid."""
    torch._dynamo.reset()
    layer = _small(kind)
    randomize_lora(layer)
    x = _small_input(kind)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
