"""Chat records on disk: reading, validating, and the held-out split.

Three record shapes are accepted, one record per JSONL line, element of a JSON list, or row of a
parquet/arrow file (see :mod:`.sources` for the files, directories, globs and splits a spec names):

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: the format of
  ultrachat_200k's ``messages`` column. Other keys of the record (``prompt``, ``prompt_id``, ...)
  and of each message are ignored.
- ``{"instruction": str, "input": str (optional), "output": str}``: alpaca style, converted to one
  user turn (the instruction, then a blank line and the input when the input is not empty) and one
  assistant turn (the output).
- ``{"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}``: ShareGPT, converted
  to messages (``human`` -> ``user``, ``gpt`` -> ``assistant``; ``user``/``assistant`` are accepted
  too). Other keys are ignored.

Every malformed record becomes a :class:`RecordError` that names its file and line (and, for a JSON
list, the record index). The caller picks what happens to them: ``on_error="raise"`` raises one
:class:`DataError` listing all of them, ``on_error="skip"`` drops them and returns them so that the
count can be reported. Nothing is dropped without being returned.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import check_choice, listing

__all__ = [
    "ROLES",
    "Conversation",
    "RecordError",
    "DataError",
    "load_conversations",
    "parse_record",
    "check_on_error",
    "split_train_eval",
    "iter_conversations",
    "SHAREGPT_ROLES",
]

ROLES = ("system", "user", "assistant")
ON_ERROR_MODES = ("raise", "skip")
# ShareGPT's "from" values and the roles they become.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# A DataError's message lists this many problems; all of them are in ``.errors``.
_MAX_ERRORS_IN_MESSAGE = 100


@dataclass
class Conversation:
    """One validated conversation.

    ``messages`` are plain ``{"role", "content"}`` dicts (what chat templates are written against);
    ``path``, ``line`` (1-based) and ``index`` (position in a JSON list) say where the record came
    from, for problems found later (a template that fails on it, for instance).
    """

    messages: list[dict[str, str]]
    path: str = "<memory>"
    line: int | None = None
    index: int | None = None

    def __len__(self) -> int:
        return len(self.messages)

    def error(self, message: str) -> RecordError:
        """A :class:`RecordError` at this conversation's location."""
        return RecordError(self.path, self.line, message, self.index)

    @property
    def source(self) -> str:
        return self.error("").location


@dataclass(frozen=True)
class RecordError:
    """A problem with one record: where it is and what is wrong.

    ``line`` is 1-based; ``index`` is the 0-based position of the record in a JSON list (``None`` for
    JSONL). Either may be ``None`` when the problem concerns the whole file.
    """

    path: str
    line: int | None
    message: str
    index: int | None = None

    @property
    def location(self) -> str:
        if self.index is not None:
            where = f"record {self.index}"
            return (
                f"{self.path}: {where} (line {self.line})"
                if self.line is not None
                else f"{self.path}: {where}"
            )
        if self.line is not None:
            return f"{self.path}:{self.line}"
        return self.path

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class DataError(ValueError):
    """Malformed training data. ``errors`` holds every :class:`RecordError` found (not only the first)."""

    def __init__(self, errors: Sequence[RecordError], header: str | None = None):
        self.errors: list[RecordError] = list(errors)
        n = len(self.errors)
        header = header or f"{n} malformed record{'s' if n != 1 else ''}"
        note = " (all of them are in DataError.errors)"
        lines = listing(self.errors, _MAX_ERRORS_IN_MESSAGE, "\n  ", note=note)
        super().__init__(header + (":\n  " + lines if self.errors else ""))


def check_on_error(on_error: str) -> None:
    """Raise ``ValueError`` unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    check_choice(on_error, ON_ERROR_MODES, "on_error")


# --------------------------------------------------------------------------------------------------
# One record -> messages
# --------------------------------------------------------------------------------------------------


def parse_record(record: Any) -> list[dict[str, str]]:
    """Validate one decoded JSON record and return its messages.

    Args:
        record: a ``messages`` record or an alpaca ``instruction``/``input``/``output`` record.

    Returns:
        A new list of ``{"role", "content"}`` dicts (extra keys dropped).

    Raises:
        ValueError: with a one-line description of the first problem found: the record is not an
            object, has neither shape, a message is not an object, a role is unknown, a content is
            not a string or is empty (only whitespace), or there is no assistant turn.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"record is a JSON {_json_type(record)}; expected an object with 'messages' "
            "or 'instruction'/'output'"
        )
    if "messages" in record:
        return _parse_messages(record["messages"])
    if "conversations" in record:
        return _parse_messages(_sharegpt_to_messages(record["conversations"]))
    if "instruction" in record or "output" in record:
        return _parse_alpaca(record)
    keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
    raise ValueError(
        f"record has neither 'messages' nor 'instruction'/'output' nor ShareGPT "
        f"'conversations' (keys: {keys})"
    )


