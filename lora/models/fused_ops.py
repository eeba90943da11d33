"""Phi-3's RMSNorm, SwiGLU and rotary embedding as autograd functions that keep less for backward
(the rotary one: that make fewer passes).

Autograd through the plain ops keeps what each op needs: RMSNorm's ``x.float()``, ``pow``,
``rsqrt`` and ``mul`` keep an fp32 copy of the (tokens, hidden) input (and, with a trainable
weight, the normalised activation); SwiGLU's ``up * silu(gate)`` keeps gate, up and a new
(tokens, I) ``silu(gate)``. The functions here compute the same forward, op for op (the outputs
are bitwise equal to the plain composites, :func:`rms_norm_reference` and
:func:`swiglu_reference`), but keep only their input (in its own dtype) and, for RMSNorm, the
(tokens, 1) reciprocal RMS. Backward runs chunk of rows by chunk, so that its temporaries stay
small: RMSNorm's is derived by hand and computed in fp32 (fp64 for fp64); SwiGLU's draws
silu(gate) again and runs autograd's own backward ops, so its gradient is bitwise the
composite's.

The rotary embedding (:func:`rotary`) keeps nothing the composite did not (cos and sin, shared by
every layer) but writes its output in four whole-row passes over the heads where the composite's
``x·cos + rotate_half(x)·sin`` and its concatenations make six, and backward likewise; it too is
bitwise the composite (:func:`rotary_reference`), forward and backward.

Pure torch ops, device agnostic. Under ``torch.compile`` they call the plain composite (as
:func:`lora.functional.lora_linear_fused` does), so that inductor fuses it. Under autocast they
run as they are: the composites' ops are none that autocast casts (``pow`` and ``rsqrt``, on its
fp32 list on CUDA, get fp32 already; an RMSNorm asked to normalise in 16 bits takes the composite
there), so autocast computes the composites as it would without it, and the functions are
bitwise them there too. None of them supports a second derivative
(``create_graph=True`` through them raises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "rms_norm",
    "rms_norm_reference",
    "rotary",
    "rotary_reference",
    "swiglu",
    "swiglu_reference",
]

# Backward runs over chunks of rows of about this many elements: each temporary is 2 MiB in fp32
# (not a (tokens, hidden) fp32 copy), small enough to stay in cache across the chunk's passes
# (at Phi-3-mini's shapes, 2^17-2^20 measured about equally fast; 2^16 and below slower, from
# the per-op overhead; RMSNorm's backward unchunked ~1.8x slower).
CHUNK_ELEMENTS = 1 << 19


def _composite_path() -> bool:
    # Compiled: let inductor fuse the plain ops. (Under autocast the functions run as they are: no
    # op of the composites is one autocast casts, or it gets fp32 already, so autocast leaves them
    # as they are, and the functions are bitwise them there too.)
    return torch.compiler.is_compiling()


def _chunk_rows(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower floats, fp64 for fp64: what a hand-derived backward computes in."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


def rms_norm_reference(
    x: Tensor, weight: Tensor, eps: float, compute_dtype: torch.dtype = torch.float32
) -> Tensor:
    """``weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)``, normalised in ``compute_dtype``: the
    plain composite (what transformers' Phi3RMSNorm computes), autograd through each op."""
    dtype = x.dtype
    h = x.to(compute_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _check_norm_args(x: Tensor, weight: Tensor, compute_dtype: torch.dtype) -> None:
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(
            f"rms_norm: x has dtype {x.dtype} and shape {tuple(x.shape)}; "
            "expected a floating-point tensor (..., hidden)"
        )
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}; expected (hidden,) = ({x.shape[-1]},), "
            "x's last dim"
        )
    if not compute_dtype.is_floating_point:
        raise ValueError(f"rms_norm: compute_dtype={compute_dtype}; expected a floating dtype")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor, eps: float, compute_dtype: torch.dtype
    ) -> Tensor:
        # The composite's ops in its order (bitwise equal output: each is a row's own), on CPU a
        # chunk of rows at a time so that the compute_dtype copy stays in the cache (whole bf16
        # steps at Phi-3-mini's shapes: -0.5%; elsewhere one chunk: no extra kernel launches),
        # with in-place ops only on that fresh copy.
        dtype = x.dtype
        hidden = x.shape[-1]
        xs = x.reshape(-1, hidden)
        rows = xs.shape[0]
        out = torch.empty(x.shape, dtype=torch.result_type(weight, xs[:0]), device=x.device)
        outs = out.view(-1, hidden)
        rstd = torch.empty((*x.shape[:-1], 1), dtype=compute_dtype, device=x.device)
        rstds = rstd.view(-1, 1)
        step = max(1, min(_chunk_rows(hidden), rows) if x.device.type == "cpu" else rows)
        for start in range(0, rows, step):
            r = slice(start, min(start + step, rows))
            h = xs[r].to(compute_dtype)
            rs = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            rstds[r] = rs
            h = h.mul_(rs) if dtype != compute_dtype else h * rs
            torch.mul(weight, h.to(dtype), out=outs[r])
        ctx.save_for_backward(x, weight, rstd)
        ctx.compute_dtype = compute_dtype  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        # The forward normalised in compute_dtype; the backward runs in at least fp32.
        cd = _compute_dtype(ctx.compute_dtype)  # type: ignore[attr-defined]
        hidden = x.shape[-1]
        xs = x.reshape(-1, hidden)
        gs = grad_out.reshape(-1, hidden)
        rs = rstd.reshape(-1, 1).to(cd)
        rows = xs.shape[0]
        w = weight.to(cd)
        grad_x = torch.empty_like(xs, memory_format=torch.contiguous_format) if need_x else None
        grad_w = torch.zeros(hidden, dtype=cd, device=x.device) if need_w else None
        step = min(_chunk_rows(hidden), max(rows, 1))
        n_buf = torch.empty(step, hidden, dtype=cd, device=x.device)
        g_buf = torch.empty_like(n_buf)
        t_buf = torch.empty_like(n_buf)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            k, r = stop - start, rs[start:stop]
            n = n_buf[:k].copy_(xs[start:stop]).mul_(r)  # the normalised input, n = x · rstd
            g = g_buf[:k].copy_(gs[start:stop])  # ∂L/∂out
            if grad_w is not None:
                # out = weight · n.to(dtype): ∂L/∂weight = Σ_rows ∂L/∂out · n.to(dtype)
                t = t_buf[:k].copy_(n.to(x.dtype)) if x.dtype != cd else t_buf[:k].copy_(n)
                grad_w.add_(t.mul_(g).sum(0))
            if grad_x is not None:
                g.mul_(w)  # ∂L/∂n
                # ∂L/∂x = rstd · (∂L/∂n − n · mean(∂L/∂n · n))
                dot = torch.mul(g, n, out=t_buf[:k]).mean(-1, keepdim=True)
                grad_x[start:stop] = g.sub_(n.mul_(dot)).mul_(r)
        return (
            grad_x.view(x.shape) if grad_x is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            None,
            None,
        )


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, compute_dtype: torch.dtype = torch.float32
) -> Tensor:
    """RMSNorm as Phi-3 computes it: ``weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)``.

    x (..., hidden) of any float dtype; weight (hidden,); normalised in ``compute_dtype`` (fp32,
    as transformers, for every input dtype; fp64 gives an fp64 reference, e.g. for gradcheck),
    cast back to x's dtype before the weight. Returns the dtype of ``weight * x``. The output is
    bitwise equal to :func:`rms_norm_reference`.

    Saved for backward: x itself, the weight and the (..., 1) reciprocal RMS in compute_dtype
    (the composite keeps an fp32 copy of x, and the normalised activation when the weight is
    trainable). Backward computes ∂x (and ∂weight only when the weight requires grad) in fp32,
    by hand.

    Raises:
        ValueError: x not floating point, a weight that is not (hidden,), a compute_dtype that is
            not floating point.
    """
    _check_norm_args(x, weight, compute_dtype)
    # (A 16-bit compute_dtype under autocast: CUDA's autocast runs the composite's pow and rsqrt
    # in fp32, which the function would not.)
    sixteen = compute_dtype in (torch.float16, torch.bfloat16)
    if _composite_path() or (sixteen and torch.is_autocast_enabled(x.device.type)):
        return rms_norm_reference(x, weight, eps, compute_dtype)
    return _RMSNorm.apply(x, weight, float(eps), compute_dtype)


