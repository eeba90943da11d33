"""bf16 and fp16 matmuls on a CPU that has no kernel for them: computed in fp32, rounded once.

torch's CPU build sends a bf16 (fp16) matmul to oneDNN only where the CPU has the instructions
for it (AVX512-BF16 or AMX; ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``). Elsewhere (AVX2
CPUs such as AMD's Zen 2 and Zen 3) it runs torch's reference loops. Measured on a 2-core AVX2
EPYC, (512, 3072) by (3072, 3072): ``x Wᵀ`` 497 ms (19.5 GFLOP/s), and ``g W`` (the layout of
every linear layer's input gradient) 21.6 s, against 117 ms for either in fp32. A bf16 training
step at Phi-3-mini's shapes then takes minutes.

The product of two bf16 (fp16) values is exact in fp32, and the native kernels accumulate in
fp32 too; so converting the operands, multiplying in fp32 and rounding the result once gives
what a native kernel gives, up to the order of the sums. Large operands are converted a slab at a
time (at most :data:`_SLAB_ELEMENTS` elements each), so the fp32 copies stay small.

``LORA_LOWP_MATMUL`` chooses: ``auto`` (the default: fp32 where the CPU has no native kernel for
the dtype), ``fp32`` (always, on CPU) or ``native`` (never: torch's kernels). CUDA and other devices
are never touched. :func:`mode` sets it for a block of code (tests use it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "upcasts",
    "linear",
    "mm",
    "addmm_",
    "frozen_linear",
    "sdpa_inputs",
    "mode",
    "autocast_dtype",
]

_ENV = "LORA_LOWP_MATMUL"
_MODES = ("auto", "fp32", "native")
_LOW = (torch.bfloat16, torch.float16)
_SLAB_ELEMENTS = 1 << 22  # 16 MiB of fp32 per converted slab of a large operand
_override: list[str] = []


def _mode() -> str:
    if _override:
        return _override[-1]
    value = os.environ.get(_ENV, "auto") or "auto"
    if value not in _MODES:
        raise ValueError(f"{_ENV}={value!r}: expected one of 'auto', 'fp32', 'native'")
    return value


@contextlib.contextmanager
def mode(value: str) -> Iterator[None]:
    """Within the block, low-precision CPU matmuls run ``value``: 'auto', 'fp32' or 'native'."""
    if value not in _MODES:
        raise ValueError(f"mode={value!r}: expected one of 'auto', 'fp32', 'native'")
    _override.append(value)
    try:
        yield
    finally:
        _override.pop()


_NATIVE: dict[torch.dtype, bool] = {}


@torch.compiler.assume_constant_result  # a property of the machine: torch.compile reads it once
def _native(dtype: torch.dtype) -> bool:
    if dtype not in _NATIVE:
        name = (
            "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        )
        try:
            _NATIVE[dtype] = bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):  # cannot tell: leave torch's kernel alone
            _NATIVE[dtype] = True
    return _NATIVE[dtype]


def upcasts(t: Tensor) -> bool:
    """Whether a matmul with ``t`` as an operand runs in fp32 here (see the module's docstring)."""
    if t.dtype not in _LOW or t.device.type != "cpu":
        return False
    chosen = _mode()
    return chosen == "fp32" or (chosen == "auto" and not _native(t.dtype))


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device, *tensors: Tensor | None) -> torch.dtype | None:
    """The dtype autocast would run a matmul of ``tensors`` in on ``device``, for an autograd
    function to cast them to itself (and run with autocast off); None where autocast is off there,
    or where it would leave one alone (float64: the caller's composite then takes autocast's own
    per-op rules). ``None`` entries (no bias) are skipped."""
    if not torch.is_autocast_enabled(device.type):
        return None
    if any(t is not None and t.dtype not in _AUTOCAST_CASTS for t in tensors):
        return None
    return torch.get_autocast_dtype(device.type)


def _slab(rows: int, cols: int) -> int:
    return max(1, min(rows, _SLAB_ELEMENTS // max(cols, 1)))


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in fp32 (2-D): b converted a slab of its rows at a time when it is large."""
    a32 = a.float()
    k = b.shape[0]
    step = _slab(k, b.shape[1])
    if step >= k:
        return a32 @ b.float()
    out = a32[:, :step] @ b[:step].float()
    for k0 in range(step, k, step):
        k1 = min(k, k0 + step)
        out.addmm_(a32[:, k0:k1], b[k0:k1].float())
    return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out) in x's dtype,
    in fp32 a slab of the weight's rows at a time where :func:`upcasts` (no autograd)."""
    if not upcasts(x):
        return F.linear(x, weight, bias)
    lead, in_f = x.shape[:-1], x.shape[-1]
    x32 = x.reshape(-1, in_f).float()
    out_f = weight.shape[0]
    step = _slab(out_f, weight.shape[1])
    b32 = None if bias is None else bias.float()
    if step >= out_f:
        return F.linear(x32, weight.float(), b32).to(x.dtype).view(*lead, out_f)
    out = x.new_empty(x32.shape[0], out_f)
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        out[:, r0:r1] = F.linear(x32, weight[r0:r1].float(), None if b32 is None else b32[r0:r1])
    return out.view(*lead, out_f)


def mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` for 2-D a (n, k) and b (k, m), in a's dtype (into ``out`` when given)."""
    if not upcasts(a):
        return a @ b if out is None else torch.mm(a, b, out=out)
    r = _mm32(a, b)
    return r.to(a.dtype) if out is None else out.copy_(r)


def addmm_(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c += a @ b`` in place, rounded once."""
    if not upcasts(c):
        return c.addmm_(a, b)
    return c.copy_(_mm32(a, b).add_(c))


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward's matmuls go through :func:`mm` too."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = mm(g, weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = mm(g.T, x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def frozen_linear(module: torch.nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a module that is exactly ``nn.Linear``, its matmuls (forward and backward)
    through this module's fp32 path where :func:`upcasts`; any other module is just called (a LoRA
    layer routes its own matmuls; an FSDP unit must run its hooks)."""
    if (
        type(module) is torch.nn.Linear
        and isinstance(module.weight, Tensor)  # not a 4-bit weight (lora.quant routes its own)
        and upcasts(x)
        and not torch.compiler.is_compiling()
    ):
        return _FrozenLinear.apply(x, module.weight, module.bias)
    return module(x)


def sdpa_inputs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q, k, v (and a float mask) converted to fp32 for attention where :func:`upcasts` (torch's
    CPU flash attention in bf16 on AVX2 measured 8x slower than in fp32: 929 against 118 ms
    forward + backward at (1, 32, 512, 96)); else unchanged. The caller casts the result back."""
    if not upcasts(q):
        return q, k, v, mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return q.float(), k.float(), v.float(), mask
