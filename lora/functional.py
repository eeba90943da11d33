"""The math of a LoRA layer, as plain functions on tensors.

Every layer in :mod:`lora.layers` calls these; they hold no state. Notation, for a base weight
``W`` of shape (out, in):

    ΔW = scaling · B @ A          A: (r, in)   B: (out, r)
    y  = x Wᵀ + b + scaling · ((dropout(x) Aᵀ) Bᵀ)

``scaling`` is ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rank-stabilised LoRA).
The adapter path never forms ΔW: it costs two thin matmuls, O(tokens · r · (in + out)).

The LoRA parameters may have another dtype than the base weight (fp32 adapters on a bf16 base):
the adapter path runs in the adapter's dtype and its result is cast to the output's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lora_scaling",
    "linear_delta_weight",
    "lora_linear",
    "merged_lora_B",
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


def linear_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
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
    if h.dtype != lora_A.dtype:
        h = h.to(lora_A.dtype)
    # Scale the thin (..., r) intermediate, not the (..., out) result. (Not torch.add(..., alpha=):
    # torch 2.13's inductor miscompiles that after a matmul on CPU.)
    adapter = F.linear(F.linear(h, lora_A) * scaling, lora_B)
    if adapter.dtype != result.dtype:
        adapter = adapter.to(result.dtype)
    return result.add_(adapter)  # in place: the base matmul's backward does not need its output


def merged_lora_B(lora_B: Tensor, split_sizes: Sequence[int], enable_lora: Sequence[bool], r: int) -> Tensor:
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
