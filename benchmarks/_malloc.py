"""glibc's malloc counters (``mallinfo2``) for the memory benchmarks; imports nothing but ctypes,
so a script can read them before it imports torch."""

from __future__ import annotations

import ctypes
import functools


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None  # not glibc (or older than 2.33)
    fn.restype = _MallInfo2
    return fn


def mallinfo(unit: int = 2**20) -> dict[str, float] | None:
    """glibc's counters in ``unit`` bytes (MiB by default): ``mmapped`` (blocks malloc mmapped, in
    use), ``heap_used`` and ``heap_free`` (inside the arenas), ``heap`` (the arenas' total size).
    None without glibc's mallinfo2."""
    fn = _mallinfo2()
    if fn is None:
        return None
    m = fn()
    return dict(
        mmapped=m.hblkhd / unit,
        heap_used=m.uordblks / unit,
        heap_free=m.fordblks / unit,
        heap=m.arena / unit,
    )
