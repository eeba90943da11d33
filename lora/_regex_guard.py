"""Regexes that come from files (an adapter_config.json from the internet) are matched only when
their matching time is bounded.

Python's ``re`` backtracks: ``(.*.*)*X`` over a 40-character module name takes longer than the
universe's age, and there is no timeout to stop it. :func:`check_bounded_regex` accepts only
patterns whose worst case is polynomial and of low degree: no repetition nested inside another
repetition, no alternation or back-reference under a repetition, and at most
:data:`MAX_REPEATS` unbounded repetitions in all. Every target regex people write for LoRA
(``q_proj|v_proj``, ``.*\\.(q|v)_proj``, ``model\\.layers\\.\\d+\\.mlp\\..*``) passes.
"""

from __future__ import annotations

try:  # Python >= 3.11
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

__all__ = ["MAX_PATTERN_LENGTH", "MAX_REPEATS", "check_bounded_regex"]

MAX_PATTERN_LENGTH = 1000
MAX_REPEATS = 3
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT) + (
    (_c.POSSESSIVE_REPEAT,) if hasattr(_c, "POSSESSIVE_REPEAT") else ()
)


def check_bounded_regex(pattern: str, name: str) -> str:
    """Return ``pattern`` if matching it is cheap; else ``ValueError`` naming ``name`` and why.

    ``name`` says where the pattern is from, e.g. ``"target_modules"`` or ``"rank_pattern key"``.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(
            f"{name} {pattern[:40]!r}...: a regex of {len(pattern)} characters; "
            f"at most {MAX_PATTERN_LENGTH} are accepted from a file"
        )
    try:
        tree = _parser.parse(pattern)
    except Exception as e:  # re.error; anything else the parser raises means the same
        raise ValueError(f"{name} {pattern!r}: not a valid regular expression ({e})") from None
    count = [0]
    why = _walk(list(tree), inside_repeat=False, count=count)
    if why is None and count[0] > MAX_REPEATS:
        why = f"{count[0]} unbounded repetitions (at most {MAX_REPEATS})"
    if why is not None:
        raise ValueError(
            f"{name} {pattern!r}: refused, matching it could take unbounded time ({why}); "
            "list the module names instead"
        )
    return pattern


def _walk(items, inside_repeat: bool, count: list[int]) -> str | None:
    for op, arg in items:
        if op in _REPEATS:
            low, high, sub = arg
            if high == _c.MAXREPEAT or high > 1000:
                count[0] += 1
            if inside_repeat and high != 1:
                return "a repetition inside a repetition"
            why = _walk(list(sub), inside_repeat or high > 1, count)
            if why:
                return why
        elif op is _c.SUBPATTERN:
            why = _walk(list(arg[-1]), inside_repeat, count)
            if why:
                return why
        elif op is _c.BRANCH:
            if inside_repeat:
                return "an alternation inside a repetition"
            for branch in arg[1]:
                why = _walk(list(branch), inside_repeat, count)
                if why:
                    return why
        elif op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            return "a back-reference"
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            why = _walk(list(arg[1]), inside_repeat, count)
            if why:
                return why
        elif hasattr(_c, "ATOMIC_GROUP") and op is _c.ATOMIC_GROUP:
            why = _walk(list(arg), inside_repeat, count)
            if why:
                return why
    return None
