"""The checks and problem reports every config and loader shares (the bottom of the package: it
imports nothing of lora).

- Argument checks that raise an error naming the argument, the value and what was expected:
  :func:`check_rank`, :func:`check_alpha`, :func:`check_dropout`, :func:`check_positive_int`,
  :func:`check_choice`, :func:`check_str_list`.
- :func:`listing`: the "first N problems ... and M more" text of every report.
- :func:`sort_keys`: the "known / ignored / unknown key" rule of every config read from a file.
- The constants several rooms use: :data:`BIAS_MODES`, :data:`IGNORE_INDEX`.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection, Mapping, Sequence
from typing import Any, cast

__all__ = [
    "BIAS_MODES",
    "IGNORE_INDEX",
    "check_rank",
    "check_alpha",
    "check_dropout",
    "check_positive_int",
    "check_checkpoint_layers",
    "check_str_list",
    "check_choice",
    "listing",
    "sort_keys",
]

BIAS_MODES = ("none", "all", "lora_only")  # which biases train with the adapter (PEFT's `bias`)
IGNORE_INDEX = -100  # the label value that takes no part in the loss (transformers' convention)


# --- argument checks ------------------------------------------------------------------------
def check_rank(r, name: str = "r") -> int:
    """Return ``r`` as an int; ``TypeError`` unless an integer, ``ValueError`` if negative."""
    if isinstance(r, bool):
        raise TypeError(f"{name}={r!r}: expected a non-negative int (the LoRA rank), got a bool")
    try:
        value = operator.index(r)
    except TypeError:
        raise TypeError(
            f"{name}={r!r}: expected a non-negative int (the LoRA rank), got {type(r).__name__}"
        ) from None
    if value < 0:
        raise ValueError(f"{name}={r!r}: expected a non-negative int (the LoRA rank)")
    return value


def check_alpha(lora_alpha, name: str = "lora_alpha", zero_ok: bool = False) -> float:
    """Return ``lora_alpha`` as given (an int stays an int); ``TypeError`` unless a finite real,
    ``ValueError`` for 0 unless ``zero_ok`` (a layer of rank 0, which has no adapter). A
    negative alpha is accepted: it flips the sign of the update, as in PEFT."""
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, numbers.Real)
        or not math.isfinite(lora_alpha)
    ):
        raise TypeError(f"{name}={lora_alpha!r}: expected a finite real number")
    if lora_alpha == 0 and not zero_ok:
        # scaling = alpha / r = 0: the adapter never changes the output, and since B's gradient
        # is scaled by it too, training would run, report a loss and learn nothing.
        raise ValueError(
            f"{name}={lora_alpha!r}: expected a nonzero number (scaling = lora_alpha / r; with 0 "
            "the adapter adds nothing and its B gets no gradient, so training would learn nothing)"
        )
    return cast(float, lora_alpha)  # as given: configs write an int alpha back as an int


def check_dropout(p, name: str = "lora_dropout") -> float:
    """Return ``p`` as a float; ``TypeError`` unless a real, ``ValueError`` outside [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name}={p!r}: expected a float in [0, 1)")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name}={p!r}: expected a float in [0, 1)")
    return float(p)


def check_positive_int(value, name: str) -> int:
    """Return ``value``; ``ValueError`` unless a positive int (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return value


def check_checkpoint_layers(value, name: str) -> int | None:
    """Return ``value``: how many decoder layers to checkpoint, from the first (an int >= 0), or
    None for all of them; else ``ValueError``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            f"{name}={value!r}: expected how many decoder layers to checkpoint, from the first "
            "(an int >= 0), or None for all of them"
        )
    return value


def check_str_list(value, name: str) -> list[str]:
    """Return ``value`` (a list, tuple or set of non-empty strings) as a list; else ``TypeError``."""
    if not isinstance(value, (list, tuple, set)) or not all(
        isinstance(v, str) and v for v in value
    ):
        raise TypeError(f"{name}={value!r}: expected a list of non-empty strings")
    return list(value)


def check_choice(value, choices: Sequence[Any], name: str) -> Any:
    """Return ``value``; ``ValueError`` naming the choices unless it is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return value


# --- reports -----------------------------------------------------------------------------------
def listing(
    problems: Sequence[Any],
    limit: int = 20,
    sep: str = ", ",
    more_sep: str | None = None,
    note: str = "",
) -> str:
    """The first ``limit`` problems joined by ``sep``, then ``"... and M more"`` (after
    ``more_sep``, default ``sep``; ``note`` appended) when there are more."""
    text = sep.join(str(p) for p in problems[:limit])
    if len(problems) > limit:
        text += f"{sep if more_sep is None else more_sep}... and {len(problems) - limit} more{note}"
    return text


# --- config keys ---------------------------------------------------------------------------------
def sort_keys(
    d: Mapping[str, Any],
    known: Collection[str],
    ignored: Mapping[str, tuple | None],
    where: str,
    off_values: tuple | None = None,
    supported_hint: bool = False,
) -> dict[str, Any]:
    """The entries of ``d`` whose key is ``known`` (the config's own fields), checking the others.

    A key in ``ignored`` is dropped while its value is one of those listed (None: any value), else a
    ``ValueError`` ("not supported"). Any other key is a ``ValueError`` naming it ("unknown key"),
    unless ``off_values`` is given and its value is one of them (a key a newer writer added for a
    feature that is off). ``where`` starts every message (e.g. ``"training_config"``); with
    ``supported_hint`` the unknown-key message lists the supported and ignored keys.
    """
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key in known:
            kwargs[key] = value
        elif key in ignored:
            allowed = ignored[key]
            if allowed is not None and value not in allowed:
                raise ValueError(
                    f"{where} {key}={value!r}: not supported "
                    f"(accepted: {', '.join(map(repr, allowed))})"
                )
        elif off_values is not None and value in off_values:
            continue
        else:
            hint = ""
            if supported_hint:
                hint = (
                    f"; supported: {', '.join(sorted(known))} "
                    f"(and, ignored: {', '.join(sorted(ignored))})"
                )
            raise ValueError(f"{where} has an unknown key {key!r}{hint}")
    return kwargs
