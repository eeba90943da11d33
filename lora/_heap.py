"""The C heap's free pages handed back to the system: :func:`trim_heap` (glibc ``malloc_trim``).

torch's CPU tensors come from malloc. glibc serves a block under its mmap threshold from the
heap, and raises that threshold as it frees larger mmapped blocks (up to 32 MiB): after the first
few activations are freed, every tensor of a decoder layer's step lives in the heap. Freed, their
pages stay resident; a long-lived block between free ones (a checkpointed layer's input, a
gradient) keeps the heap from shrinking, and later blocks that do not fit the holes grow it. So
the resident set carries the free space of the heap's highest point, on top of what is live. A
trim returns the free pages (not the live blocks); reusing them faults them in again.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["trim_heap"]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and macOS have none
    except (AttributeError, OSError):
        return None


def trim_heap() -> bool:
    """Return the free memory inside the C heap to the system (glibc ``malloc_trim(0)``: the
    free pages of every arena, not only its top); the live allocations are not touched. Returns
    whether the C library has it (False elsewhere: nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
