"""4-bit NormalFloat (NF4) with double quantisation, as in QLoRA (Dettmers et al. 2023), in torch.

A weight ``W`` (any shape, ``n`` elements) is flattened and cut into blocks of ``block_size`` = 64
elements (the last one zero-padded). Each block ``b`` keeps its absolute maximum ``s_b`` and each
element the index of the nearest NF4 value to ``w / s_b``:

    code_i = argmin_j | w_i / s_b - q_j |            q: the 16 NF4 values, q_0 = -1 ... q_15 = 1
    ŵ_i    = q[code_i] · ŝ_b

Double quantisation stores the block scales in 8 bits: with ``m`` their mean, each group of
``scale_block_size`` = 256 centred scales ``c_b = s_b - m`` keeps its own fp32 absmax ``a_g`` and

    k_b = clamp(round(c_b · 128 / a_g), -128, 127)   (int8)
    ŝ_b = k_b / (128 / a_g) + m

which is torchao's NF4Tensor scheme (so its bytes can be compared), the linear int8 variant of the
paper's 8-bit scale quantisation. Codes are packed two per byte, the first element of each pair in
the high nibble (as bitsandbytes and torchao). Storage per element:
4 + 8/64 + 32/(64·256) ≈ 4.127 bits, plus one fp32 mean per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "SCALE_BLOCK_SIZE",
    "nf4_code_book",
    "pack_4bit",
    "unpack_4bit",
    "NF4Data",
    "quantize_nf4",
    "quantize_blocks",
    "quantize_scales",
    "dequantize_nf4",
    "dequantize_blocks",
]

BLOCK_SIZE = 64
SCALE_BLOCK_SIZE = 256
# Elements handled at once while quantising: bounds the fp32 temporaries (≈ 16 bytes per element).
_QUANT_CHUNK = 1 << 22


def nf4_code_book(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The 16 NF4 values, ascending, from -1 to 1 with an exact 0 (QLoRA, section 3 and appendix E).

    k-bit NormalFloat takes quantiles of N(0, 1) so that each code holds an equal share of a normal
    weight's mass. To have an exact zero, the two halves are built apart: 8 positive values
    ``Φ⁻¹(p)`` for ``p`` evenly spaced from δ down to 1/2 (1/2 itself, that is 0, left out), 7
    negative ones likewise, and 0; then all are divided by ``Φ⁻¹(δ)``, to span [-1, 1].
    δ = ½ · ((1 - 1/(2·15)) + (1 - 1/(2·16))): the mean of the outermost quantile levels for 15
    and 16 codes, so the extreme codes are not at Φ⁻¹(1) = ∞.

    Returns a (16,) tensor in ``dtype`` (computed in float64).
    """
    delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    f64 = torch.float64
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=f64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=f64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=f64), positive]).sort().values
    return (values / values.max()).to(dtype=dtype, device=device)


def pack_4bit(codes: Tensor) -> Tensor:
    """(2k,) integer codes in [0, 16) -> (k,) uint8, element 2i in the high nibble of byte i."""
    if codes.numel() % 2:
        raise ValueError(f"pack_4bit: {codes.numel()} codes; expected an even number")
    c = codes.reshape(-1).to(torch.uint8)
    return (c[0::2] << 4) | c[1::2]


