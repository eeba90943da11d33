"""Cheap activations recomputed in backward instead of kept: a saved-tensor scope.

Autograd keeps what each op saves for backward until that backward runs. Some of what a decoder
layer's ops save costs far more memory than it costs to compute again: the normalised
activation a LoRA layer keeps as its input (the norm's input is kept anyway, by the norm), the
SwiGLU output ``down_proj`` keeps (its input ``gate_up`` is kept anyway, by SwiGLU), the (b, s,
H·d) copy of the attention output that ``o_proj`` keeps (SDPA keeps the (b, H, s, d) original).
Inside a :func:`scope`, a tensor made by :func:`recomputable` is not kept by whoever saves it:
the saved slot holds how to make it again (the function and its arguments, which are kept
anyway), and backward calls the function again under ``no_grad`` when it needs the tensor. At
Phi-3-mini's shapes that is 34 of the ~102 KiB a token a decoder layer keeps in bf16.

The recomputation runs the same function on the same inputs, so it is bitwise what the forward
computed (for deterministic functions: all of the above are). It checks, as autograd does for
what it saves, that no input was modified in place since the forward, and raises otherwise.

This is torch's own mechanism (:class:`torch.autograd.graph.saved_tensors_hooks`), so it is
device agnostic. A scope steps aside (installs nothing; :func:`recomputable` then just computes)
when saved-tensor hooks are already active (activation checkpointing, ``save_on_cpu``, a user's
own), when they are disabled, and under ``torch.compile`` (inductor decides what it keeps).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["recomputable", "scope", "active"]

_ACTIVE: list[_Scope] = []  # the innermost scope last


def _hooks_in_use() -> bool:
    """Whether saved-tensor hooks are already installed or disabled (then a scope steps aside)."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if top is None or enabled is None:  # a torch without these: do not risk overriding hooks
        return True
    return top(False) is not None or not enabled()


class _Recipe:
    """What a saved slot holds instead of a tensor: the function, its arguments, and where the
    saved tensor (maybe a view) sits in the function's result."""

    __slots__ = ("fn", "args", "versions", "base", "view")

    def __init__(self, fn, args, versions, base, view) -> None:
        self.fn, self.args, self.versions, self.base, self.view = fn, args, versions, base, view

    def make(self) -> Tensor:
        for i, (a, v) in enumerate(zip(self.args, self.versions)):
            if isinstance(a, Tensor) and a._version != v:
                raise RuntimeError(
                    f"lora.models.recompute: argument {i} of {_name(self.fn)}, needed to recompute "
                    f"an activation for backward, was modified in place after the forward (version "
                    f"{a._version}, expected {v}); do not modify a layer's input in place while its "
                    "graph is alive"
                )
        with torch.no_grad():
            full = self.fn(*self.args)
        size, stride, offset = self.base
        if tuple(full.shape) != size or full.stride() != stride:
            raise RuntimeError(
                f"lora.models.recompute: {_name(self.fn)} recomputed a tensor of shape "
                f"{tuple(full.shape)} and strides {full.stride()}; the forward made {size} and "
                f"{stride}: it must be deterministic in layout"
            )
        v_size, v_stride, v_offset = self.view
        if (v_size, v_stride, v_offset) == (size, stride, offset):
            return full
        return full.as_strided(v_size, v_stride, full.storage_offset() + v_offset - offset)


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _geometry(t: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    return tuple(t.shape), t.stride(), int(t.storage_offset())


class _Scope:
    def __init__(self) -> None:
        # storage address -> (the tensor, weakly; the recipe's parts; the tensor's version)
        self.marks: dict[int, tuple[weakref.ref, Callable, tuple, tuple, int]] = {}

    def mark(self, t: Tensor, fn: Callable, args: tuple) -> None:
        versions = tuple(a._version if isinstance(a, Tensor) else None for a in args)
        self.marks[t.untyped_storage().data_ptr()] = (
            weakref.ref(t),
            fn,
            args,
            versions,
            t._version,
        )

    def pack(self, t: Tensor) -> Any:
        if not self.marks or t.layout != torch.strided or t.device.type == "meta":
            return t
        entry = self.marks.get(t.untyped_storage().data_ptr())
        if entry is None:
            return t
        ref, fn, args, versions, version = entry
        base = ref()
        # The marked tensor still alive means this storage is its storage (a view of it, or it);
        # an in-place change since it was made means the recipe no longer gives what is saved.
        if base is None or base._version != version or t._version != version:
            return t
        return _Recipe(fn, args, versions, _geometry(base), _geometry(t))

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        return saved.make() if isinstance(saved, _Recipe) else saved


def active() -> bool:
    """Whether a :func:`scope` is collecting recomputable activations here."""
    return bool(_ACTIVE) and not torch.compiler.is_compiling()


def recomputable(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``fn(*args)``; inside a :func:`scope`, whoever saves the result (or a view of it) for
    backward keeps ``fn`` and ``args`` instead, and backward calls ``fn(*args)`` again.

    ``fn`` must be deterministic (bitwise the same result and layout from the same inputs) and
    cheap next to what its result costs to keep; its tensor arguments should be kept for
    backward anyway (they are kept alive until then). Outside a scope it is just ``fn(*args)``.
    """
    out = fn(*args)
    if active() and isinstance(out, Tensor):
        _ACTIVE[-1].mark(out, fn, args)
    return out


@contextlib.contextmanager
def scope(enabled: bool = True) -> Iterator[bool]:
    """Within it, results of :func:`recomputable` are recomputed in backward instead of kept.

    Yields whether it took effect: not when ``enabled`` is False, when saved-tensor hooks are
    already in use or disabled, or under ``torch.compile``.
    """
    if not enabled or torch.compiler.is_compiling() or _hooks_in_use():
        yield False
        return
    s = _Scope()
    _ACTIVE.append(s)
    try:
        with torch.autograd.graph.saved_tensors_hooks(s.pack, s.unpack):
            yield True
    finally:
        _ACTIVE.pop()
        s.marks.clear()
