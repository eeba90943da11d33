"""The fast paths on an accelerator (CUDA) give what the CPU reference gives.

Every test here runs on each device of ``LORA_TEST_DEVICES`` (comma-separated, default "cuda") that
torch can use, and skips where there is none (CI). ``LORA_TEST_DEVICES=cpu`` runs the same checks on
the CPU, which is how they are kept honest between sessions that have a GPU. The references are
computed on the CPU (fp64 where it matters), so a device-specific branch that computes something
else fails here: the fused LoRA linear (its seeded dropout mask drawn on the device), the fused
MergedLinear blocks, the fused RMSNorm and SwiGLU, Phi-3 with LoRA (logits, loss, gradients,
chunked and plain loss), the layer and Phi-3 under autocast, greedy generation with the KV cache,
a 4-bit base, and the trainer's bf16 loop with checkpoint and resume.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch
from reference import randomize_lora
from tiny import TINY_PHI3, chat_records, tiny_training, write_checkpoint, write_jsonl

import lora
import lora.functional as LF
import lora.models.fused_ops as FO
from lora.layers.utils import lora_layers
from lora.models import Phi3Config, Phi3ForCausalLM


def _usable(device: str) -> bool:
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    backend = getattr(torch, kind, None)
    return bool(backend is not None and backend.is_available())


WANTED = [d.strip() for d in os.environ.get("LORA_TEST_DEVICES", "cuda").split(",") if d.strip()]
DEVICES = [
    pytest.param(d, marks=pytest.mark.skipif(not _usable(d), reason=f"no {d} device here"))
    for d in WANTED
]
pytestmark = pytest.mark.parametrize("device", DEVICES)


def _tolerance(dtype: torch.dtype) -> dict:
    return dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("merged", [False, True])
def test_fused_lora_linear_matches_the_float64_reference(device, dtype, p, merged):
    g = torch.Generator().manual_seed(7)
    tokens, fin, r, s = (3, 41), 96, 4, 2.0
    sizes = [64, 16, 16]  # q, k, v of a fused qkv; LoRA on q and v
    fout = sum(sizes) if merged else 80
    blocks = LF.merged_lora_blocks(sizes, [True, False, True], r) if merged else None
    W = torch.randn(fout, fin, generator=g, dtype=torch.float64) / fin**0.5
    A = torch.randn(r * (2 if merged else 1), fin, generator=g, dtype=torch.float64)
    B = torch.randn(64 + 16 if merged else fout, r, generator=g, dtype=torch.float64)
    x = torch.randn(*tokens, fin, generator=g, dtype=torch.float64)
    w_out = torch.randn(*tokens, fout, generator=g, dtype=torch.float64)

    on = {k: v.to(device, dtype) for k, v in dict(x=x, W=W).items()}
    on["x"].requires_grad_(True)
    # fp32 adapters on a bf16 base, as training keeps them
    A_d = A.to(device, torch.float32).requires_grad_(True)
    B_d = B.to(device, torch.float32).requires_grad_(True)
    y = LF.lora_linear_fused(on["x"], on["W"], None, A_d, B_d, s, p, seed=99, blocks=blocks)
    assert y.device.type == torch.device(device).type and y.dtype == dtype
    (y.double() * w_out.to(device)).sum().backward()

    # the reference: the device's own mask, the operands as the device saw them, in fp64 on the CPU
    keep = LF.dropout_keep_mask(x.shape, p, 99, device).cpu() if p > 0 else None
    xr = on["x"].detach().cpu().double().requires_grad_(True)
    Ar = A_d.detach().cpu().double().requires_grad_(True)
    Br = B_d.detach().cpu().double().requires_grad_(True)
    Wr = on["W"].cpu().double()
    Bfull = LF.merged_lora_B(Br, sizes, [True, False, True], r) if merged else Br
    h = xr if keep is None else xr * keep / (1 - LF.realised_dropout_p(p, device))
    want = xr @ Wr.T + s * (h @ Ar.T) @ Bfull.T
    (want * w_out).sum().backward()

    # errors relative to each tensor's largest entry: bf16 rounds every product to 8 bits
    tol = _tolerance(dtype)
    pairs = [("y", y.detach(), want.detach())]
    pairs += [
        (n, a.grad, b.grad) for n, a, b in (("x", on["x"], xr), ("A", A_d, Ar), ("B", B_d, Br))
    ]
    for name, got, ref in pairs:
        err = (got.cpu().double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= tol["rtol"] * scale + tol["atol"], (name, err, scale)


def test_the_dropout_mask_on_the_device_is_seeded_and_bernoulli(device):
    p, shape = 0.05, (512, 2048)
    a = LF.dropout_keep_mask(shape, p, 5, device)
    assert a.device.type == torch.device(device).type and a.dtype == torch.bool
    assert torch.equal(a, LF.dropout_keep_mask(shape, p, 5, device))  # backward draws it again
    assert not torch.equal(a, LF.dropout_keep_mask(shape, p, 6, device))
    n, dropped = a.numel(), int((~a).sum())
    q = LF.realised_dropout_p(p, device)
    assert abs(dropped - n * q) < 6 * math.sqrt(n * q * (1 - q)), (dropped, n * q)
    # rows and columns alike: no stripe of the mask is kept or dropped more than chance allows
    per_col = (~a).double().mean(0)
    assert per_col.std().item() < 3 * math.sqrt(q * (1 - q) / shape[0])


def _tiny(seed=0, **over) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**{**TINY_PHI3, **over}))
    lora.inject(
        model,
        lora.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    g = torch.Generator().manual_seed(seed + 1)
    for _, layer in lora_layers(model):
        randomize_lora(layer, g, scale=0.2)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_and_swiglu_are_the_composite_and_match_the_float64_reference(device, dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 37, 96, generator=g, dtype=torch.float64) * 3
    w = torch.rand(96, generator=g, dtype=torch.float64) + 0.5
    gate_up = torch.randn(3, 37, 160, generator=g, dtype=torch.float64)
    cases = (
        (FO.rms_norm, FO.rms_norm_reference, (x, w), (1e-5,)),
        (FO.swiglu, FO.swiglu_reference, (gate_up,), ()),
    )
    for fused, plain, args, extra in cases:
        ours = [a.to(device, dtype).requires_grad_(True) for a in args]
        twin = [a.detach().clone().requires_grad_(True) for a in ours]
        got, want = fused(*ours, *extra), plain(*twin, *extra)
        assert torch.equal(got, want), fused.__name__  # the same ops on the same device
        upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
        (got.double() * upstream.to(device)).sum().backward()
        # the reference: the operands as the device saw them, autograd in fp64 on the CPU
        ref = [a.detach().cpu().double().requires_grad_(True) for a in ours]
        out = (
            FO.rms_norm_reference(*ref, *extra, compute_dtype=torch.float64)
            if fused is FO.rms_norm
            else plain(*ref)
        )
        (out * upstream).sum().backward()
        for a, r in zip(ours, ref):
            assert a.grad.device.type == torch.device(device).type and a.grad.dtype == dtype
            # bf16: the upstream gradient itself arrives rounded to bf16 (2⁻⁹ relative)
            scale = r.grad.abs().max().item()
            tol = (
                dict(rtol=2e-2, atol=1e-2 * scale) if dtype == torch.bfloat16 else _tolerance(dtype)
            )
            torch.testing.assert_close(a.grad.cpu().double(), r.grad, **tol)


@pytest.mark.parametrize("chunked", [True, False])
def test_phi3_with_lora_gives_the_cpu_logits_loss_and_gradients(device, chunked):
    cpu = _tiny()
    dev = copy.deepcopy(cpu).to(device)
    cpu.chunked_loss = dev.chunked_loss = chunked
    ids = torch.randint(
        3, TINY_PHI3["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1)
    )
    labels = ids.clone()
    labels[:, :7] = -100
    with torch.no_grad():
        want = cpu(ids).logits
        got = dev(ids.to(device)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    out_c = cpu(ids, labels=labels)  # the loss path computes logits at labelled positions only
    out_d = dev(ids.to(device), labels=labels.to(device))
    torch.testing.assert_close(out_d.loss.cpu(), out_c.loss, rtol=1e-5, atol=1e-6)
    out_c.loss.backward()
    out_d.loss.backward()
    grads_c = {n: p.grad for n, p in cpu.named_parameters() if p.requires_grad}
    grads_d = {n: p.grad.cpu() for n, p in dev.named_parameters() if p.requires_grad}
    assert grads_c.keys() == grads_d.keys() and grads_c
    for n in grads_c:
        torch.testing.assert_close(grads_d[n], grads_c[n], rtol=1e-3, atol=1e-5, msg=n)


def test_under_autocast_on_the_device_a_layer_is_the_layer_on_16_bit_inputs(device):
    """The fast path under autocast: bitwise the layer with its base and input in autocast's dtype
    (outside autocast, the same mask from the same RNG state), gradients in fp32; an fp32 Phi-3
    under autocast trains (chunked loss) close to the fp32 loss on the CPU."""
    kind = torch.device(device).type
    dtypes = [torch.bfloat16] + ([torch.float16] if kind == "cuda" else [])
    for dtype in dtypes:
        torch.manual_seed(0)
        layer = lora.Linear(64, 48, r=4, lora_alpha=8, lora_dropout=0.1).to(device)
        randomize_lora(layer)
        layer.weight.requires_grad_(False)
        ref = copy.deepcopy(layer)
        ref.weight.data, ref.bias.data = ref.weight.data.to(dtype), ref.bias.data.to(dtype)
        x = torch.randn(2, 9, 64, device=device, requires_grad=True)
        xh = x.detach().to(dtype).requires_grad_(True)
        torch.manual_seed(3)
        with torch.autocast(kind, dtype=dtype):
            y = layer(x)
        torch.manual_seed(3)
        want = ref(xh)
        assert y.dtype == dtype and torch.equal(y, want), dtype
        y.float().sum().backward()
        want.float().sum().backward()
        assert torch.equal(x.grad, xh.grad.float()), dtype
        assert torch.equal(layer.lora_A.grad, ref.lora_A.grad), dtype
    cpu = _tiny()
    dev = copy.deepcopy(cpu).to(device)
    ids = torch.randint(
        3, TINY_PHI3["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        want_loss = cpu(ids, labels=ids).loss
    with torch.autocast(kind, dtype=torch.bfloat16):
        out = dev(ids.to(device), labels=ids.to(device))
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.detach().cpu(), want_loss, rtol=2e-2, atol=2e-2)
    grads = [p.grad for p in dev.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_phi3_on_the_device_stays_close_to_fp32_on_the_cpu(device):
    cpu = _tiny()
    dev = copy.deepcopy(cpu).to(device, torch.bfloat16)
    ids = torch.randint(
        3, TINY_PHI3["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        want = cpu(ids, labels=ids).loss
        got = dev(ids.to(device), labels=ids.to(device)).loss.float().cpu()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_greedy_generation_with_the_cache_gives_the_cpu_tokens(device):
    cpu = _tiny(seed=3).eval()
    dev = copy.deepcopy(cpu).to(device)
    ids = torch.randint(
        3, TINY_PHI3["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(4)
    )
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        want = cpu.generate(ids, max_new_tokens=8, attention_mask=mask, pad_token_id=0)
        got = dev.generate(
            ids.to(device), max_new_tokens=8, attention_mask=mask.to(device), pad_token_id=0
        )
    assert torch.equal(got.cpu(), want)


def test_a_4bit_base_with_lora_gives_the_cpu_loss_and_adapter_gradients(device):
    torch.manual_seed(5)
    base = Phi3ForCausalLM(Phi3Config(**TINY_PHI3))
    cpu, dev = copy.deepcopy(base), copy.deepcopy(base).to(device)
    for m in (cpu, dev):
        lora.quantize(m, "nf4")
        lora.inject(m, lora.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(6)
    for (_, lc), (_, ld) in zip(lora_layers(cpu), lora_layers(dev)):
        randomize_lora(lc, g, scale=0.2)
        ld.lora_A.data.copy_(lc.lora_A.data)
        ld.lora_B.data.copy_(lc.lora_B.data)
    ids = torch.randint(
        3, TINY_PHI3["vocab_size"], (2, 15), generator=torch.Generator().manual_seed(7)
    )
    lc, ld = cpu(ids, labels=ids).loss, dev(ids.to(device), labels=ids.to(device)).loss
    torch.testing.assert_close(ld.cpu(), lc, rtol=1e-4, atol=1e-5)
    lc.backward()
    ld.backward()
    for (n, pc), (_, pd) in zip(cpu.named_parameters(), dev.named_parameters()):
        if pc.requires_grad:
            torch.testing.assert_close(pd.grad.cpu(), pc.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_the_trainer_runs_bf16_on_the_device_and_resumes(device, tmp_path):
    from lora.finetune import finetune

    ckpt = write_checkpoint(tmp_path / "ckpt")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    peft = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": "all-linear"}
    training = tiny_training(tmp_path, bf16=True, device=device, max_steps=6, save_steps=3)
    full = finetune(ckpt, data, training, peft, progress=False, log=lambda s: None)
    losses = [r["loss"] for r in full.metrics if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    out = tmp_path / "out"
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["step"] == 3
    # as if killed after step 5: the newest checkpoint is step 3; resuming redoes steps 4-6
    shutil.rmtree(out / "checkpoint-6")
    torch.manual_seed(12345)  # a fresh process: the RNG somewhere else
    resumed = finetune(ckpt, data, training, peft, resume=True, progress=False, log=lambda s: None)
    tail = [r["loss"] for r in resumed.metrics if "loss" in r][-3:]
    assert tail == losses[-3:]  # bit-identical, dropout included
