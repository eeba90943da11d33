"""Dropout's mask for the fused LoRA linear: drawn from a seed, never stored, drawn again in backward.

:func:`lora.functional.lora_linear_fused` keeps an int seed for backward instead of a mask; this
module turns (shape, p, seed, device) into the same mask each time, chunk by chunk
(:class:`DropStream`), applies it, and reuses one scratch buffer per dtype and thread for the
masked chunks of x (:func:`chunk_buffer`).

How it picks its elements (i.i.d. Bernoulli(p) each), by device:

- CPU: the positions of the dropped elements, drawn as geometric gaps. A Bernoulli(p) sequence is
  the same as gaps between its ones that are i.i.d. Geometric(p) on {1, 2, ...}, and
  G = 1 + floor(E / -log(1 - p)) with E ~ Exponential(1) is one: P(G > k) = P(E > -k·log(1-p))
  = (1 - p)^k. That takes one draw per *dropped* element (p·n of them) instead of random bits
  for every element (at p = 0.05, 20x fewer), and the mask is applied by zeroing those positions
  (index_fill_) in a copy. The probability is p itself (to float64's resolution). E comes from
  numpy's ziggurat over an SFC64 generator seeded with the step's seed: at 78k gaps (512 x 3072,
  p = 0.05) the positions took 0.42 ms against 0.92 with torch's serial mt19937 drawing U and
  taking log(1 - U) (best of 80, one process, 2 threads).
- Elsewhere (CUDA): 16 random bits per element, four per Philox 64-bit draw (cheap there, one
  kernel, no host sync). An element is dropped iff its 16 bits, read as a signed int16 v,
  satisfy v < -32768 + round(65536·p): an exact Bernoulli(p') with p' = round(65536·p) / 65536.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["realised_dropout_p", "dropout_keep_mask", "DropStream", "chunk_buffer", "draw_seed"]

_MASK_BITS = 16
_MASK_LEVELS = 1 << _MASK_BITS


def _draws_positions(device: torch.device) -> bool:
    return device.type == "cpu"


def realised_dropout_p(p: float, device: torch.device | str = "cpu") -> float:
    """The drop probability the fused dropout really uses on ``device``.

    On CPU: ``p`` itself. On other devices (16 random bits an element): ``round(65536·p) / 65536``,
    within 2⁻¹⁷ of ``p`` (0.05 becomes 3277/65536 = 0.0500030...) and at most 1 - 2⁻¹⁶. The kept
    elements are scaled by ``1 / (1 - p')``, so E[dropout(x)] = x exactly either way.
    """
    if _draws_positions(torch.device(device)):
        return float(p)
    return min(round(p * _MASK_LEVELS), _MASK_LEVELS - 1) / _MASK_LEVELS


# On CPU the mask is drawn and applied in row chunks of at most this many elements (4 Mi: 1024
# tokens of 3072 features are one chunk), so that the masked copy of a long batch stays a bounded
# buffer. Each chunk costs three more skinny matmuls a step and its own draw of positions (bf16
# 3072->3072 at 512 tokens, p=0.05, over the frozen layer: 1.12x in one chunk against 1.20x in
# chunks of 2^18, medians of 15 interleaved). On CUDA: one chunk, the fewest kernel launches.
_CPU_CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(rows: int, cols: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(rows, 1)
    return max(1, min(rows, _CPU_CHUNK_ELEMENTS // max(cols, 1)))


class _Scratch(threading.local):
    """One reused CPU buffer per dtype (per thread) for the masked chunks of x (dx's masked
    adapter part is written into dx itself). Its contents are dead between uses: a layer's
    forward or backward fills it, reads it and is done with it before it returns. A fresh buffer each call costs its page
    faults: a new 8 MB (512 x 8192 bf16) chunk took 3 ms to fill inside a training step, 0.12 ms
    reused. At most one chunk (2^22 elements: 16 MB in fp32) a dtype stays allocated."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, Tensor] = {}


_scratch = _Scratch()


def chunk_buffer(rows: int, cols: int, like: Tensor) -> Tensor:
    """An uninitialised (rows, cols) buffer of ``like``'s dtype and device: on CPU the reused
    scratch (valid until the next call), elsewhere a fresh tensor (the caching allocator's)."""
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    n = rows * cols
    buf = _scratch.buffers.get(like.dtype)
    if buf is None or buf.numel() < n:
        buf = _scratch.buffers[like.dtype] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(rows, cols)


_GAP_MARGIN = (6.0, 16.0)  # standard deviations, and a constant (a test shrinks them)


def _position_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(seed))


