"""The chunked cross-entropy (``model.chunked_loss``, the default) against full logits.

Every case the trainer produces: a loss divided by a global label count (``num_items_in_batch``),
micro-batches with no counted label (a data-parallel rank's filler), gradient checkpointing
(both kinds), packed documents (restarting position_ids), padding, chat-style label spans,
gradient accumulation over micro-batches, and several chunk sizes (1 row, a few, one chunk).

The reference runs in float64 end to end: ``F.cross_entropy`` on the model's full (b, s, V)
logits, so a wrong gradient anywhere (hidden, every LoRA parameter) shows far above round-off.
"""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference import randomize_lora
from tiny import TINY_PHI3

import lora
from lora.models import phi3
from lora.models.phi3 import IGNORE_INDEX, Phi3Config, Phi3ForCausalLM, linear_cross_entropy

V = TINY_PHI3["vocab_size"]


@functools.cache
def _model(dtype: torch.dtype = torch.float64) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**TINY_PHI3))
    lora.inject(
        model, lora.LoRAConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear")
    )
    g = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, lora.LoRALayer):
            randomize_lora(layer, generator=g)
    assert not model.lm_head.weight.requires_grad and type(model.lm_head) is torch.nn.Linear
    return model.to(dtype).train()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_loss(model, batch: dict, num_items) -> torch.Tensor:
    """Σ CE over counted labels of the full logits (model dtype), / num_items or the count."""
    logits = model(
        batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"), use_cache=False
    ).logits
    targets = batch["labels"][:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, V),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / (count if num_items is None else num_items)


def _run(model, batches, *, chunked: bool, num_items, chunk: int = 256):
    """Forward + backward over micro-batches (accumulating); returns (losses, grads)."""
    model.zero_grad(set_to_none=True)
    model.chunked_loss = chunked
    losses = []
    with mock.patch.object(phi3, "loss_chunk_rows", lambda dtype: chunk):
        for batch in batches:
            if chunked:
                loss = model(**batch, use_cache=False, num_items_in_batch=num_items).loss
            else:
                loss = _reference_loss(model, batch, num_items)
            loss.backward()
            losses.append(loss.detach())
    model.chunked_loss = False
    return losses, _grads(model)


@st.composite
def micro_batches(draw):
    """1-3 micro-batches as the collator makes them: (b, s) ids, labels with chat-style spans
    (prompt -100, answer counted), right padding or packed documents."""
    s = draw(st.integers(2, 12))
    packed = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(1, 3))):
        b = draw(st.integers(1, 3))
        ids = torch.tensor(draw(st.lists(st.integers(3, V - 1), min_size=b * s, max_size=b * s)))
        ids = ids.view(b, s)
        labels = ids.clone()
        mask = torch.ones(b, s, dtype=torch.long)
        for row in range(b):
            # chat-style: -100 over the prompt, counted over the answer, -100 over padding
            start = draw(st.integers(0, s))
            end = draw(st.integers(start, s))
            labels[row, :start] = IGNORE_INDEX
            labels[row, end:] = IGNORE_INDEX
            if not packed and draw(st.booleans()):
                pad = draw(st.integers(0, s - 1))
                if pad:
                    mask[row, s - pad :] = 0
                    labels[row, s - pad :] = IGNORE_INDEX
        batch = {"input_ids": ids, "labels": labels}
        if packed:  # documents restart their positions; no mask: the model infers the documents
            cut = draw(st.integers(1, s))
            pos = torch.cat([torch.arange(cut), torch.arange(s - cut)])
            batch["position_ids"] = pos.expand(b, s).clone()
        else:
            batch["attention_mask"] = mask
        out.append(batch)
    return out


