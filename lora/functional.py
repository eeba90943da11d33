"""The math of a LoRA layer, as plain functions on tensors.

Every layer in :mod:`lora.layers` calls these; they hold no state. Notation, for a base weight
``W`` of shape (out, in):

    ΔW = scaling · B @ A          A: (r, in)   B: (out, r)
    y  = x Wᵀ + b + scaling · ((dropout(x) Aᵀ) Bᵀ)

``scaling`` is ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rank-stabilised LoRA).
The adapter path never forms ΔW: it costs two thin matmuls, O(tokens · r · (in + out)).

The LoRA parameters may have another dtype than the base weight (fp32 adapters on a bf16 base):
the adapter path runs in the activation's dtype (A and B, which are small, are cast to it, as
autocast would; no fp32 copy of a bf16 activation is made), and gradients come back in each
parameter's own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _matmul
from ._dropout import DropStream, chunk_buffer, draw_seed, dropout_keep_mask, realised_dropout_p

__all__ = [
    "lora_scaling",
    "linear_delta_weight",
    "lora_linear",
    "lora_linear_fused",
    "dropout_keep_mask",
    "realised_dropout_p",
    "merged_lora_B",
    "merged_lora_blocks",
    "embedding_delta_weight",
    "lora_embedding",
    "conv_delta_weight",
]


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised LoRA (Kalajdzievski 2023).

    Returns 0.0 for ``r == 0`` (no adapter).
    """
    if r == 0:
        return 0.0
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def linear_delta_weight(
    lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool = False
) -> Tensor:
    """``scaling · B @ A``: (out, in), or its transpose (in, out) when ``fan_in_fan_out``."""
    delta = (lora_B @ lora_A) * scaling
    return delta.T if fan_in_fan_out else delta


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout: Callable[[Tensor], Tensor] | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """``x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` without forming ΔW.

    Shapes: x (..., in); weight (out, in), or (in, out) when ``fan_in_fan_out``; lora_A (r, in);
    lora_B (out, r). Returns (..., out) in the dtype of the base path.
    """
    result = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    h = dropout(x) if dropout is not None else x
    # The adapter runs in the activation's dtype: cast the small A and B, never the activation.
    if lora_A.dtype != h.dtype:
        lora_A, lora_B = lora_A.to(h.dtype), lora_B.to(h.dtype)
    # Scale the thin (..., r) intermediate, not the (..., out) result. (Not torch.add(..., alpha=):
    # torch 2.13's inductor miscompiles that after a matmul on CPU.)
    adapter = F.linear(F.linear(h, lora_A) * scaling, lora_B)
    if adapter.dtype != result.dtype:
        adapter = adapter.to(result.dtype)
    return result.add_(adapter)  # in place: the base matmul's backward does not need its output


# --- the fast path: one autograd function for the LoRA linear --------------------------------------
#
# What it saves for backward: the input x (the same tensor object, no copy: a frozen base layer
# whose input needs a gradient keeps nothing but W, and the adapter needs x for dA anyway), the
# parameters (no copies), the rank-r activation v = c·dropout_keep(x) Aᵀ of shape (tokens, r), and
# an int seed. The dropout mask is never stored: backward draws the same mask again from the
# seed. A 4-bit base adds what its backward_slot gives: nothing, or under a checkpoint a zero-byte
# placeholder in the first forward and the decoded weight in the recomputation (lora.quant).
# Activations stay in their own dtype: the (tiny) A and B are cast to it, never x to theirs.


def base_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    fan_in_fan_out: bool,
    saved: Tensor | None = None,
) -> Tensor:
    """The frozen base layer's forward, ``x Wᵀ + b``: the fused path's single base call site.

    A quantised base (a 4-bit weight such as :class:`lora.quant.NF4Weight`) plugs in here and in
    :func:`base_linear_input_grad`: it is not a Tensor, answers ``F.linear`` through its
    ``__torch_function__`` and gives ``grad_input(grad_out, saved)``; it never has
    ``fan_in_fan_out``. ``saved``: inside an autograd function's forward, what the quantised
    weight's ``backward_slot`` gave (then this runs its ``linear_no_grad``, which may use it).
    """
    if not isinstance(weight, Tensor):
        if saved is not None:
            return weight.linear_no_grad(x, bias, saved)
        return F.linear(x, weight, bias)
    return _matmul.linear(x, weight.T if fan_in_fan_out else weight, bias)