def _sharegpt_to_messages(turns: Any) -> list:
    """ShareGPT turns -> ``{"role", "content"}`` dicts (checked afterwards like any messages)."""
    if not isinstance(turns, list):
        raise ValueError(
            f"'conversations' is a JSON {_json_type(turns)}; expected a list of "
            '{"from", "value"} objects'
        )
    out: list = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(
                f"{where} is a JSON {_json_type(turn)}; expected an object with 'from' and 'value'"
            )
        if "from" not in turn:
            raise ValueError(f"{where} has no 'from'")
        source = turn["from"]
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            raise ValueError(
                f"{where}.from={source!r} is unknown; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        if "value" not in turn:
            raise ValueError(f"{where} ({source}) has no 'value'")
        out.append({"role": SHAREGPT_ROLES[source], "content": turn["value"]})
    return out


def _parse_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise ValueError(
            f"'messages' is a JSON {_json_type(messages)}; expected a list of "
            '{"role", "content"} objects'
        )
    if not messages:
        raise ValueError("'messages' is empty; expected at least one user and one assistant turn")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(
                f"{where} is a JSON {_json_type(message)}; expected an object with 'role' and 'content'"
            )
        if "role" not in message:
            raise ValueError(f"{where} has no 'role'")
        role = message["role"]
        if not isinstance(role, str):
            raise ValueError(
                f"{where}.role is a JSON {_json_type(role)}; expected one of {', '.join(ROLES)}"
            )
        if role not in ROLES:
            raise ValueError(
                f"{where}.role={role!r} is unknown; expected one of {', '.join(ROLES)}"
            )
        if "content" not in message:
            raise ValueError(f"{where} ({role}) has no 'content'")
        content = message["content"]
        if not isinstance(content, str):
            raise ValueError(
                f"{where}.content ({role}) is a JSON {_json_type(content)}; expected a string"
            )
        if not content.strip():
            raise ValueError(f"{where}.content ({role}) is empty")
        try:  # JSON's \ud800-style escapes can leave half a surrogate pair, which no tokenizer takes
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where}.content ({role}) holds a lone surrogate {content[e.start]!r} at "
                f"character {e.start}; expected valid Unicode text"
            ) from None
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant turn: nothing to train on")
    return out


def _parse_alpaca(record: dict) -> list[dict[str, str]]:
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        if key not in record or record[key] is None:
            if required:
                raise ValueError(f"alpaca record has no {key!r}")
            fields[key] = ""
            continue
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"alpaca {key!r} is a JSON {_json_type(value)}; expected a string")
        if required and not value.strip():
            raise ValueError(f"alpaca {key!r} is empty")
        fields[key] = value
    user = fields["instruction"]
    if fields["input"].strip():
        user = f"{user}\n\n{fields['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# Files -> records
# --------------------------------------------------------------------------------------------------


@dataclass
class _RawRecord:
    line: int | None
    index: int | None
    value: Any = None
    error: str | None = None


def _iter_jsonl(data: bytes) -> Iterator[_RawRecord]:
    # Split on b"\n" only: str.splitlines would also split on U+2028 and friends, which may appear
    # unescaped inside a JSON string.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _RawRecord(lineno, None, error=f"not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            yield _RawRecord(lineno, None, value=json.loads(text))
        except json.JSONDecodeError as e:
            yield _RawRecord(lineno, None, error=f"bad JSON: {e.msg} (column {e.colno})")