def unpack_4bit(packed: Tensor) -> Tensor:
    """(k,) uint8 -> (2k,) uint8 codes: the inverse of :func:`pack_4bit`."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)


@dataclass
class NF4Data:
    """The stored parts of one NF4 tensor.

    packed: (n_blocks · block_size / 2,) uint8 codes. scale_codes: (n_blocks,) int8 (double
    quantisation) or None; scale_absmax: (n_scale_blocks,) fp32 absmax of each group of centred
    scales, or, without double quantisation, the (n_blocks,) fp32 block scales themselves;
    scale_mean: () fp32 mean of the block scales (0 without double quantisation).
    shape: the original shape; numel: its element count (the tail past it is padding).
    """

    packed: Tensor
    scale_codes: Tensor | None
    scale_absmax: Tensor
    scale_mean: Tensor
    shape: torch.Size
    block_size: int = BLOCK_SIZE
    scale_block_size: int = SCALE_BLOCK_SIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return self.packed.numel() * 2 // self.block_size

    def block_scales(self) -> Tensor:
        """(n_blocks,) fp32: the dequantised block scales ŝ_b."""
        return dequantize_scales(
            self.scale_codes, self.scale_absmax, self.scale_mean, self.scale_block_size
        )

    def nbytes(self) -> int:
        parts = [self.packed, self.scale_absmax, self.scale_mean]
        if self.scale_codes is not None:
            parts.append(self.scale_codes)
        return sum(t.numel() * t.element_size() for t in parts)


def _check_block(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return value


def quantize_nf4(
    weight: Tensor,
    block_size: int = BLOCK_SIZE,
    scale_block_size: int = SCALE_BLOCK_SIZE,
    double_quant: bool = True,
) -> NF4Data:
    """Quantise ``weight`` (any shape, a floating dtype) to NF4; see the module docstring.

    Computed in fp32, ``_QUANT_CHUNK`` elements at a time. A size that does not divide by
    ``block_size`` is zero-padded to whole blocks (zeros change no block's absmax and decode to 0);
    the padding is dropped again by :func:`dequantize_nf4`. A block of zeros gets scale 0.

    Raises ``ValueError`` for an empty or non-floating weight or an odd or non-positive block_size;
    ``TypeError`` for a non-tensor.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight={type(weight).__name__}: expected a torch.Tensor")
    if not weight.is_floating_point():
        raise ValueError(
            f"weight dtype {weight.dtype}: expected a floating-point tensor to quantise"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: nothing to quantise")
    block_size = _check_block("block_size", block_size)
    scale_block_size = _check_block("scale_block_size", scale_block_size)
    if block_size % 2:
        raise ValueError(f"block_size={block_size}: expected an even size (two codes per byte)")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: it has no values to quantise")

    packed, scales = quantize_blocks(weight.detach().reshape(-1), block_size)
    if not double_quant:
        zero = torch.zeros((), dtype=torch.float32, device=weight.device)
        return NF4Data(packed, None, scales, zero, weight.shape, block_size, scale_block_size)
    codes8, absmax2, mean = quantize_scales(scales, scale_block_size)
    return NF4Data(packed, codes8, absmax2, mean, weight.shape, block_size, scale_block_size)


def quantize_blocks(flat: Tensor, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """The first stage of :func:`quantize_nf4` on a run of whole blocks: a 1-D floating ``flat``
    (its last block may be short: zero-padded) -> ((n_blocks · block_size / 2,) uint8 packed codes,
    (n_blocks,) fp32 block absmax). Each block depends on its own elements only, so the blocks
    ``b0:b1`` of a tensor quantised on their own are bitwise those of the whole tensor (the FSDP
    loader quantises each rank's blocks so); the double quantisation of the scales
    (:func:`quantize_scales`) needs them all."""
    n = flat.numel()
    n_blocks = -(-n // block_size)
    code_book = nf4_code_book(torch.float32, flat.device)
    # Nearest code = the number of midpoints below the value (a value on a midpoint takes the lower
    # code, as bitsandbytes' bucketize and torchao's argmin do).
    midpoints = (code_book[1:] + code_book[:-1]) / 2
    packed = torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=flat.device)
    scales = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    chunk_blocks = max(1, _QUANT_CHUNK // block_size)
    for b0 in range(0, n_blocks, chunk_blocks):
        b1 = min(n_blocks, b0 + chunk_blocks)
        part = flat[b0 * block_size : b1 * block_size].float()
        if part.numel() < (b1 - b0) * block_size:  # the padded last block
            part = torch.nn.functional.pad(part, (0, (b1 - b0) * block_size - part.numel()))
        blocks = part.view(b1 - b0, block_size)
        absmax = blocks.abs().amax(dim=1)
        scales[b0:b1] = absmax
        normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
        codes = torch.bucketize(normalised.reshape(-1), midpoints, out_int32=True)
        packed[b0 * block_size // 2 : b1 * block_size // 2] = pack_4bit(codes)
    return packed, scales


def quantize_scales(
    scales: Tensor, scale_block_size: int = SCALE_BLOCK_SIZE
) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation: (n_blocks,) fp32 scales -> (int8 codes (n_blocks,), fp32 group absmax
    (ceil(n_blocks / scale_block_size),), fp32 mean ()). The last group may be shorter."""
    mean = scales.mean()
    centred = scales - mean
    n = centred.numel()
    groups = -(-n // scale_block_size)
    padded = torch.nn.functional.pad(centred, (0, groups * scale_block_size - n)).view(
        groups, scale_block_size
    )
    absmax = padded.abs().amax(dim=1)
    factor = 128.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = (padded * factor.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8).reshape(-1)[:n]
    return codes, absmax, mean


def dequantize_scales(
    codes: Tensor | None, absmax: Tensor, mean: Tensor, scale_block_size: int = SCALE_BLOCK_SIZE
) -> Tensor:
    """The inverse of :func:`quantize_scales`: (n_blocks,) fp32 block scales. With ``codes`` None
    (no double quantisation) ``absmax`` holds the scales themselves."""
    if codes is None:
        return absmax.float()
    factor = 128.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    per_block = factor.repeat_interleave(scale_block_size)[: codes.numel()]
    return codes.float() / per_block + mean


def byte_pair_table(device, code_book: Tensor | None = None) -> Tensor:
    # (256, 2): the two decoded values of every byte, so decoding is one gather per byte.
    cb = nf4_code_book(torch.float32, device) if code_book is None else code_book
    byte = torch.arange(256, device=device)
    return torch.stack((cb[byte >> 4], cb[byte & 0x0F]), dim=1)


# Elements decoded per pass on a CPU: one pass's int32 indices and fp32 pairs (6 bytes an element,
# 1.5 MiB at 2^18) stay in the core's cache between the gather and the multiply. Decoding a
# (16384, 3072) weight to bf16 in one pass took 126-169 ms, in passes of 2^18 elements 30 ms, and
# with the pair gathered as one 8-byte word 18-21 ms (AMD EPYC, 2 threads, medians of 5). Other
# devices: one pass (the fewest kernel launches).
_CPU_DECODE_ELEMENTS = 1 << 18


def dequantize_blocks(
    data: NF4Data,
    b0: int,
    b1: int,
    dtype: torch.dtype,
    scales: Tensor | None = None,
    pair_table: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Blocks ``b0:b1`` of ``data`` decoded: ((b1 - b0) · block_size,) in ``dtype`` (fp32 math).

    ``scales`` / ``pair_table``: precomputed ``data.block_scales()`` / byte table, for reuse.
    ``out``: a contiguous ((b1 - b0) · block_size,) tensor in ``dtype`` to decode into (returned).
    Each element is its code's value times its block's scale, computed in fp32 and rounded once
    into ``dtype`` as it is stored, so any split of the blocks decodes bitwise the same.
    """
    bs = data.block_size
    device = data.packed.device
    scales = data.block_scales() if scales is None else scales
    table = byte_pair_table(device) if pair_table is None else pair_table
    # A byte's two fp32 values as one 8-byte word: the gather moves one element per byte.
    # (index_select, not table[...]: on a CPU advanced indexing is about 4x slower for it.)
    words = table.contiguous().view(torch.int64).view(-1)
    if out is None:
        out = torch.empty((b1 - b0) * bs, dtype=dtype, device=device)
    step = max(1, _CPU_DECODE_ELEMENTS // bs) if device.type == "cpu" else max(1, b1 - b0)
    for c0 in range(b0, b1, step):
        c1 = min(b1, c0 + step)
        codes = data.packed[c0 * bs // 2 : c1 * bs // 2].int()
        values = torch.index_select(words, 0, codes).view(torch.float32).view(c1 - c0, bs)
        dest = out[(c0 - b0) * bs : (c1 - b0) * bs].view(c1 - c0, bs)
        torch.mul(values, scales[c0:c1].unsqueeze(1), out=dest)
    return out


def dequantize_nf4(data: NF4Data, dtype: torch.dtype = torch.float32) -> Tensor:
    """The whole tensor decoded, in its original shape, in ``dtype``."""
    flat = dequantize_blocks(data, 0, data.n_blocks, dtype)
    return flat[: data.numel].view(data.shape)