@given(
    batches=micro_batches(),
    chunk=st.sampled_from([1, 3, 20, 256]),  # 20: chunks padded to a multiple of 16 rows
    count=st.sampled_from(["own", "global", "fixed"]),
    checkpointing=st.sampled_from([None, False, True]),
)
def test_chunked_loss_and_every_gradient_equal_full_logits(batches, chunk, count, checkpointing):
    model = _model()
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
    try:
        counted = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        # own: each micro-batch's count; global: the trainer's count over the accumulated step
        # (and over ranks: here twice it, as if the other rank had as many); fixed: evaluation's 1
        num_items = {"own": None, "global": max(1, 2 * counted), "fixed": 1}[count]
        got_losses, got = _run(model, batches, chunked=True, num_items=num_items, chunk=chunk)
        want_losses, want = _run(model, batches, chunked=False, num_items=num_items)
    finally:
        model.gradient_checkpointing_disable()
    for a, b in zip(got_losses, want_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got.keys() == want.keys()
    assert any(n.endswith("lora_A") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_micro_batch_with_no_counted_label_gives_zero_loss_and_zero_gradients():
    model = _model()
    ids = torch.randint(3, V, (2, 7))
    labels = torch.full_like(ids, IGNORE_INDEX)
    model.zero_grad(set_to_none=True)
    model.chunked_loss = True
    try:
        loss = model(ids, labels=labels, num_items_in_batch=5).loss
        loss.backward()
    finally:
        model.chunked_loss = False
    assert loss.item() == 0.0
    grads = _grads(model)
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())
    model.zero_grad(set_to_none=True)


def test_the_kept_gradient_belongs_to_its_own_call_and_scales_with_the_upstream_gradient():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(V, 8, generator=g, dtype=torch.float64)
    h1 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t1, t2 = torch.randint(0, V, (5,), generator=g), torch.randint(0, V, (9,), generator=g)
    a = linear_cross_entropy(h1, W, t1, chunk=2)
    b = linear_cross_entropy(h2, W, t2, chunk=4)
    # backward in the other order, a retained graph run twice, a scale after the function
    (b * 3.0).backward()
    (a / 7.0).backward(retain_graph=True)
    (a / 7.0).backward()
    for h, t, scale in ((h1, t1, 2 / 7.0), (h2, t2, 3.0)):
        x = h.detach().clone().requires_grad_(True)
        (F.cross_entropy(x @ W.T, t, reduction="sum") * scale).backward()
        torch.testing.assert_close(h.grad, x.grad, rtol=1e-12, atol=1e-14)


def test_a_second_derivative_is_refused_not_silently_wrong():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(V, 8, generator=g, dtype=torch.float64)
    h = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss = linear_cross_entropy(h, W, torch.randint(0, V, (4,), generator=g))
    # e.g. a gradient penalty: the returned gradient would be a constant, its own gradient lost
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [1, 3, 7])
def test_the_softmax_s_row_blocks_do_not_change_the_result(monkeypatch, dtype, block_rows):
    """The softmax runs a few rows at a time (in fp32 for 16-bit, inside the CPU's cache); every
    op is a row's own, so the gradient is bitwise that of one block per chunk, and the loss
    differs only in the order its fp32 sum adds rows. 37 rows in chunks of 20: the first chunk
    is padded to 32 rows (zero rows the blocks never touch), the last one is 17 rows."""
    g = torch.Generator().manual_seed(6)
    W = (torch.randn(V, 8, generator=g) * 0.5).to(dtype)
    h = torch.randn(37, 8, generator=g).to(dtype)
    t = torch.randint(0, V, (37,), generator=g)
    out = {}
    for elements in (V * block_rows, 1 << 30):
        monkeypatch.setattr(phi3, "_SOFTMAX_BLOCK_ELEMENTS", elements)
        x = h.clone().requires_grad_(True)
        loss = linear_cross_entropy(x, W, t, chunk=20)
        loss.backward()
        out[elements] = (loss.detach(), x.grad)
    (blocked, blocked_grad), (whole, whole_grad) = out.values()
    assert torch.equal(blocked_grad, whole_grad)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=0)
    x = h.double().requires_grad_(True)
    want = F.cross_entropy(x @ W.double().T, t, reduction="sum")
    want.backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(blocked.double(), want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(blocked_grad.double(), x.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_match_the_plain_path_to_round_off(dtype):
    """fp32 and bf16 models: chunked against the plain path (fp32 logits), to each dtype's
    round-off (bf16: the gradient for hidden is rounded to bf16 in both)."""
    model = _model(dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    out = {}
    for chunked in (True, False):
        model.zero_grad(set_to_none=True)
        model.chunked_loss = chunked
        with mock.patch.object(phi3, "loss_chunk_rows", lambda dtype: 4):
            loss = model(ids, labels=labels, num_items_in_batch=40).loss
        loss.backward()
        out[chunked] = (loss.detach(), _grads(model))
    model.chunked_loss = False
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=tol, atol=tol)
    for name, want in out[False][1].items():
        got = out[True][1][name]
        scale = want.abs().max().clamp(min=1e-30)
        assert ((got - want).abs().max() / scale).item() < tol * 10, name


@pytest.mark.parametrize(
    "dtype,rows", [(torch.float32, 256), (torch.bfloat16, 512), (torch.float16, 512)]
)
def test_the_model_takes_the_chunk_its_dtype_runs_fastest_at(monkeypatch, dtype, rows):
    # 16-bit heads' GEMMs run faster at 512 rows than at 256 (docs/performance.md, "The loss's
    # chunk"); the logits of a chunk are fp32 either way
    assert phi3.loss_chunk_rows(dtype) == rows
    seen = []
    real = phi3.linear_cross_entropy
    monkeypatch.setattr(
        phi3, "linear_cross_entropy", lambda *a, chunk: seen.append(chunk) or real(*a, chunk=chunk)
    )
    model = _model(dtype)
    model.chunked_loss = True
    ids = torch.randint(3, V, (2, 7))
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.chunked_loss = False  # as the other tests leave the shared model
    assert seen == [rows]
