"""NF4Weight: a frozen 4-bit linear weight that ``F.linear`` dispatches on; its autograd function.

An ``nn.Linear`` (or a LoRA ``Linear``/``MergedLinear`` over one) whose ``weight`` is an
:class:`NF4Weight` computes as before: ``F.linear(x, weight, bias)`` reaches
:meth:`NF4Weight.__torch_function__`, which runs :class:`NF4LinearFunction`. That function
dequantises the weight a slab of output rows at a time (never the whole 16-bit matrix at once),
saves no activation, and in backward computes only the input gradient (and the bias gradient
when the bias trains): the weight is frozen.

An NF4Weight is an ``nn.Module`` holding the quantised parts as buffers, so ``model.to(device)``
moves them and ``state_dict()`` carries them (``<layer>.weight.packed``, ...). It answers
``shape``, ``dtype`` (the dtype it computes in, that of the weight it replaced), ``device`` and
``requires_grad`` (False) like the tensor it stands for. Any other torch function given an
NF4Weight runs on its dequantised copy; in-place functions are refused: the weight is frozen.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .nf4 import (
    BLOCK_SIZE,
    SCALE_BLOCK_SIZE,
    NF4Data,
    byte_pair_table,
    dequantize_blocks,
    quantize_nf4,
)

__all__ = ["NF4Weight", "NF4LinearFunction", "nf4_linear", "is_quantized", "FrozenWeightError"]

# Elements of the weight dequantised at once in forward/backward (a slab of output rows): bounds the
# transient fp32 copy to 32 MiB whatever the layer's size.
DEFAULT_CHUNK_ELEMENTS = 1 << 23
_IN_PLACE_DUNDER = re.compile(
    r"^__i(add|sub|mul|matmul|truediv|floordiv|mod|pow|and|or|xor|lshift|rshift)__$"
)


class FrozenWeightError(RuntimeError):
    """An operation would change a frozen 4-bit weight (merging into it, an in-place op)."""


def is_quantized(weight) -> bool:
    """True when ``weight`` is a 4-bit :class:`NF4Weight` (not a tensor)."""
    return isinstance(weight, NF4Weight)


class NF4Weight(nn.Module):
    """A (out_features, in_features) weight stored as NF4 with double-quantised block scales.

    Build with :meth:`from_float`. Buffers: ``packed`` (uint8, two codes a byte), ``scale_codes``
    (int8 per block of 64, or None without double quantisation), ``scale_absmax`` (fp32 per group of
    256 scales), ``scale_mean`` (fp32 scalar). ``dtype`` is the dtype it computes in.
    """

    def __init__(
        self, data: NF4Data, dtype: torch.dtype, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    ):
        super().__init__()
        if len(data.shape) != 2:
            raise ValueError(
                f"NF4Weight: weight shape {tuple(data.shape)}; expected (out_features, in_features)"
            )
        self.register_buffer("packed", data.packed)
        self.register_buffer("scale_codes", data.scale_codes)
        self.register_buffer("scale_absmax", data.scale_absmax)
        self.register_buffer("scale_mean", data.scale_mean)
        self._shape = torch.Size(data.shape)
        self._dtype = dtype
        self.block_size = data.block_size
        self.scale_block_size = data.scale_block_size
        self.chunk_elements = int(chunk_elements)

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        weight: Tensor,
        dtype: torch.dtype | None = None,
        double_quant: bool = True,
        block_size: int = BLOCK_SIZE,
        scale_block_size: int = SCALE_BLOCK_SIZE,
    ) -> NF4Weight:
        """Quantise a (out, in) floating weight; ``dtype`` (default: the weight's) is the compute
        dtype. Raises ``ValueError`` for a weight that is not 2-D, empty, not floating, or on the
        meta device."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ValueError(
                f"NF4Weight.from_float: weight {shape}; expected a 2-D (out, in) tensor"
            )
        data = quantize_nf4(weight, block_size, scale_block_size, double_quant)
        return cls(data, dtype if dtype is not None else weight.dtype)

    # --- what the tensor it replaces would answer ------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._shape

    def size(self, dim: int | None = None):
        return self._shape if dim is None else self._shape[dim]

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return math.prod(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def in_features(self) -> int:
        return self._shape[1]

    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def T(self) -> Tensor:
        """The dequantised weight, transposed: a full 16/32-bit copy (``F.linear`` needs none)."""
        return self.dequantize().T

    def t(self) -> Tensor:
        return self.T

    def nbytes(self) -> int:
        """Bytes of storage: codes, scale codes, group absmax and mean."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def data_parts(self) -> NF4Data:
        return NF4Data(
            self.packed,
            self.scale_codes,
            self.scale_absmax,
            self.scale_mean,
            self._shape,
            self.block_size,
            self.scale_block_size,
        )

    # --- dequantising -----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full (out, in) weight in ``dtype`` (default: :attr:`dtype`), a new tensor."""
        rows = [w for _, _, w in self.row_chunks(dtype or self._dtype)]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def rows_per_chunk(self) -> int:
        # A multiple of the block size in rows: every slab then starts on a block boundary.
        out_f, in_f = self._shape
        rows = max(1, self.chunk_elements // max(in_f, 1)) // self.block_size * self.block_size
        return min(out_f, max(rows, self.block_size))

    def row_chunks(self, dtype: torch.dtype):
        """Yield ``(r0, r1, W[r0:r1])`` slabs of dequantised rows in ``dtype``, top to bottom."""
        out_f, in_f = self._shape
        data = self.data_parts()
        scales = data.block_scales()
        table = byte_pair_table(self.packed.device)
        step = self.rows_per_chunk()
        bs = self.block_size
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            start, end = r0 * in_f, r1 * in_f
            flat = dequantize_blocks(data, start // bs, -(-end // bs), dtype, scales, table)
            offset = start - (start // bs) * bs
            yield r0, r1, flat[offset : offset + end - start].view(r1 - r0, in_f)

    # --- the matmuls (no autograd: NF4LinearFunction wraps them) ----------------------------------
    def linear_no_grad(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """``x Wᵀ + b`` for x (N, in) -> (N, out), in x's dtype, a slab of W at a time."""
        out_f, in_f = self._shape
        if x.shape[-1] != in_f:
            raise RuntimeError(
                f"NF4 linear: input (..., {x.shape[-1]}) against weight ({out_f}, {in_f})"
            )
        b = None if bias is None else bias.to(x.dtype)
        if self.rows_per_chunk() >= out_f:  # one slab: the plain call
            return F.linear(x, next(self.row_chunks(x.dtype))[2], b)
        out = x.new_empty(*x.shape[:-1], out_f)
        for r0, r1, w in self.row_chunks(x.dtype):
            out[..., r0:r1] = F.linear(x, w)
        if b is not None:
            out.add_(b)
        return out

    def grad_input(self, grad_out: Tensor) -> Tensor:
        """``grad_out W`` for grad_out (..., out) -> (..., in), a slab of W at a time."""
        out_f, in_f = self._shape
        g2 = grad_out.reshape(-1, out_f)
        gx = None
        for r0, r1, w in self.row_chunks(grad_out.dtype):
            part = g2[:, r0:r1]
            gx = part @ w if gx is None else gx.addmm_(part, w)
        return gx.view(*grad_out.shape[:-1], in_f)

    # --- torch functions --------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                isinstance(weight, NF4Weight)
                and isinstance(x, Tensor)
                and not isinstance(bias, NF4Weight)
            ):
                return nf4_linear(x, weight, bias)
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or _IN_PLACE_DUNDER.match(name)
        if (in_place and args and isinstance(args[0], NF4Weight)) or isinstance(
            kwargs.get("out"), NF4Weight
        ):
            raise FrozenWeightError(
                f"{name}: an NF4 weight is frozen 4-bit storage and is never changed in place; "
                "dequantize it first (lora.dequantize(model)) to get a 16-bit weight"
            )
        # Anything else sees the dequantised weight (a full copy that lives for this call only).
        args, kwargs = tree_map(
            lambda a: a.dequantize() if isinstance(a, NF4Weight) else a, (args, kwargs)
        )
        return func(*args, **kwargs)

    # --- moving: buffers change device, never dtype (a float cast sets the compute dtype) ------
    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self._dtype, device=self.device))
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(probe.device)
        if probe.is_floating_point():
            self._dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        dq = "double-quantised scales" if self.scale_codes is not None else "fp32 scales"
        return (
            f"shape={tuple(self._shape)}, nf4, block_size={self.block_size}, {dq}, "
            f"dtype={str(self._dtype).removeprefix('torch.')}"
        )


class NF4LinearFunction(torch.autograd.Function):
    """``y = x Ŵᵀ + b`` with Ŵ the dequantised NF4 weight; x (N, in). Backward: ``∂x = ∂y Ŵ`` and
    ``∂b = Σ ∂y``; no gradient for the weight, and nothing saved but a reference to the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, weight: NF4Weight) -> Tensor:
        ctx.weight = weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        return weight.linear_no_grad(x, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = ctx.weight.grad_input(grad_out) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_b, None


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out)."""
    # The function works on 2-D (tokens, features); the views back to x's shape are made here, under
    # autograd, so that a caller may add to the output in place (a view made inside it may not be).
    y = NF4LinearFunction.apply(x.reshape(-1, x.shape[-1]), bias, weight)
    return y.view(*x.shape[:-1], weight.out_features)