# ----------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``up * silu(gate)`` with ``gate, up = gate_up.chunk(2, -1)``: the plain composite."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        out = F.silu(gate).mul_(up)  # = up * silu(gate), bitwise, without a second (..., I) tensor
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        (gate_up,) = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return (None,)
        width = gate_up.shape[-1] // 2
        xs = gate_up.reshape(-1, 2 * width)
        gs = grad_out.reshape(-1, width)
        rows = xs.shape[0]
        grad = torch.empty_like(xs, memory_format=torch.contiguous_format)
        step = _chunk_rows(width)
        silu_out = torch.ops.aten.silu.out
        silu_backward = torch.ops.aten.silu_backward.grad_input
        for start in range(0, rows, step):
            r = slice(start, min(start + step, rows))
            gate, up, g = xs[r, :width], xs[r, width:], gs[r]
            d_gate, d_up = grad[r, :width], grad[r, width:]
            # The composite's backward op for op (so the gradient is bitwise autograd's), written
            # straight into the two halves of the gradient, with silu(gate) drawn again.
            silu_out(gate, out=d_up).mul_(g)  # ∂L/∂up = ∂L/∂out · silu(gate)
            torch.mul(g, up, out=d_gate)  # ∂L/∂silu(gate) = ∂L/∂out · up
            silu_backward(d_gate, gate, grad_input=d_gate)  # · silu'(gate)
        return (grad.view(gate_up.shape),)


