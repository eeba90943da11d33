"""QLoRA: the NF4 code book, blockwise absmax with double quantisation, 4-bit packing, the frozen
4-bit linear and its gradients, LoRA over a 4-bit base, loading with quantisation, save/load/merge.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import chat_records, write_jsonl
from tiny import write_checkpoint as write_tiny_checkpoint
from torch import nn

import lora
import lora.quant.nf4 as nf4_module
from lora.models import Phi3ForCausalLM
from lora.quant import (
    FrozenWeightError,
    NF4Weight,
    QuantizationError,
    dequantize_nf4,
    is_quantized,
    nf4_code_book,
    pack_4bit,
    quantize_nf4,
    quantized_modules,
    unpack_4bit,
)

# The NF4 values as printed in QLoRA's appendix E (and bitsandbytes' table).
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def reference_code_book() -> list[float]:
    """NF4 from the paper's recipe with the standard library's normal quantile function."""
    ppf = statistics.NormalDist().inv_cdf
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = [ppf(delta + (0.5 - delta) * i / 8) for i in range(8)]
    neg = [-ppf(delta + (0.5 - delta) * i / 7) for i in range(7)]
    values = sorted(pos + neg + [0.0])
    return [v / max(values) for v in values]


def reference_quantize(w: torch.Tensor, block=64, group=256):
    """A slow plain-Python reference: nearest codes by argmin in float64, int8 scales as above."""
    cb = reference_code_book()
    flat = [float(v) for v in w.reshape(-1).tolist()]
    flat += [0.0] * (-len(flat) % block)
    codes, scales = [], []
    for b in range(0, len(flat), block):
        s = max(abs(v) for v in flat[b : b + block])
        scales.append(s)
        for v in flat[b : b + block]:
            x = v / s if s > 0 else 0.0
            codes.append(min(range(16), key=lambda j: (abs(x - cb[j]), j)))
    mean = sum(scales) / len(scales)
    centred = [s - mean for s in scales]
    deq_scales = []
    for g in range(0, len(centred), group):
        part = centred[g : g + group]
        a = max(abs(c) for c in part)
        f = 128.0 / a if a > 0 else 1.0
        deq_scales += [max(-128, min(127, round(c * f))) / f + mean for c in part]
    values = [cb[c] * deq_scales[i // block] for i, c in enumerate(codes)]
    return codes, torch.tensor(values[: w.numel()], dtype=torch.float64).view(w.shape)


# --- the code book and the packing ----------------------------------------------------------------
def test_code_book_is_the_normal_quantile_construction_of_the_paper():
    ours = nf4_code_book(torch.float64)
    assert ours.shape == (16,) and ours[0] == -1 and ours[-1] == 1 and ours[7] == 0
    assert torch.all(ours[1:] > ours[:-1])
    torch.testing.assert_close(
        ours, torch.tensor(reference_code_book(), dtype=torch.float64), rtol=0, atol=1e-12
    )
    # The published table was computed with float32 quantile levels: equal to float32 precision.
    torch.testing.assert_close(
        ours, torch.tensor(PUBLISHED_NF4, dtype=torch.float64), rtol=0, atol=3e-7
    )


def test_packing_puts_the_first_code_of_a_pair_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(unpack_4bit(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_4bit(torch.zeros(3, dtype=torch.uint8))


# --- quantise / dequantise ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 64), (96, 200), (3, 7)])
def test_round_trip_matches_an_independent_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    data = quantize_nf4(w)
    codes, expected = reference_quantize(w)
    assert unpack_4bit(data.packed).tolist() == codes
    torch.testing.assert_close(dequantize_nf4(data, torch.float64), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pass_elements", [None, 192], ids=["one-pass", "passes-of-3-blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_decode_is_the_fp32_decode_rounded_once(dtype, pass_elements, monkeypatch):
    # The decode writes code · scale, computed in fp32, straight into the 16-bit result: the same
    # bits as decoding in fp32 and casting (not a product of already-rounded 16-bit factors). On a
    # CPU it decodes in passes (for the cache); 76 blocks in passes of 3 leave a short last pass.
    if pass_elements is not None:
        monkeypatch.setattr(nf4_module, "_CPU_DECODE_ELEMENTS", pass_elements)
    torch.manual_seed(1)
    data = quantize_nf4(torch.randn(37, 130) * 0.05)
    fp32 = dequantize_nf4(data, torch.float32)
    assert torch.equal(dequantize_nf4(data, dtype), fp32.to(dtype))
    book, scales = nf4_code_book(torch.float32), data.block_scales()
    codes = unpack_4bit(data.packed)[: fp32.numel()].long()
    blocks = torch.arange(fp32.numel()) // data.block_size
    assert torch.equal(fp32.reshape(-1), book[codes] * scales[blocks])
    # a run of blocks from the middle (as a slab of rows decodes) is that part of the whole
    part = nf4_module.dequantize_blocks(data, 5, 42, dtype)
    assert torch.equal(part, fp32.reshape(-1)[5 * 64 : 42 * 64].to(dtype))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 90),
    scale=st.floats(1e-3, 10.0),
    seed=st.integers(0, 99),
)
def test_round_trip_error_is_within_half_a_code_gap_plus_the_scale_error(rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    data = quantize_nf4(w)
    back = dequantize_nf4(data)
    assert back.shape == w.shape
    flat = F.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    s = flat.abs().amax(1)
    centred = s - s.mean()
    a = (
        F.pad(centred, (0, -centred.numel() % 256))
        .view(-1, 256)
        .abs()
        .amax(1)
        .repeat_interleave(256)[: s.numel()]
    )
    half_gap = float((nf4_code_book()[1:] - nf4_code_book()[:-1]).max()) / 2
    bound = (half_gap * s + a / 128 + 1e-6 * scale).repeat_interleave(64)[: w.numel()].view(w.shape)
    assert torch.all((back - w).abs() <= bound)


def test_a_size_that_does_not_divide_by_the_block_is_padded_and_a_zero_block_decodes_to_zero():
    w = torch.zeros(5, 30)
    w[0, :3] = torch.tensor([1.0, -1.0, 0.5])
    data = quantize_nf4(w)
    assert data.packed.numel() == 3 * 32  # 150 elements -> 3 blocks of 64
    back = dequantize_nf4(data)
    assert back.shape == (5, 30) and torch.all(back[1:] == 0)
    # 0.5 is nearer 0.4407 than 0.5626; the block scale 1 comes back as 127/192 + 1/3 (the int8
    # code of the largest centred scale is clamped at 127)
    scale = 127 / 192 + 1 / 3
    torch.testing.assert_close(
        back[0, :3], torch.tensor([1.0, -1.0, 0.44070983]) * scale, atol=1e-6, rtol=0
    )


def test_storage_is_at_most_0_27_of_bf16():
    w = NF4Weight.from_float(torch.randn(256, 512, dtype=torch.bfloat16))
    ratio = w.nbytes() / (256 * 512 * 2)
    assert ratio <= 0.27
    bits = w.nbytes() * 8 / (256 * 512)
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3  # ≈ 4.127 bits


def test_bad_weights_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="floating"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_nf4(torch.ones(0, 4))
    with pytest.raises(ValueError, match="meta"):
        quantize_nf4(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match="block_size=63"):
        quantize_nf4(torch.ones(4, 4), block_size=63)
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight.from_float(torch.ones(4))


# --- the frozen 4-bit linear ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [None, 64])
def test_nf4_linear_and_its_input_gradient_equal_dense_autograd_on_the_dequantised_weight(
    chunk_rows,
):
    torch.manual_seed(0)
    w = NF4Weight.from_float(torch.randn(200, 96, dtype=torch.float64) * 0.1)
    if chunk_rows:
        w.chunk_elements = chunk_rows * 96  # several slabs of rows, the last one short
        assert w.rows_per_chunk() == 64
    dense = w.dequantize()
    bias = torch.randn(200, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 96, dtype=torch.float64, requires_grad=True)
    y = F.linear(x, w, bias)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, dense, b_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)
    assert torch.autograd.gradcheck(
        lambda inp: F.linear(inp, w), (torch.randn(2, 96, dtype=torch.float64, requires_grad=True),)
    )


def test_an_nf4_weight_answers_like_the_tensor_it_replaced_and_refuses_in_place_changes():
    w = NF4Weight.from_float(torch.randn(64, 128, dtype=torch.bfloat16))
    assert (
        w.shape == (64, 128)
        and w.dtype == torch.bfloat16
        and not w.requires_grad
        and w.device.type == "cpu"
    )
    assert torch.equal(
        torch.t(w), w.dequantize().t()
    )  # any other function: on the dequantised copy
    with pytest.raises(FrozenWeightError, match="frozen"):
        torch.relu_(w)
    with pytest.raises(FrozenWeightError, match="frozen"):
        torch.add(torch.ones(64, 128), 1.0, out=w)
    x = torch.zeros(64, 128, dtype=torch.bfloat16)
    torch.Tensor.add_(x, w)  # in place on a tensor, reading the weight: allowed
    assert torch.equal(x, w.dequantize())
    w.float()
    assert (
        w.dtype == torch.float32
        and w.packed.dtype == torch.uint8
        and w.scale_absmax.dtype == torch.float32
    )
    assert set(w.state_dict()) == {"packed", "scale_codes", "scale_absmax", "scale_mean"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.q_proj = nn.Linear(64, 128)
        self.v_proj = nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        return self.lm_head(self.v_proj(torch.relu(self.q_proj(self.embed(ids)))))


def _net_pair(order: str):
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    }
    if order == "quantize-first":
        lora.quantize(a, "nf4")
        lora.inject(a, cfg)
    else:
        lora.inject(a, cfg)
        lora.quantize(a, "nf4")
    # the dense reference: the dequantised weights as ordinary Parameters, the same adapters
    for name in ("q_proj", "v_proj"):
        getattr(b, name).weight.data = getattr(a, name).weight.dequantize()
    torch.manual_seed(1)
    lora.inject(b, cfg)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "lora_" in k}, strict=False)
    return a, b


def test_a_lora_layer_on_a_4bit_base_under_autocast_computes_what_it_does_on_bf16_inputs():
    # The 4-bit weight decodes into the input's dtype: under bf16 autocast the fast path casts x
    # to bf16 and the layer computes bitwise what it computes on a bf16 x outside autocast.
    torch.manual_seed(0)
    layer = lora.Linear(64, 48, r=4, lora_alpha=8, lora_dropout=0.1, bias=False)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.weight.requires_grad_(False)
    net = lora.quantize(nn.Sequential(layer), "nf4")
    assert is_quantized(net[0].weight)
    x = torch.randn(5, 64, requires_grad=True)
    xb = x.detach().bfloat16().requires_grad_(True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    grads = torch.autograd.grad(y.float().square().sum(), (x, net[0].lora_A))
    torch.manual_seed(3)
    want = net(xb)
    want_grads = torch.autograd.grad(want.float().square().sum(), (xb, net[0].lora_A))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    assert torch.equal(grads[0], want_grads[0].float()) and torch.equal(grads[1], want_grads[1])


@pytest.mark.parametrize("order", ["quantize-first", "inject-first"])
def test_lora_on_a_4bit_base_trains_exactly_as_on_its_dequantised_weights(order):
    a, b = _net_pair(order)
    assert is_quantized(a.q_proj.weight) and is_quantized(a.v_proj.weight)
    assert isinstance(a.lm_head.weight, nn.Parameter) and isinstance(a.embed.weight, nn.Parameter)
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {
        n for n, p in b.named_parameters() if p.requires_grad
    }
    ids = torch.randint(0, 10, (2, 7))
    ya, yb = a(ids), b(ids)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    dense = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, dense[n].grad, rtol=1e-4, atol=1e-6)


def test_quantize_refuses_a_merged_layer_and_an_unknown_method_and_leaves_the_model_alone():
    net = Net()
    lora.inject(net, {"r": 4, "target_modules": ["q_proj"], "init_lora_weights": False})
    with pytest.raises(ValueError, match="'int3'.*expected one of 'nf4'"):
        lora.quantize(net, "int3")
    net.q_proj.merge()
    with pytest.raises(QuantizationError, match="q_proj: merged"):
        lora.quantize(net, "nf4")
    assert not quantized_modules(net)


def test_merging_an_adapter_into_a_4bit_weight_is_refused():
    net = Net()
    lora.quantize(net, "nf4")
    lora.inject(net, {"r": 4, "target_modules": ["q_proj"], "merge_weights": True})
    with pytest.raises(RuntimeError, match="lose the adapter's precision"):
        net.eval()


def test_merge_and_unload_dequantises_to_16_bits_then_merges():
    a, _ = _net_pair("quantize-first")
    ids = torch.randint(0, 10, (2, 7))
    with torch.no_grad():
        before = a(ids)
    merged = lora.merge_and_unload(a)
    assert not quantized_modules(merged)
    assert type(merged.q_proj) is nn.Linear and isinstance(merged.q_proj.weight, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), before, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_4bit_model_moved_to_cuda_computes_what_it_did_on_cpu():
    a, _ = _net_pair("quantize-first")
    ids = torch.randint(0, 10, (2, 7))
    with torch.no_grad():
        cpu = a(ids)
        a.to("cuda")
        assert a.q_proj.weight.packed.is_cuda
        torch.testing.assert_close(a(ids.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-5)
    w = torch.randn(128, 64)
    on_cuda, on_cpu = NF4Weight.from_float(w.cuda()), NF4Weight.from_float(w)
    assert torch.equal(on_cuda.packed.cpu(), on_cpu.packed)
    torch.testing.assert_close(
        on_cuda.dequantize().cpu(), on_cpu.dequantize(), rtol=1e-6, atol=1e-7
    )


def test_trainable_parameters_count_the_4bit_base_weights_in_the_total():
    net = Net()
    before = lora.trainable_parameters(net)[1]
    lora.quantize(net, "nf4")
    assert lora.trainable_parameters(net)[1] == before


def test_skip_modules_and_a_tied_head_stay_16_bit():
    net = Net()
    net.lm_head.weight = net.embed.weight  # tied
    lora.quantize(net, "nf4", skip_modules=["v_proj"])
    assert set(quantized_modules(net)) == {"q_proj"}


# --- Phi-3: quantise as the checkpoint is read ----------------------------------------------------
TINY64 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), **TINY64)


def test_from_pretrained_quantises_as_it_reads_the_same_as_quantising_after(ckpt):
    q = Phi3ForCausalLM.from_pretrained(ckpt, quantize="nf4")
    later = lora.quantize(Phi3ForCausalLM.from_pretrained(ckpt), "nf4")
    names = set(quantized_modules(q))
    assert (
        names == set(quantized_modules(later)) and len(names) == 2 * 4
    )  # qkv, o, gate_up, down per layer
    assert isinstance(q.lm_head.weight, nn.Parameter) and isinstance(
        q.model.embed_tokens.weight, nn.Parameter
    )
    for n, w in quantized_modules(q).items():
        assert torch.equal(w.packed, quantized_modules(later)[n].packed)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, later(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="quantize='int8'"):
        Phi3ForCausalLM.from_pretrained(ckpt, quantize="int8")
    with pytest.raises(ValueError, match="dequantize"):
        q.save_pretrained(ckpt.parent / "never")


def test_loading_with_quantisation_keeps_no_16_bit_copy_of_a_quantised_weight(ckpt):
    import gc
    import weakref

    from lora.models import Phi3Config
    from lora.models.checkpoint import load_into
    from lora.quant import quantizing_assign

    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config.from_json_file(ckpt / "config.json"))
    hook = quantizing_assign(model, "nf4")
    read = []

    def spy(root, name, tensor):
        placed = hook(root, name, tensor)
        if placed:
            read.append(weakref.ref(tensor))
        return placed

    load_into(model, ckpt, assign=spy)
    gc.collect()
    assert len(read) == 8 and all(r() is None for r in read)  # each 16-bit weight freed after use
    assert len(quantized_modules(model)) == 8


def test_an_adapter_trained_on_a_4bit_base_saves_and_loads_in_peft_format(ckpt, tmp_path):
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(ckpt, quantize="nf4")
    lora.inject(
        model, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    )
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    lora.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    from lora.finetune.generate import load_chat_model  # lora-generate --adapter ... --quantize nf4

    fresh, _ = load_chat_model(str(ckpt), str(tmp_path / "adapter"), quantize="nf4")
    assert len(quantized_modules(fresh)) == 8
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


# --- activation checkpointing: each 4-bit weight decoded twice a step, not three times -------------
def _checkpointed_nf4_step(ckpt, targets, reentrant, dtype, monkeypatch, keep=True):
    """One checkpointed step of the tiny Phi-3 on a 4-bit base, dropout on. Returns the loss, the
    adapter gradients, whole decodes per weight, and the weights decoded whole (weakrefs) before
    and during backward."""
    import gc
    import weakref

    import lora.quant.weight as qweight
    from lora.models import phi3

    if not keep:  # today's checkpointing: the recomputation keeps nothing
        monkeypatch.setattr(phi3, "keep_decoded_on_recompute", lambda fn: fn)
    torch.manual_seed(0)
    model = Phi3ForCausalLM.from_pretrained(ckpt, dtype=dtype, quantize="nf4")
    weights = quantized_modules(model)
    for w in weights.values():  # several slabs of 64 rows (gate_up: 4, qkv_proj: 2)
        w.chunk_elements = 64 * w.in_features
    cfg = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": targets}
    lora.inject(model, {**cfg, "init_lora_weights": False})
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    model.train()
    name_of = {id(w.packed): n for n, w in weights.items()}
    decoded_blocks = dict.fromkeys(weights, 0)
    real_blocks, real_dequantize = qweight.dequantize_blocks, NF4Weight.dequantize
    whole = []

    def counting_blocks(data, b0, b1, *args, **kwargs):
        decoded_blocks[name_of[id(data.packed)]] += b1 - b0
        return real_blocks(data, b0, b1, *args, **kwargs)

    def recording_dequantize(self, dtype=None):
        out = real_dequantize(self, dtype)
        whole.append(weakref.ref(out))
        return out

    monkeypatch.setattr(qweight, "dequantize_blocks", counting_blocks)
    monkeypatch.setattr(NF4Weight, "dequantize", recording_dequantize)
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    whole_in_forward = len(whole)
    loss.backward()
    del loss
    gc.collect()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    decodes = {n: decoded_blocks[n] / w.data_parts().n_blocks for n, w in weights.items()}
    return grads, decodes, whole_in_forward, whole


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(
    "targets",
    ["all-linear", ["qkv_proj"]],
    ids=["adapters-everywhere", "frozen-4bit-linears-without-adapters"],
)
def test_a_checkpointed_step_decodes_each_4bit_weight_twice_and_keeps_none_afterwards(
    ckpt, targets, reentrant, monkeypatch
):
    grads, decodes, whole_in_forward, whole = _checkpointed_nf4_step(
        ckpt, targets, reentrant, torch.float32, monkeypatch
    )
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    # forward, recomputation; the input gradient reuses what the recomputation decoded
    assert decodes == dict.fromkeys(decodes, 2.0)
    # the forward pass decodes slab by slab and keeps nothing; the recomputation of each layer
    # keeps its weights whose input needs a gradient (all but layer 0's qkv_proj, whose input is
    # the frozen embedding's: the reentrant kind too, which no longer makes it need one), and all
    # are freed by the end of backward
    assert whole_in_forward == 0
    assert len(whole) == len(decodes) - 1
    assert all(ref() is None for ref in whole)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_keeping_the_recomputed_decode_leaves_every_gradient_bitwise_the_same(
    ckpt, dtype, reentrant, monkeypatch
):
    got = {}
    for keep in (True, False):
        with monkeypatch.context() as m:
            grads, decodes, _, _ = _checkpointed_nf4_step(
                ckpt, "all-linear", reentrant, dtype, m, keep=keep
            )
        got[keep] = grads
        assert max(decodes.values()) == (2.0 if keep else 3.0)  # 3 without: the test can fail
    assert got[True].keys() == got[False].keys() and len(got[True]) == 2 * 4 * 2
    for name, g in got[True].items():
        assert torch.equal(g, got[False][name]), name


def test_finetune_with_quantize_nf4_trains_and_merges_into_a_normal_checkpoint(ckpt, tmp_path):
    from lora.finetune import finetune

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    training = {
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 10,
        "max_seq_length": 64,
        "seed": 0,
        "eval_fraction": 0.2,
        "quantize": "nf4",
    }
    peft = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    result = finetune(ckpt, data, training, peft, merge=True, progress=False, log=lambda s: None)
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    merged = Phi3ForCausalLM.from_pretrained(result.merged_dir)
    assert not quantized_modules(merged)
    assert merged.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32


def test_the_quantize_key_and_flag_are_checked():
    from lora.finetune import TrainingConfig
    from lora.finetune.__main__ import build_parser

    assert TrainingConfig.from_dict({"quantize": "nf4"}).quantize == "nf4"
    with pytest.raises(ValueError, match="training_config quantize='fp4'"):
        TrainingConfig.from_dict({"quantize": "fp4"})
    assert build_parser().parse_args(["--quantize", "nf4"]).quantize == "nf4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantize", "int4"])


# --- optional peers -------------------------------------------------------------------------------
def test_codes_scales_and_values_agree_with_torchaos_nf4tensor():
    nf4 = pytest.importorskip(
        "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",
        reason="torchao (test extra) not installed",
    )
    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02  # 512 blocks: torchao needs whole groups of 256 scales
    theirs = nf4.NF4Tensor.from_tensor(w, 64, 256)
    ours = quantize_nf4(w)
    # torchao's table is NF4 rounded to 4 decimals: codes may differ only for values within that
    # rounding (1e-4) of a midpoint between two codes; everywhere else codes and values agree.
    codes, their_codes = unpack_4bit(ours.packed), unpack_4bit(theirs.quantized_data.reshape(-1))
    normalised = (w.reshape(-1, 64) / w.reshape(-1, 64).abs().amax(1, keepdim=True)).reshape(-1)
    cb = nf4_code_book()
    near_midpoint = ((normalised.unsqueeze(1) - (cb[1:] + cb[:-1]) / 2).abs() < 1e-4).any(1)
    assert torch.all((codes == their_codes) | near_midpoint)
    assert (codes == their_codes).float().mean() > 0.999
    assert torch.equal(ours.scale_codes, theirs.quantized_scalers.reshape(-1))
    same = (codes == their_codes).view(w.shape)
    torch.testing.assert_close(
        dequantize_nf4(ours)[same],
        theirs.get_original_weight()[same],
        rtol=0,
        atol=1e-4 * float(w.abs().max()),
    )


def test_codes_and_scales_equal_bitsandbytes():
    bnbf = pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes (test extra) not installed"
    )
    torch.manual_seed(0)
    w = torch.randn(64, 200) * 0.02  # 12800 elements: 200 blocks
    try:
        packed, state = bnbf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=False
        )
        back = bnbf.dequantize_4bit(packed, state)
    except (RuntimeError, NotImplementedError) as e:  # no CPU backend in this build
        pytest.skip(f"bitsandbytes cannot quantise on CPU here: {e}")
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    torch.testing.assert_close(ours.scale_absmax, state.absmax, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_nf4(ours), back, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_demo_on_a_4bit_base_reaches_a_held_out_loss_within_5_percent_of_the_bf16_base(
    tmp_path,
):
    from lora.demo.run import run_demo

    losses = {}
    for base in ("bf16", "nf4"):
        # The demo checkpoint is stored in bf16: "bf16" is those weights as stored, "nf4" their
        # 4-bit quantisation; both compute in fp32 (bf16 matmuls are slow on CPUs without AMX).
        training = {
            "bf16": False,
            "output_dir": str(tmp_path / base),
            "quantize": "nf4" if base == "nf4" else None,
        }
        losses[base] = run_demo(training, progress=False, log=lambda s: None).eval_loss
    assert losses["nf4"] <= 1.05 * losses["bf16"], losses


# --- the layout FSDP shards ------------------------------------------------------------------------
@settings(max_examples=20)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 70), cut=st.floats(0, 1), seed=st.integers(0, 99)
)
def test_blocks_quantised_apart_are_bitwise_those_of_the_whole_tensor(rows, cols, cut, seed):
    from lora.quant import quantize_blocks, quantize_scales

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    whole = quantize_nf4(w, scale_block_size=4)  # small groups: a split runs through some
    flat, bs = w.reshape(-1), 64
    n_blocks = -(-flat.numel() // bs)
    b = int(cut * n_blocks)  # any block boundary, also inside a row
    parts = [quantize_blocks(flat[: b * bs]), quantize_blocks(flat[b * bs :])]
    packed = torch.cat([p for p, _ in parts])
    scales = torch.cat([s for _, s in parts])
    codes, absmax, mean = quantize_scales(scales, 4)
    assert torch.equal(packed, whole.packed) and torch.equal(codes, whole.scale_codes)
    assert torch.equal(absmax, whole.scale_absmax) and torch.equal(mean, whole.scale_mean)


def test_the_shardable_layout_computes_what_the_plain_one_does():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * 0.02
    plain, shardable = NF4Weight.from_float(w), NF4Weight.from_float(w).make_shardable()
    assert {n for n, _ in shardable.named_parameters()} == {"packed", "scale_codes"}
    assert shardable.packed.shape == (48 * 80 // 64, 32) and not shardable.packed.requires_grad
    assert shardable.nbytes() == plain.nbytes()
    x = torch.randn(3, 80, requires_grad=True)
    assert torch.equal(F.linear(x, shardable), F.linear(x, plain))
    assert torch.equal(shardable.dequantize(), plain.dequantize())
    shardable.to(torch.float64)  # a float cast: the compute dtype; the codes keep theirs
    assert shardable.dtype == torch.float64 and shardable.packed.dtype == torch.uint8
    layer = nn.Linear(80, 48, bias=False)
    lora.quantize(layer)
    layer.weight.make_shardable()
    assert lora.trainable_parameters(layer) == (0, 48 * 80)  # counted once, by its size
    with pytest.raises(ValueError, match="double_quant=False"):
        NF4Weight.from_float(w, double_quant=False).make_shardable()


def test_an_empty_shardable_weight_is_made_on_meta_and_materialised_by_to_empty():
    from lora.quant import quantize_shardable

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    made = quantize_shardable(model)
    assert set(made) == {"0", "2"} and made["0"].device.type == "meta"
    model.to_empty(device="cpu")
    w = model[0].weight
    assert w.device.type == "cpu" and w.packed.shape == (32, 32) and w.scale_mean.shape == ()
    assert w.packed.dtype == torch.uint8 and w.scale_codes.dtype == torch.int8