def base_linear_input_grad(
    grad_out: Tensor,
    weight: Tensor,
    fan_in_fan_out: bool,
    saved: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``∂(x Wᵀ)/∂x`` applied to ``grad_out`` (tokens, out): ``grad_out @ W``, (tokens, in).

    ``saved``: for a quantised base, what its ``backward_slot`` gave in forward. ``out``: a
    contiguous (tokens, in) tensor that the result is added into, inside the matmul (in place;
    returned)."""
    if not isinstance(weight, Tensor):  # a quantised base: it dequantises slab by slab
        return weight.grad_input(grad_out, saved, out)
    w = weight.T if fan_in_fan_out else weight
    return _matmul.mm(grad_out, w) if out is None else _matmul.addmm_(out, grad_out, w)


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


class _LoRALinear(torch.autograd.Function):
    """y = x Wᵀ + b + (c · keep(x) Aᵀ) Bᵀ, with c = scaling / (1 - p') and keep() the seeded mask.

    x is 2-D (tokens, in) here; lora_linear_fused flattens leading dimensions. ``blocks``: None
    (B is (out, r)), or the slices of a fused layer: (out_start, out_stop, b_start, a_start,
    a_stop) each, B's rows b_start:b_start+(out_stop-out_start) writing those output rows from
    A's rows a_start:a_stop; output rows in no block get no adapter.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, fan_in_fan_out, blocks):
        A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
        B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
        # A quantised base weight is a module, not a Tensor: keep a reference, and what it asks to
        # save (its decoded self in a checkpoint's recomputation: backward then decodes nothing).
        quantized = not isinstance(weight, Tensor)
        slot = weight.backward_slot(x.dtype, ctx.needs_input_grad[0]) if quantized else None
        y = base_linear(x, _in_dtype(weight, x.dtype), bias, fan_in_fan_out, slot)
        if p > 0:
            c = scaling / (1.0 - realised_dropout_p(p, x.device))
            v = x.new_empty(x.shape[0], A.shape[0])
            stream = DropStream(x.shape[0], x.shape[1], p, seed, x.device)
            hbuf = chunk_buffer(stream.chunk, x.shape[1], x)
            for start, n, m in stream:
                h = stream.apply(m, x[start : start + n], hbuf[:n])
                _matmul.mm(h, A.T, out=v[start : start + n])
            del hbuf
            v.mul_(c)
        else:
            v = _matmul.mm(x, A.T).mul_(
                scaling
            )  # (tokens, r): the only activation the adapter adds
        for rows, vb, Bb in _blocks(blocks, v, B, y.shape[1]):
            if y.dtype != v.dtype:  # a base whose output dtype differs from its input's (rare)
                y[:, rows].add_(_matmul.mm(vb, Bb.T).to(y.dtype))
            else:
                _matmul.addmm_(y[:, rows], vb, Bb.T)
        ctx.quantized_weight = weight if quantized else None
        ctx.save_for_backward(x, None if quantized else weight, lora_A, lora_B, v, slot)
        ctx.scaling, ctx.p, ctx.seed, ctx.fan_in_fan_out = scaling, p, seed, fan_in_fan_out
        ctx.blocks = blocks
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, v, slot = ctx.saved_tensors
        if ctx.quantized_weight is not None:
            weight = ctx.quantized_weight
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        p, fifo = ctx.p, ctx.fan_in_fan_out
        g = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
        g = g.contiguous()
        A = lora_A if lora_A.dtype == x.dtype else lora_A.to(x.dtype)
        B = lora_B if lora_B.dtype == x.dtype else lora_B.to(x.dtype)
        c = ctx.scaling / (1.0 - realised_dropout_p(p, x.device)) if p > 0 else ctx.scaling
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_B:
            grad_B = torch.zeros_like(B) if ctx.blocks is not None else None
            for rows, vb, Bb in _blocks(ctx.blocks, v, B, g.shape[1]):
                # (vᵀ g)ᵀ with vᵀ made contiguous: oneDNN's skinny kernels take a (16, 512) row-major
                # left operand 1.3-1.4x faster than a transposed view (bf16, 512 x 3072, r = 16)
                gB = _matmul.mm(vb.T.contiguous(), g[:, rows]).T  # (out, r)
                if grad_B is None:
                    grad_B = gB
                else:
                    b0 = _b_start(ctx.blocks, rows)
                    grad_B[b0 : b0 + Bb.shape[0]] = gB
            grad_B = grad_B.to(lora_B.dtype, memory_format=torch.contiguous_format)
        # dx = keep(du A) + g W, built in that order: the (masked) adapter part written straight
        # into dx, then the base's matmul accumulating into it. With dropout that saves a scratch
        # copy and a full add pass over dx (bf16 8192 -> 3072, p = 0.05: 1.46x -> 1.33x the frozen
        # layer); it rounds once, where adding to the base's rounded result rounded twice.
        if need_A or need_x:
            # (tokens, r·k): ∂L/∂(keep(x) Aᵀ)
            if ctx.blocks is None:
                du = _matmul.mm(g, B)
            else:
                du = v.new_zeros(v.shape)
                for o0, o1, b0, a0, a1 in ctx.blocks:
                    du[:, a0:a1] = _matmul.mm(g[:, o0:o1], B[b0 : b0 + (o1 - o0)])
            du.mul_(c)
            duT = du.T.contiguous() if need_A else None  # (r, tokens): see grad_B's comment
            if p == 0:
                if need_A:
                    grad_A = _matmul.mm(duT, x).to(lora_A.dtype)
                if need_x:
                    grad_x = _matmul.mm(du, A)
            else:
                # Chunk by chunk, with the mask drawn again; a low-precision x accumulates dA
                # in fp32 across chunks.
                acc_dtype = torch.float32 if _low_precision(x.dtype) else x.dtype
                if need_A:
                    grad_A = torch.zeros(A.shape, dtype=acc_dtype, device=x.device)
                if need_x:
                    grad_x = x.new_empty(x.shape)  # contiguous: its row chunks are matmul outputs
                stream = DropStream(x.shape[0], x.shape[1], p, ctx.seed, x.device)
                buf = chunk_buffer(stream.chunk, x.shape[1], x) if need_A else None
                for start, n, m in stream:
                    rows = slice(start, start + n)
                    if need_A:
                        h = stream.apply(m, x[rows], buf[:n])
                        if acc_dtype == x.dtype:
                            grad_A.addmm_(duT[:, rows], h)
                        else:
                            grad_A.add_(_matmul.mm(duT[:, rows], h))
                    if need_x:
                        t = _matmul.mm(du[rows], A, out=grad_x[rows])
                        stream.apply(m, t, t)
                if need_A:
                    grad_A = grad_A.to(lora_A.dtype)
        if need_x:
            grad_x = base_linear_input_grad(g, _in_dtype(weight, x.dtype), fifo, slot, out=grad_x)
        del slot  # a decoded 4-bit weight: freed as soon as it has served
        if need_w:
            gw = _matmul.mm(g.T, x)  # (out, in)
            grad_w = (gw.T if fifo else gw).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = grad_y.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None, None


def _in_dtype(weight, dtype: torch.dtype):
    """A Tensor weight in ``dtype`` for one matmul (a transient cast under autocast: the weight
    itself is what is saved); a quantised weight as it is (it decodes into the input's dtype)."""
    if not isinstance(weight, Tensor) or weight.dtype == dtype:
        return weight
    return weight.to(dtype)


def _blocks(blocks, v: Tensor, B: Tensor, out_features: int):
    """(output rows, v's columns, B's rows) per adapter block; one block without ``blocks``."""
    if blocks is None:
        yield slice(0, out_features), v, B
        return
    for o0, o1, b0, a0, a1 in blocks:
        yield slice(o0, o1), v[:, a0:a1], B[b0 : b0 + (o1 - o0)]


def _b_start(blocks, rows: slice) -> int:
    return next(b0 for o0, _, b0, _, _ in blocks if o0 == rows.start)


def lora_linear_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    seed: int | None = None,
    blocks: Sequence[tuple[int, int, int, int, int]] | None = None,
) -> Tensor:
    """``x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ`` as one autograd function (the layers' fast path).

    Shapes: x (..., in); weight (out, in), or (in, out) when ``fan_in_fan_out``; bias (out,) or
    None; lora_A (r, in); lora_B (out, r). Returns (..., out) in x's dtype (the base's result).

    ``dropout_p`` in [0, 1): inverted dropout on the adapter's input, each element dropped
    independently with probability :func:`realised_dropout_p` (p on CPU, within 2⁻¹⁷ of it on
    other devices). The mask comes
    from ``seed`` (default: drawn from torch's global CPU generator, so saved RNG state covers it)
    and is regenerated in backward, never stored. Saved for backward: x itself, the parameters and
    the (..., r) rank-r activation. The adapter runs in x's dtype (fp32 A and B are cast to a bf16
    x's dtype, not x to theirs); gradients come back in each parameter's own dtype.

    ``blocks`` (a fused layer, :meth:`lora.MergedLinear.lora_blocks`): lora_B is the compact
    (Σ enabled sizes, r) matrix and each block ``(out_start, out_stop, b_start, a_start, a_stop)``
    adds ``v[:, a_start:a_stop] @ B[b_start:b_start + out_stop - out_start]ᵀ`` to those output
    columns; the (out, r·k) expanded B is never built or saved.

    Under autocast it runs in autocast's dtype, as ``F.linear`` would there: x and the bias are
    cast to it (differentiably), the weight is cast for each matmul and saved as it is (not a
    16-bit copy of a frozen fp32 weight for every layer, which autocast's ``F.linear`` keeps), and
    autocast is off inside; the result is in that dtype. Under ``torch.compile`` (and under
    autocast for float64 inputs) this calls the plain composite :func:`lora_linear` instead, so
    that inductor fuses it (with its own RNG for dropout).
    Raises ``ValueError`` for ``dropout_p`` outside [0, 1), ``RuntimeError`` outside autocast for a
    weight whose dtype is not x's (as ``F.linear`` would).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r}: expected a float in [0, 1)")
    autocast = None
    if not torch.compiler.is_compiling():
        w = weight if isinstance(weight, Tensor) else None  # a 4-bit weight decodes into x's dtype
        autocast = _matmul.autocast_dtype(x.device, x, w, bias)
    if autocast is not None:
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(autocast)
            bias = bias.to(autocast) if bias is not None else None
            return _fused(
                x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, seed, blocks
            )
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        # Compiled: let inductor fuse it. Autocast on float64: its per-op rules, on the composite.
        drop = (lambda t: F.dropout(t, dropout_p, training=True)) if dropout_p > 0 else None
        if blocks is not None:
            lora_B = _expand_blocks(
                lora_B, blocks, weight.shape[1 if fan_in_fan_out else 0], lora_A.shape[0]
            )
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling, drop, fan_in_fan_out)
    if isinstance(weight, Tensor) and weight.dtype != x.dtype:
        raise RuntimeError(
            f"lora_linear_fused: weight dtype {weight.dtype} and input dtype {x.dtype}; expected "
            "the same (cast one, or run under torch.autocast)"
        )
    return _fused(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, seed, blocks)


def _fused(x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out, seed, blocks):
    # the autograd function on the 2-D rows of x, its arguments checked by lora_linear_fused
    if dropout_p > 0 and seed is None:
        seed = draw_seed()
    lead = x.shape[:-1]
    out = _LoRALinear.apply(
        x.reshape(-1, x.shape[-1]),
        weight,
        bias,
        lora_A,
        lora_B,
        float(scaling),
        float(dropout_p),
        seed if seed is not None else 0,
        bool(fan_in_fan_out),
        tuple(tuple(b) for b in blocks) if blocks is not None else None,
    )
    return unflatten_rows(out, lead)


def unflatten_rows(y: Tensor, lead: Sequence[int]) -> Tensor:
    """A 2-D (tokens, out) result of an autograd function back to (*lead, out), as a tensor of its
    own rather than a view of ``y``.

    ``y`` is fresh (nothing else aliases it), so nothing is lost by not tracking the alias, and
    the result takes in-place ops and module hooks as any layer's output: FSDP2 warns of, and
    would lose its pre-backward all-gather on an in-place op on, a module output that is a view.
    """
    return torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


def _expand_blocks(lora_B: Tensor, blocks, out_features: int, rk: int) -> Tensor:
    out = lora_B.new_zeros(out_features, rk)
    for o0, o1, b0, a0, a1 in blocks:
        out[o0:o1, a0:a1] = lora_B[b0 : b0 + (o1 - o0)]
    return out


def merged_lora_blocks(
    split_sizes: Sequence[int], enable_lora: Sequence[bool], r: int
) -> tuple[tuple[int, int, int, int, int], ...]:
    """The adapter blocks of a :class:`~lora.MergedLinear` for :func:`lora_linear_fused`: one
    ``(out_start, out_stop, b_start, a_start, a_stop)`` per enabled slice."""
    blocks, row, src, col = [], 0, 0, 0
    for size, enabled in zip(split_sizes, enable_lora):
        if enabled:
            blocks.append((row, row + size, src, col, col + r))
            src += size
            col += r
        row += size
    return tuple(blocks)


def merged_lora_B(
    lora_B: Tensor, split_sizes: Sequence[int], enable_lora: Sequence[bool], r: int
) -> Tensor:
    """Expand a :class:`~lora.MergedLinear` ``lora_B`` into one (out, r·k) matrix.

    ``lora_B`` stacks one (size_i, r) block per enabled slice i (k of them). The result places
    block j (the j-th enabled slice) at rows of slice i and columns j·r:(j+1)·r, zeros elsewhere,
    so that the fused layer's delta is ``expanded_B @ lora_A``: one low-rank product whose
    disabled slices are exactly zero. It is (out × r·k), never (out × in).
    """
    k = sum(bool(e) for e in enable_lora)
    out = lora_B.new_zeros(sum(split_sizes), r * k)
    row = src = col = 0
    for size, enabled in zip(split_sizes, enable_lora):
        if enabled:
            out[row : row + size, col : col + r] = lora_B[src : src + size]
            src += size
            col += r
        row += size
    return out


def embedding_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``scaling · (B @ A)ᵀ``: (num_embeddings, embedding_dim), with A (r, num_embeddings), B (dim, r)."""
    return (lora_B @ lora_A).T * scaling


def lora_embedding(
    ids: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """Look up rows of ``W + ΔW`` without forming ΔW.

    ``padding_idx``: lookups of the padding row send no gradient to W, A or B (so the padding row
    of ``W + ΔW`` stays what it was, as in nn.Embedding). ``max_norm`` renormalises each looked-up row of ``W + ΔW`` as ``nn.Embedding``
    does (rows with norm > max_norm scaled to max_norm), but out of place: the frozen base weight
    is never rewritten.
    """
    base = F.embedding(ids, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    after_A = F.embedding(ids, lora_A.T, padding_idx, None, norm_type, scale_grad_by_freq, False)
    adapter = (after_A * scaling) @ lora_B.T
    if padding_idx is not None:
        # As in nn.Embedding, a padding lookup contributes no gradient: not to A, and not to B either.
        adapter = torch.where((ids == padding_idx).unsqueeze(-1), adapter.detach(), adapter)
    if adapter.dtype != base.dtype:
        adapter = adapter.to(base.dtype)
    out = base + adapter
    if max_norm is not None:
        out = renorm_rows(out, max_norm, norm_type)
    return out


def renorm_rows(rows: Tensor, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale rows whose ``norm_type``-norm exceeds ``max_norm`` to ``max_norm`` (as embedding_renorm_)."""
    norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows * scale


def conv_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``scaling · B @ A`` reshaped to a conv weight.

    lora_A: (r, in/groups, *kernel), lora_B: (out, r, 1, ..., 1). Returns (out, in/groups, *kernel).
    """
    r = lora_A.shape[0]
    delta = lora_B.reshape(lora_B.shape[0], r) @ lora_A.reshape(r, -1)
    return delta.reshape(lora_B.shape[0], *lora_A.shape[1:]) * scaling
