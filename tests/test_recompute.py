"""Cheap activations recomputed in backward (lora.models.recompute) and checkpointing only some
decoder layers: the gradients are bitwise those of keeping everything, what is kept shrinks by
exactly the marked tensors, and the scope refuses what it cannot recompute faithfully."""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TINY_PHI3

import lora
from lora.models import Phi3Config, Phi3ForCausalLM, recompute


@contextlib.contextmanager
def kept_by_scopes():
    """Tally what scopes keep for backward: distinct storages' bytes, and the recipes kept instead."""
    tally = {"bytes": 0, "recipes": 0}
    seen: set[int] = set()
    real = recompute._Scope.pack

    def pack(self, t):
        saved = real(self, t)
        if isinstance(saved, torch.Tensor):
            ptr = saved.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                tally["bytes"] += saved.untyped_storage().nbytes()
        else:
            tally["recipes"] += 1
        return saved

    with mock.patch.object(recompute._Scope, "pack", pack):
        yield tally


@contextlib.contextmanager
def nothing_marked():
    """Scopes open as usual, but no activation is marked recomputable: everything is kept."""
    with mock.patch.object(recompute, "recomputable", lambda fn, *args: fn(*args)):
        yield


def build(dtype=torch.float32, target="all-linear", dropout=0.1, seed=0, **over):
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**{**TINY_PHI3, **over})).to(dtype)
    lora.inject(
        model, lora.LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=target)
    )
    with torch.no_grad():  # B starts at zero; give it values so every gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.train()


def step_grads(model, ids, attention_mask=None, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in each variant
    model(ids, attention_mask=attention_mask, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_bitwise(got, want):
    assert got.keys() == want.keys() and want
    for name in want:
        assert torch.equal(got[name], want[name]), name


@settings(max_examples=12, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    target=st.sampled_from(["all-linear", ["qkv_proj[q,v]", "down_proj"], ["o_proj"]]),
    dropout=st.sampled_from([0.0, 0.1]),
    batch=st.integers(1, 2),
    seq=st.integers(2, 9),
    padded=st.booleans(),
)
def test_recomputing_gives_bitwise_the_gradients_of_keeping(
    dtype, target, dropout, batch, seq, padded
):
    model = build(dtype, target, dropout)
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (batch, seq))
    mask = None
    if padded:  # left padding: attention's output is masked_fill-ed before o_proj
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, : seq // 2] = 0
    with kept_by_scopes() as slim:
        got = step_grads(model, ids, mask)
    with kept_by_scopes() as full, nothing_marked():
        want = step_grads(model, ids, mask)
    assert_bitwise(got, want)
    assert full["recipes"] == 0 and slim["recipes"] > 0
    assert slim["bytes"] < full["bytes"]


def test_what_is_no_longer_kept_is_exactly_the_marked_activations():
    """Per decoder layer: the two norms' outputs (each the input a LoRA qkv / gate_up keeps), the
    (b, s, H·d) attention output o_proj keeps and the SwiGLU output down_proj keeps."""
    model = build(torch.float32, "all-linear", 0.1)
    c = model.config
    batch, seq = 2, 7
    ids = torch.randint(3, c.vocab_size, (batch, seq))
    with kept_by_scopes() as slim:
        step_grads(model, ids)
    with kept_by_scopes() as full, nothing_marked():
        step_grads(model, ids)
    per_layer = 4 * batch * seq * (2 * c.hidden_size + c.num_attention_heads * c.head_dim)
    per_layer += 4 * batch * seq * c.intermediate_size
    assert full["bytes"] - slim["bytes"] == c.num_hidden_layers * per_layer
    assert slim["recipes"] == 4 * c.num_hidden_layers  # one saved slot each: the LoRA layer's x


def test_no_scope_when_not_training_or_when_other_hooks_are_in_use():
    model = build()
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (1, 6))
    want = step_grads(model, ids)
    with kept_by_scopes() as tally, torch.autograd.graph.save_on_cpu():
        got = step_grads(model, ids)  # save_on_cpu's hooks stay in charge of everything saved
    assert_bitwise(got, want)
    assert tally == {"bytes": 0, "recipes": 0}
    model.model.gradient_checkpointing = True  # checkpoint's own hooks: no scope inside a layer
    with kept_by_scopes() as tally:
        assert_bitwise(step_grads(model, ids), want)
    assert tally == {"bytes": 0, "recipes": 0}
    model.model.gradient_checkpointing = False
    with kept_by_scopes() as tally, torch.no_grad():
        model(ids)
    assert tally == {"bytes": 0, "recipes": 0}
    with recompute.scope() as on:
        assert on and recompute.active()
        # a scope's own hooks are in use: the inner one steps aside
        with recompute.scope() as inner:
            assert not inner
    with recompute.scope(enabled=False) as on:
        assert not on and not recompute.active()


def test_a_view_of_a_recomputable_tensor_comes_back_as_that_view():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    w = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    with recompute.scope():
        y = recompute.recomputable(torch.sin, x)
        z = (y[1:].reshape(-1, 5) @ w).pow(2).sum()  # mm keeps the (8, 5) view of y[1:]
    z.backward()
    want = 2 * (torch.sin(x)[1:].reshape(-1, 5)).T @ (torch.sin(x)[1:].reshape(-1, 5) @ w)
    torch.testing.assert_close(w.grad, want)


def test_an_input_modified_in_place_after_the_forward_is_an_error():
    x = torch.randn(4, 3)
    w = torch.randn(3, 2, requires_grad=True)
    with recompute.scope():
        y = recompute.recomputable(torch.sin, x)
        z = (y @ w).sum()
    x.add_(1.0)
    with pytest.raises(RuntimeError, match=r"argument 0 of sin.*modified in place"):
        z.backward()