def swiglu(gate_up: Tensor) -> Tensor:
    """Phi-3's gated activation: ``up * silu(gate)`` with ``gate, up = gate_up.chunk(2, -1)``.

    gate_up (..., 2·I), any float dtype -> (..., I); bitwise equal to :func:`swiglu_reference`.
    Saved for backward: gate_up only (the composite keeps gate, up and a new (..., I)
    ``silu(gate)``). Backward draws silu(gate) again and runs the composite's backward ops (in
    gate_up's dtype, as autograd does) chunk by chunk into the two halves of the gradient: it is
    bitwise the composite's gradient, with no (..., I) temporaries.

    Raises:
        ValueError: gate_up not floating point, or its last dim not even.
    """
    if not gate_up.is_floating_point() or gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"swiglu: gate_up has dtype {gate_up.dtype} and shape {tuple(gate_up.shape)}; "
            "expected a floating-point tensor (..., 2 * intermediate_size), [gate | up]"
        )
    if _composite_path():
        return swiglu_reference(gate_up)
    return _SwiGLU.apply(gate_up)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------


def rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first r channels of each head, the plain composite (transformers' layout):
    ``cat(x_r·cos + cat(-x2, x1)·sin, x_pass)`` with ``x1, x2`` the halves of ``x_r = x[..., :r]``.

    x (b, heads, s, d); cos, sin (b|1, s, r) -> (b, heads, s, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    return torch.cat((x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)


def _swap_halves(t: Tensor) -> Tensor:
    """``cat(t2, t1)`` for the halves ``t1, t2`` of the last dim: a contiguous copy."""
    h = t.shape[-1] // 2
    return torch.cat((t[..., h:], t[..., :h]), dim=-1)


class _Rotary(torch.autograd.Function):
    # The composite's arithmetic op for op, into one output, on whole rows: x·cos, plus the
    # swapped halves (x2, x1) times (-s1, s2) (a product with -s is the negated product, bitwise),
    # added; in backward g·cos plus the swapped halves of g·(-s1, s2): (g·sin)'s second half into
    # the first and minus its first half from the second (a - b = a + (-b), and a sum does not
    # depend on its order), which is what autograd adds up through the composite's cat, neg and
    # chunk. Whole-row ops instead of half-row ones: the rotary of a (2, 32, 512, 96) bf16 q out of
    # the CPU's cache 2.9 ms against 6.0 (the AMX Xeon, 2026-12-04).
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = cos.shape[-1]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as cat's is
        rot = out[..., :r]
        torch.mul(x[..., :r], cos, out=rot)
        rot.add_(_swap_halves(x[..., :r]).mul_(_signed_sin(sin)))
        if r < x.shape[-1]:
            out[..., r:] = x[..., r:]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor):
        cos, sin = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None
        r = cos.shape[-1]
        g = grad_out[..., :r]
        grad = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
        torch.mul(g, cos, out=grad[..., :r])
        grad[..., :r].add_(_swap_halves(g * _signed_sin(sin)))
        if r < grad_out.shape[-1]:
            grad[..., r:] = grad_out[..., r:]
        return grad, None, None


def _signed_sin(sin: Tensor) -> Tensor:
    """``cat(-s1, s2)`` for the halves of sin: what the swapped halves of x are multiplied by."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Phi-3's rotary embedding on the first r channels of each head (rotate-half layout).

    x (b, heads, s, d); cos, sin (b|1, s, r), r even and ≤ d -> (b, heads, s, d), contiguous.
    Bitwise equal to :func:`rotary_reference`, forward and backward, in four whole-row passes over
    x where the composite makes six (and as many fewer temporaries); it saves only cos and sin, as the
    composite does. cos and sin that need a gradient, or of another dtype than x (the composite
    then promotes), take the composite, as does anything else the fused path does not cover.
    """
    if (
        cos.dim() != 3
        or _composite_path()
        or cos.requires_grad
        or sin.requires_grad
        or cos.dtype != x.dtype
        or sin.dtype != x.dtype
        or cos.shape[-1] % 2
        or cos.shape[-1] > x.shape[-1]
        or sin.shape != cos.shape
    ):
        return rotary_reference(x, cos, sin)
    return _Rotary.apply(x, cos.unsqueeze(1), sin.unsqueeze(1))
