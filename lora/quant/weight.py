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

Under activation checkpointing a layer's forward runs twice: once in the forward pass, once again
right before that layer's backward. :func:`keep_decoded_on_recompute` wraps the checkpointed
function so that the second run keeps each weight it decodes for the backward that follows, which
then needs no decode of its own: two decodes a step instead of three. The first run keeps none
(that would be the whole model in 16 bits); what it saves in the decoded weight's place is a
zero-byte placeholder of the same shape and dtype, which the non-reentrant checkpoint replaces by
what the second run saves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .. import _matmul
from ..functional import unflatten_rows
from .nf4 import (
    BLOCK_SIZE,
    SCALE_BLOCK_SIZE,
    NF4Data,
    byte_pair_table,
    dequantize_blocks,
    quantize_nf4,
)

__all__ = [
    "NF4Weight",
    "NF4LinearFunction",
    "nf4_linear",
    "is_quantized",
    "FrozenWeightError",
    "keep_decoded_on_recompute",
]

# Elements of the weight dequantised at once in forward/backward (a slab of output rows): bounds the
# decoded copy (16 MiB in bf16) whatever the layer's size. (The fp32 transients of decoding are
# smaller still: lora.quant.nf4 decodes a slab in passes that stay in the cache.)
DEFAULT_CHUNK_ELEMENTS = 1 << 23
_IN_PLACE_DUNDER = re.compile(
    r"^__i(add|sub|mul|matmul|truediv|floordiv|mod|pow|and|or|xor|lshift|rshift)__$"
)


class FrozenWeightError(RuntimeError):
    """An operation would change a frozen 4-bit weight (merging into it, an in-place op)."""


# Which run of a checkpointed function is on: None (not checkpointed), the first ("forward") or a
# recomputation ("recompute"). Set only by keep_decoded_on_recompute, read by backward_slot.
_FORWARD, _RECOMPUTE = "forward", "recompute"
_PHASE: ContextVar[str | None] = ContextVar("lora_quant_checkpoint_phase", default=None)

_F = TypeVar("_F", bound=Callable)