def _iter_json_list(text: str) -> Iterator[_RawRecord]:
    """Decode a JSON array element by element, so that each record knows its line."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = skip_ws(text.index("[") + 1)
    index = 0
    if pos < n and text[pos] == "]":
        pos = skip_ws(pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                # A syntax error inside the list: the rest cannot be resynchronised reliably.
                yield _RawRecord(
                    e.lineno,
                    index,
                    error=f"bad JSON: {e.msg} (column {e.colno}); "
                    "the rest of the file was not read",
                )
                return
            yield _RawRecord(line_of(pos), index, value=value)
            index += 1
            pos = skip_ws(end)
            if pos < n and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos = skip_ws(pos + 1)
                break
            got = repr(text[pos]) if pos < n else "end of file"
            yield _RawRecord(
                line_of(pos),
                None,
                error=f"bad JSON: expected ',' or ']' after record {index - 1}, "
                f"got {got}; the rest of the file was not read",
            )
            return
    if pos < n:
        yield _RawRecord(line_of(pos), None, error="bad JSON: extra data after the closing ']'")


def _iter_file(path: Path) -> Iterator[_RawRecord]:
    data = path.read_bytes()
    stripped = data.lstrip()
    if stripped.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        stripped = stripped[3:].lstrip()
    if stripped.startswith(b"["):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield _RawRecord(
                data.count(b"\n", 0, e.start) + 1,
                None,
                error=f"not valid UTF-8 ({e.reason} at byte {e.start})",
            )
            return
        yield from _iter_json_list(text)
    else:
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        yield from _iter_jsonl(data)


def iter_conversations(files) -> Iterator[Conversation | RecordError]:
    """Each record of ``files`` (:class:`~lora.data.sources.DataFile` s, in order), validated: a
    :class:`Conversation`, or a :class:`RecordError` naming the file and line (JSON) or row
    (parquet/arrow, 0-based, shown as ``record N``). Streams: one file, or one batch of rows, at a
    time is in memory.

    Raises:
        ImportError: a parquet/arrow file and no pyarrow (the message names ``lora[data]``).
    """
    from .sources import iter_arrow_rows

    for data_file in files:
        name = str(data_file.path)
        if data_file.kind == "json":
            raws: Iterable[_RawRecord] = _iter_file(data_file.path)
        else:
            # A null column value is an absent key, as in a JSON record without it.
            raws = (
                _RawRecord(None, row, value={k: v for k, v in rec.items() if v is not None})
                for row, rec in iter_arrow_rows(data_file)
            )
        for raw in raws:
            if raw.error is None:
                try:
                    messages = parse_record(raw.value)
                except ValueError as e:
                    raw.error = str(e)
            if raw.error is not None:
                yield RecordError(name, raw.line, raw.error, raw.index)
            else:
                yield Conversation(messages, name, raw.line, raw.index)


def load_conversations(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    on_error: str = "raise",
) -> tuple[list[Conversation], list[RecordError]]:
    """Read and validate chat records from files, directories or globs (see :mod:`.sources`).

    The JSON format is sniffed from the content, not the extension: a file whose first non-blank
    byte is ``[`` is a JSON list of records, anything else is JSONL (one record per line, blank lines
    ignored). ``.parquet`` and ``.arrow`` files are read with pyarrow (``pip install lora[data]``).

    Args:
        paths: one spec or several; records keep file order, then line (row) order.
        on_error: ``"raise"``: any malformed record raises :class:`DataError` listing all of them
            (the whole files are checked first); ``"skip"``: malformed records are left out and
            returned as the second element.

    Returns:
        ``(conversations, errors)``; ``errors`` is empty unless ``on_error="skip"``.

    Raises:
        ValueError: ``on_error`` is not ``"raise"`` or ``"skip"``; a bad spec (see
            :func:`~lora.data.sources.resolve_data_files`).
        FileNotFoundError: a path does not exist.
        ImportError: parquet/arrow data without pyarrow.
        DataError: malformed records with ``on_error="raise"``; or no valid record at all (in
            either mode), since training on nothing is never what was meant.
    """
    from .sources import resolve_data_files

    check_on_error(on_error)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("paths is empty; expected at least one data file")
    files = resolve_data_files(paths)
    conversations: list[Conversation] = []
    errors: list[RecordError] = []
    for item in iter_conversations(files):
        (errors if isinstance(item, RecordError) else conversations).append(item)
    names = ", ".join(str(p) for p in paths)
    if errors and on_error == "raise":
        raise DataError(
            errors, f"{len(errors)} malformed record{'s' if len(errors) != 1 else ''} in {names}"
        )
    if not conversations:
        raise DataError(errors, f"no valid record in {names}")
    return conversations, errors


# --------------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------------


def split_train_eval(
    items: Sequence[Any], eval_fraction: float, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Split ``items`` into (train, eval), deterministically from ``seed``.

    ``round(eval_fraction * len(items))`` items, at least 1 when ``eval_fraction > 0`` and at least
    one item is left for training, are drawn by a seeded permutation; both parts keep the original
    order. The same ``(items, eval_fraction, seed)`` always gives the same split.

    Raises:
        ValueError: ``eval_fraction`` is not in ``[0, 1)``, or ``items`` has fewer than 2 items
            while ``eval_fraction > 0``.
    """
    if not (0.0 <= eval_fraction < 1.0):
        raise ValueError(f"eval_fraction={eval_fraction!r}; expected a number in [0, 1)")
    n = len(items)
    if eval_fraction == 0.0:
        return list(items), []
    if n < 2:
        raise ValueError(
            f"cannot hold out eval_fraction={eval_fraction} of {n} item(s); expected at least 2"
        )
    n_eval = min(max(1, round(eval_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [x for i, x in enumerate(items) if i not in held_out]
    evals = [x for i, x in enumerate(items) if i in held_out]
    return train, evals