def test_a_recomputable_tensor_modified_in_place_is_kept_as_it_is():
    x = torch.randn(4, 3)
    w = torch.randn(3, 2, requires_grad=True)
    with recompute.scope(), kept_by_scopes() as tally:
        y = recompute.recomputable(torch.sin, x)
        y.mul_(2.0)  # the recipe no longer gives y: whoever saves y keeps y itself
        z = (y @ w).sum()
    z.backward()
    assert tally["recipes"] == 0
    torch.testing.assert_close(w.grad, (2 * torch.sin(x)).sum(0)[:, None].expand(3, 2))


# --- checkpointing only the first N layers ---------------------------------------------------------


def layer_calls(model):
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_the_first_layers_only(reentrant):
    model = build(torch.float32, "all-linear", 0.1, num_hidden_layers=3)
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (2, 8))
    want = step_grads(model, ids)
    for layers, recomputed in ((None, [2, 2, 2]), (0, [1, 1, 1]), (2, [2, 2, 1]), (5, [2, 2, 2])):
        model.gradient_checkpointing_enable({"use_reentrant": reentrant}, layers=layers)
        calls = layer_calls(model)
        with kept_by_scopes() as tally:
            got = step_grads(model, ids)
        assert calls == recomputed, layers
        assert_bitwise(got, want)
        left_out = sum(c == 1 for c in recomputed)
        assert tally["recipes"] == 4 * left_out  # the layers not checkpointed recompute cheaply
        for layer in model.model.layers:
            layer._forward_pre_hooks.clear()
    model.gradient_checkpointing_disable()


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_bad_checkpoint_layers_are_named(bad):
    model = build()
    with pytest.raises(ValueError, match=rf"layers={bad!r}: expected how many decoder layers"):
        model.gradient_checkpointing_enable(layers=bad)
    assert not model.gradient_checkpointing


# --- the reentrant kind: nothing makes layer 0's input need a gradient -----------------------------


def counted_input_grads(monkeypatch):
    """Count the frozen base's input-gradient matmuls of the fused LoRA linears (one per linear
    whose input needs a gradient)."""
    import lora.functional as functional

    calls = [0]
    real = functional.base_linear_input_grad

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "base_linear_input_grad", counting)
    return calls


def embedding_outputs(model):
    """The embedding's outputs, as each forward leaves them (requires_grad may be changed later)."""
    out: list[torch.Tensor] = []
    model.model.embed_tokens.register_forward_hook(lambda m, a, y: out.append(y))
    return out


KINDS = {"plain": None, "non-reentrant": False, "reentrant": True}


def kind_grads(model, ids, kind, seed=5):
    if KINDS[kind] is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": KINDS[kind]})
    return step_grads(model, ids, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reentrant_checkpointing_gives_bitwise_the_gradients_of_the_other_kinds(dropout, dtype):
    model = build(dtype, "all-linear", dropout, num_hidden_layers=3)
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (2, 9))
    grads = {kind: kind_grads(model, ids, kind) for kind in KINDS}
    assert len(grads["plain"]) == 2 * 4 * 3  # A and B of every linear: all of them get one
    assert_bitwise(grads["reentrant"], grads["plain"])
    assert_bitwise(grads["non-reentrant"], grads["plain"])


def test_the_reentrant_kind_computes_no_input_gradient_for_layer_0(monkeypatch):
    model = build(torch.float32, "all-linear", 0.1)
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (2, 8))
    calls = counted_input_grads(monkeypatch)
    embedded = embedding_outputs(model)
    counts = {}
    for kind in KINDS:
        calls[0] = 0
        kind_grads(model, ids, kind)
        counts[kind] = calls[0]
    # every linear but layer 0's qkv_proj, whose input (the frozen embedding's, normed) needs none
    assert counts == dict.fromkeys(KINDS, 4 * 2 - 1)
    # the embedding's output stays a tensor that needs no gradient, and gets none
    assert len(embedded) == 3 and not any(e.requires_grad or e.grad is not None for e in embedded)


def test_a_frozen_first_layer_is_not_recomputed_by_the_reentrant_kind():
    model = build(torch.float32, "all-linear", 0.1, num_hidden_layers=3)
    for p in model.model.layers[0].parameters():  # train layers 1 and 2 only
        p.requires_grad_(False)
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (2, 8))
    want = kind_grads(model, ids, "plain")
    assert want and not any(".layers.0." in name for name in want)
    for kind in ("non-reentrant", "reentrant"):
        calls = layer_calls(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "None of the inputs have requires_grad=True"
            got = kind_grads(model, ids, kind)
        assert_bitwise(got, want)
        # nothing back-propagates into layer 0: the reentrant kind runs it once, as the other does
        # (which recomputes only what backward reaches)
        assert calls == [1, 2, 2], kind
        for layer in model.model.layers:
            layer._forward_pre_hooks.clear()


def test_the_reentrant_kind_with_adapters_disabled_still_runs_backward():
    # The adapters' parameters need grad but take no part: nothing in a layer's recomputation needs
    # one, which torch's reentrant checkpoint would refuse; the anchor stands in (as before, when
    # the embedding's output was made to need a gradient, backward ran and gave nothing).
    model = build(torch.float32, "all-linear", 0.1)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    ids = torch.randint(3, TINY_PHI3["vocab_size"], (2, 8))
    model.zero_grad(set_to_none=True)
    with lora.disabled(model):
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