def keep_decoded_on_recompute(fn: _F) -> _F:
    """``fn`` for one ``torch.utils.checkpoint.checkpoint`` call, decoding each 4-bit weight once
    fewer: ``checkpoint(keep_decoded_on_recompute(layer), x, ..., use_reentrant=...)``.

    The wrapper's first call is the checkpoint's forward; every later call is a recomputation,
    which runs right before the segment's backward. There, each 4-bit linear whose input needs a
    gradient decodes its weight whole and saves it for that backward (which then decodes nothing);
    it is freed when that backward is done. So a segment holds its own weights in 16 bits from its
    recomputation to its backward, never in the forward pass. Gradients are bitwise those without
    it. Both kinds of checkpoint (``use_reentrant`` True or False) work; wrap afresh for each
    checkpoint call (a wrapper whose first call is spent treats every call as a recomputation).
    Without 4-bit weights in ``fn`` it changes nothing.
    """
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        token = _PHASE.set(_FORWARD if calls == 0 else _RECOMPUTE)
        calls += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _PHASE.reset(token)

    return run  # type: ignore[return-value]


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

    @classmethod
    def empty_shardable(
        cls,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str = "meta",
        block_size: int = BLOCK_SIZE,
        scale_block_size: int = SCALE_BLOCK_SIZE,
    ) -> NF4Weight:
        """An NF4Weight of ``shape`` with no values yet (``device`` "meta": no memory), in the
        layout that FSDP2 can shard: see :meth:`make_shardable`. The FSDP loader
        (``lora.finetune.distributed.load_sharded_phi3``) fills each rank's blocks."""
        n_blocks = -(-math.prod(shape) // block_size)
        groups = -(-n_blocks // scale_block_size)
        data = NF4Data(
            torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=device),
            torch.empty(n_blocks, dtype=torch.int8, device=device),
            torch.empty(groups, dtype=torch.float32, device=device),
            torch.empty((), dtype=torch.float32, device=device),
            torch.Size(shape),
            block_size,
            scale_block_size,
        )
        return cls(data, dtype).make_shardable()

    def make_shardable(self) -> NF4Weight:
        """Hold the per-block parts as frozen Parameters with one row per block, so that FSDP2's
        ``fully_shard`` shards them (it shards Parameters by dim 0, never buffers): ``packed``
        (n_blocks, block_size / 2) uint8 and ``scale_codes`` (n_blocks,) int8, split at the same
        block boundaries on every rank. The per-group absmax and the mean (4 bytes per
        ``block_size · scale_block_size`` weights) stay whole buffers. Inside an FSDP unit's
        forward and backward the Parameters are the gathered whole; dequantising reads them then.
        Returns ``self``. Needs double-quantised scales (``scale_codes``); ``ValueError`` without."""
        if self._buffers.get("scale_codes") is None and "scale_codes" not in self._parameters:
            raise ValueError(
                "NF4Weight.make_shardable: the weight has fp32 block scales (double_quant=False); "
                "expected double-quantised scales (the default)"
            )
        for name, rows in (("packed", (-1, self.block_size // 2)), ("scale_codes", (-1,))):
            if name in self._buffers:
                t = self._buffers.pop(name)
                assert t is not None
                self.register_parameter(name, nn.Parameter(t.view(rows), requires_grad=False))
        return self

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
        """Bytes of storage: codes, scale codes, group absmax and mean (the whole weight's, also
        when FSDP holds a shard of it here)."""
        parts = [*self._buffers.values(), *self._parameters.values()]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def data_parts(self) -> NF4Data:
        # (the shardable layout's (n_blocks, block_size / 2) codes as the flat run NF4Data holds)
        packed, codes = self.packed, self.scale_codes
        return NF4Data(
            packed if packed.dim() == 1 else packed.reshape(-1),
            codes,
            self.scale_absmax,
            self.scale_mean,
            self._shape,
            self.block_size,
            self.scale_block_size,
        )

    # --- dequantising -----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full (out, in) weight in ``dtype`` (default: :attr:`dtype`), a new tensor.

        Decoded into one allocation, at most :attr:`chunk_elements` at a time (the fp32 transient);
        bitwise what :meth:`row_chunks` yields (each element is decoded on its own)."""
        dtype = dtype or self._dtype
        data = self.data_parts()
        bs, n_blocks = self.block_size, data.n_blocks
        flat = torch.empty(n_blocks * bs, dtype=dtype, device=self.device)
        scales = data.block_scales()
        table = byte_pair_table(self.packed.device)
        step = max(1, self.chunk_elements // bs)
        for b0 in range(0, n_blocks, step):
            b1 = min(n_blocks, b0 + step)
            dequantize_blocks(data, b0, b1, dtype, scales, table, out=flat[b0 * bs : b1 * bs])
        return flat[: data.numel].view(self._shape)

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

    def _slabs(self, dtype: torch.dtype, saved: Tensor | None):
        # The slabs of row_chunks: decoded now, or views of a weight decoded whole before (the same
        # rows, values, shapes and strides, so every matmul below gives bitwise the same result).
        decoded = _decoded(saved, dtype)
        if decoded is None:
            yield from self.row_chunks(dtype)
            return
        out_f, step = self._shape[0], self.rows_per_chunk()
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            yield r0, r1, decoded[r0:r1]

    # --- what an autograd function over this weight saves for backward ----------------------------
    def backward_slot(self, dtype: torch.dtype, input_needs_grad: bool) -> Tensor | None:
        """What a forward in ``dtype`` over this weight saves for its backward.

        None outside :func:`keep_decoded_on_recompute`. In a checkpoint's recomputation, when the
        input needs a gradient: the whole weight decoded in ``dtype``, for :meth:`linear_no_grad`
        and :meth:`grad_input` to use instead of decoding. Otherwise a placeholder of the same
        shape, dtype and device that holds no memory (so that both runs of a checkpointed function
        save the same tensors, as the non-reentrant checkpoint requires)."""
        phase = _PHASE.get()
        if phase is None:
            return None
        if phase == _RECOMPUTE and input_needs_grad:
            return self.dequantize(dtype)
        return torch.zeros((), dtype=dtype, device=self.device).expand(self._shape)

    # --- the matmuls (no autograd: NF4LinearFunction wraps them) ----------------------------------
    def linear_no_grad(self, x: Tensor, bias: Tensor | None, saved: Tensor | None = None) -> Tensor:
        """``x Wᵀ + b`` for x (N, in) -> (N, out), in x's dtype, a slab of W at a time.

        ``saved``: what :meth:`backward_slot` gave; a decoded weight is used, not decoded again."""
        out_f, in_f = self._shape
        if x.shape[-1] != in_f:
            raise RuntimeError(
                f"NF4 linear: input (..., {x.shape[-1]}) against weight ({out_f}, {in_f})"
            )
        b = None if bias is None else bias.to(x.dtype)
        if self.rows_per_chunk() >= out_f:  # one slab: the plain call
            return _matmul.linear(x, next(self._slabs(x.dtype, saved))[2], b)
        out = x.new_empty(*x.shape[:-1], out_f)
        for r0, r1, w in self._slabs(x.dtype, saved):
            out[..., r0:r1] = _matmul.linear(x, w)
        if b is not None:
            out.add_(b)
        return out

    def grad_input(
        self, grad_out: Tensor, saved: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        """``grad_out W`` for grad_out (..., out) -> (..., in), a slab of W at a time.

        ``saved``: what :meth:`backward_slot` gave in forward; a decoded weight (in grad_out's
        dtype) is used instead of decoding. ``out``: a contiguous (tokens, in) tensor to add the
        result into (in place; returned as (..., in))."""
        out_f, in_f = self._shape
        g2 = grad_out.reshape(-1, out_f)
        gx = out
        for r0, r1, w in self._slabs(grad_out.dtype, saved):
            part = g2[:, r0:r1]
            gx = _matmul.mm(part, w) if gx is None else _matmul.addmm_(gx, part, w)
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
        if self._parameters:  # the shardable layout: integer codes, which no float cast changes
            buffers = self.__dict__["_buffers"]
            self.__dict__["_buffers"] = {}
            try:  # nn.Module's own handling (FSDP2's DTensor shards included), buffers aside
                super()._apply(fn, recurse=False)
            finally:
                self.__dict__["_buffers"] = buffers
        for key, buf in self._buffers.items():
            if buf is not None:
                # a meta buffer (the FSDP loader's, before to_empty) has no values to move
                moved = torch.empty_like(buf, device=probe.device) if buf.is_meta else None
                self._buffers[key] = moved if moved is not None else buf.to(probe.device)
        if probe.is_floating_point():
            self._dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        dq = "double-quantised scales" if self.scale_codes is not None else "fp32 scales"
        return (
            f"shape={tuple(self._shape)}, nf4, block_size={self.block_size}, {dq}, "
            f"dtype={str(self._dtype).removeprefix('torch.')}"
        )


def _decoded(saved: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # A weight decoded whole by backward_slot, or None (nothing saved, or the placeholder, whose
    # strides are all 0: a decoded weight is contiguous and never is).
    if saved is None or saved.dtype != dtype or all(st == 0 for st in saved.stride()):
        return None
    return saved


class NF4LinearFunction(torch.autograd.Function):
    """``y = x Ŵᵀ + b`` with Ŵ the dequantised NF4 weight; x (N, in). Backward: ``∂x = ∂y Ŵ`` and
    ``∂b = Σ ∂y``; no gradient for the weight. Saved: a reference to the weight, and what
    :meth:`NF4Weight.backward_slot` gives (nothing outside :func:`keep_decoded_on_recompute`; the
    decoded weight in a checkpoint's recomputation)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, weight: NF4Weight) -> Tensor:
        ctx.weight = weight
        ctx.bias_dtype = None if bias is None else bias.dtype
        saved = weight.backward_slot(x.dtype, ctx.needs_input_grad[0])
        ctx.save_for_backward(saved)
        return weight.linear_no_grad(x, bias, saved)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (saved,) = ctx.saved_tensors
        grad_x = ctx.weight.grad_input(grad_out, saved) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_b, None


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out)."""
    # The function works on 2-D (tokens, features); the result goes back to x's shape here, under
    # autograd, so that a caller may add to the output in place.
    y = NF4LinearFunction.apply(x.reshape(-1, x.shape[-1]), bias, weight)
    return unflatten_rows(y, x.shape[:-1])