def _dropped_positions(numel: int, p: float, rng: np.random.Generator) -> Tensor:
    """The sorted flat indices in [0, numel) that a Bernoulli(p) sequence drops (int64), drawn
    from ``rng`` as geometric gaps (the module's docstring). Deterministic in (numel, p, rng's state)."""
    scale = -1.0 / math.log1p(-p)  # E · scale, floored, plus 1: a Geometric(p) gap
    parts = []
    last = -1  # the last position drawn so far
    while True:
        mean = (numel - 1 - last) * p  # dropped elements expected in what is left
        # enough gaps but for a ~1e-9 chance (then draw on from the last position)
        m = max(1, int(mean + _GAP_MARGIN[0] * math.sqrt(mean) + _GAP_MARGIN[1]))
        e = rng.standard_exponential(m)
        # A gap past the end is as good as any longer one: capped, the int64 sums cannot overflow.
        np.minimum(np.multiply(e, scale, out=e), numel + 1, out=e)
        gaps = e.astype(np.int64)  # floor (e >= 0)
        gaps += 1
        gaps[0] += last  # counted from the last position drawn
        # The sum in torch: 7x faster than numpy's cumsum (25 against 168 us at 78k); the +1 in
        # numpy: inside a training step torch's elementwise op on it cost 10x its time alone.
        pos = torch.from_numpy(gaps).cumsum_(0)
        end = int(torch.searchsorted(pos, numel))  # the first position >= numel
        parts.append(pos[:end])
        if end < m:
            break
        last = int(pos[-1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class DropStream:
    """Which elements of a (rows, cols) input dropout drops, chunk by chunk in row order, from a
    private generator seeded with ``seed``. Iterating yields ``(start, n, m)``; ``apply(m, src,
    out)`` writes the chunk's (n, cols) ``src`` with its dropped elements zeroed into ``out``
    (contiguous; ``src`` may be ``out``). ``m``: the chunk's dropped positions (CPU) or its uint8
    keep-mask (1 = kept; a reused buffer, valid until the next step of the iteration)."""

    def __init__(self, rows: int, cols: int, p: float, seed: int, device: torch.device):
        self.rows, self.cols, self.p, self.seed, self.device = rows, cols, p, seed, device
        self.chunk = _chunk_rows(rows, cols, device)
        self.positions = _draws_positions(device)
        self.threshold = -(1 << 15) + round(realised_dropout_p(p, device) * _MASK_LEVELS)

    def __iter__(self):
        cols, chunk = self.cols, self.chunk
        if self.positions:
            rng = _position_rng(self.seed)
            for start in range(0, self.rows, chunk):
                n = min(chunk, self.rows - start)
                yield start, n, _dropped_positions(n * cols, self.p, rng)
            return
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        words = torch.empty((chunk * cols + 3) // 4, dtype=torch.int64, device=self.device)
        keep = torch.empty(chunk, cols, dtype=torch.bool, device=self.device)
        for start in range(0, self.rows, chunk):
            n = min(chunk, self.rows - start)
            w = words[: (n * cols + 3) // 4]
            # from=int64 min, to=None: all 64 bits random (random_'s full-range form).
            w.random_(-(1 << 63), None, generator=gen)
            lanes = w.view(torch.int16)[: n * cols].view(n, cols)
            yield start, n, torch.ge(lanes, self.threshold, out=keep[:n]).view(torch.uint8)

    def apply(self, m: Tensor, src: Tensor, out: Tensor) -> Tensor:
        if not self.positions:
            return torch.mul(src, m, out=out)
        if src is not out:
            out.copy_(src)
        out.view(-1).index_fill_(0, m, 0)
        return out


def dropout_keep_mask(
    shape: Sequence[int], p: float, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The boolean keep-mask (True = kept) that :func:`lora_linear_fused` uses for ``seed``.

    ``shape`` is the input's shape (..., in). Deterministic in (shape, p, seed, device type):
    backward draws it again instead of storing it. Each element is kept independently with
    probability ``1 - realised_dropout_p(p, device)``. The draws come from a private generator
    seeded with ``seed`` (on CPU numpy's SFC64, elsewhere a ``torch.Generator``); torch's global
    generator is not touched here.
    """
    device = torch.device(device)
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) else 1
    out = torch.ones(rows, cols, dtype=torch.uint8, device=device)
    stream = DropStream(rows, cols, p, seed, device)
    for start, n, m in stream:
        chunk = out[start : start + n]
        stream.apply(m, chunk, chunk)
    return out.bool().view(*shape)


def draw_seed() -> int:
    # From torch's global CPU generator, so the RNG state a trainer saves and restores (and that
    # torch.utils.checkpoint replays) fixes every mask: resume and recomputation stay bit-identical.
    return int(torch.randint(0, 1 << 62, (1,)).item())
