"""Where chat records come from: files, directories, globs, splits; JSONL, JSON, parquet, and
``datasets.save_to_disk`` directories.

A data *spec* (what ``--data`` / ``--eval-data`` take) is one string or path, or several. Each is

- a file: JSONL or a JSON list (sniffed from the content), or ``.parquet`` / ``.arrow``;
- a directory: every data file under it, in sorted order (``.jsonl``, ``.json``, ``.parquet``,
  ``.arrow``), or, if it holds ``dataset_dict.json`` or ``state.json``, a directory that
  ``datasets.save_to_disk`` wrote;
- a glob (``data/train_sft-*.parquet``, ``shards/**/*.jsonl``), expanded in sorted order;
- any of the directory forms followed by ``:SPLIT`` (``ultrachat_200k:train_sft``): only that split.

Split names come from the layout: Hub-style shard names (``train_sft-00000-of-00003.parquet``,
``data/test_sft-....parquet``), a ``DatasetDict``'s splits, or a subdirectory (of the directory or
of its ``data/``) named like a split: ``train``, ``test``, ``validation``, ``dev``, ``eval``, ...,
optionally with a suffix (``train_sft``). Other subdirectories are plain parts of the data.
A directory that holds several splits must be given one (training on test data by accident is
never what was meant), and the error lists them.

Parquet and Arrow files are read with pyarrow, an optional extra (``pip install lora[data]``); they
are read in batches of rows, so memory stays bounded by the batch, not by the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DATA_SUFFIXES", "DataFile", "resolve_data_files", "iter_arrow_rows", "require_pyarrow"]

JSON_SUFFIXES = (".jsonl", ".json")
ARROW_SUFFIXES = (".parquet", ".arrow")
DATA_SUFFIXES = JSON_SUFFIXES + ARROW_SUFFIXES
# Columns a chat record can use; other columns of a parquet/arrow file are not even read.
RECORD_COLUMNS = ("messages", "conversations", "instruction", "input", "output")
# Hub shard names: "train_sft-00000-of-00003.parquet", "test-00000-of-00001-4f0c9a.parquet".
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")
# Directory names taken for splits; other subdirectories are just part of the data.
_SPLIT_DIR = re.compile(r"^(train|test|val|valid|validation|dev|eval)([_-][A-Za-z0-9]+)?$")
_GLOB_CHARS = re.compile(r"[*?\[]")
ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class DataFile:
    """One file to read. ``kind``: ``"json"`` (JSONL or JSON list), ``"parquet"``, or ``"arrow"``
    (the Arrow IPC stream format that ``datasets.save_to_disk`` writes)."""

    path: Path
    kind: str

    def __str__(self) -> str:
        return str(self.path)


def require_pyarrow(what: str):
    """Import pyarrow, or raise ``ImportError`` naming the extra that installs it."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError(
            f"reading {what} needs pyarrow, which is not installed; "
            "install the data extra: pip install lora[data]"
        ) from None
    return pyarrow


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    return "json"


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file belongs to: from its Hub shard name, or from a directory below ``root``
    (or below ``root/data``) named like a split (``train``, ``test_sft``, ``validation``, ...)."""
    match = _SHARD_NAME.match(path.name)
    if match:
        return match.group("split")
    rel = path.relative_to(root).parts[:-1]
    if rel and rel[0] == "data":
        rel = rel[1:]
    if rel and _SPLIT_DIR.match(rel[0]):
        return rel[0]
    return None


def _save_to_disk_files(directory: Path, split: str | None, spec: str) -> list[DataFile] | None:
    """The arrow files of a ``datasets.save_to_disk`` directory, or None if it is not one."""
    if (directory / "dataset_dict.json").is_file():
        try:
            splits = list(
                json.loads((directory / "dataset_dict.json").read_text("utf-8"))["splits"]
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"data {spec!r}: dataset_dict.json is not readable ({e})") from None
        if split is None:
            if len(splits) != 1:
                raise ValueError(
                    f"data {spec!r} holds the splits {', '.join(splits)}; "
                    f"expected one of them named, e.g. {spec}:{splits[0]}"
                )
            split = splits[0]
        if split not in splits:
            raise ValueError(
                f"data {spec!r} has no split {split!r}; its splits: {', '.join(splits)}"
            )
        files = _save_to_disk_files(directory / split, None, f"{spec}:{split}")
        if files is None:
            raise ValueError(f"data {spec!r}: split {split!r} has no state.json")
        return files
    if (directory / "state.json").is_file():
        if split is not None:
            raise ValueError(
                f"data {spec!r} is a single dataset without splits; got split {split!r}"
            )
        try:
            state = json.loads((directory / "state.json").read_text("utf-8"))
            names = [entry["filename"] for entry in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"data {spec!r}: state.json is not readable ({e})") from None
        return [DataFile(directory / name, "arrow") for name in names]
    return None


def _directory_files(directory: Path, split: str | None, spec: str) -> list[DataFile]:
    saved = _save_to_disk_files(directory, split, spec)
    if saved is not None:
        return saved
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    by_split: dict[str | None, list[Path]] = {}
    for path in files:
        by_split.setdefault(_split_of(path, directory), []).append(path)
    named = sorted(s for s in by_split if s is not None)
    if split is not None:
        if split not in by_split:
            raise ValueError(
                f"data {spec!r} has no split {split!r}; "
                f"its splits: {', '.join(named) or 'none (no split names in it)'}"
            )
        files = by_split[split]
    elif len(named) > 1:
        raise ValueError(
            f"data {spec!r} holds the splits {', '.join(named)}; "
            f"expected one of them named, e.g. {spec}:{named[0]}"
        )
    if not files:
        raise FileNotFoundError(
            f"data directory {spec!r} holds no data file ({', '.join(DATA_SUFFIXES)})"
        )
    return [DataFile(p, _kind(p)) for p in files]


def _resolve_one(spec: str) -> list[DataFile]:
    path = Path(spec)
    if path.is_file():
        return [DataFile(path, _kind(path))]
    if path.is_dir():
        return _directory_files(path, None, spec)
    if ":" in spec:
        base, split = spec.rsplit(":", 1)
        if split and "/" not in split and Path(base).is_dir():
            return _directory_files(Path(base), split, base)
    if _GLOB_CHARS.search(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise FileNotFoundError(f"data {spec!r}: the pattern matches no file")
        return [DataFile(p, _kind(p)) for p in files]
    raise FileNotFoundError(f"data file {spec!r} does not exist or is not a file")


def resolve_data_files(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[DataFile]:
    """Expand a data spec (see the module docstring) into the files to read, in order.

    Raises:
        ValueError: ``spec`` is empty; a directory holds several splits and none was named, or the
            named split is not there; a ``datasets`` directory's json files are unreadable.
        FileNotFoundError: a path does not exist, a pattern matches nothing, a directory has no
            data file.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ValueError("data is empty; expected at least one file, directory or pattern")
    out: list[DataFile] = []
    for item in specs:
        out += _resolve_one(os.fspath(item))
    return list(dict.fromkeys(out))  # a file named twice (a glob and its name) is read once


# --------------------------------------------------------------------------------------------------
# Parquet / Arrow rows
# --------------------------------------------------------------------------------------------------


def _arrow_batches(data_file: DataFile) -> Iterator[Any]:
    """pyarrow RecordBatches of the record columns of one parquet or arrow file."""
    pa = require_pyarrow(f"{data_file.path} ({data_file.kind})")
    if data_file.kind == "parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(data_file.path)
        columns = [c for c in reader.schema_arrow.names if c in RECORD_COLUMNS]
        if not columns:
            raise ValueError(
                f"data file {str(data_file.path)!r} has the columns "
                f"{', '.join(reader.schema_arrow.names)}; expected 'messages', "
                "'conversations' or 'instruction'/'output'"
            )
        yield from reader.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)
        return
    import pyarrow.ipc as ipc

    with pa.memory_map(str(data_file.path)) as source:
        try:
            reader = ipc.open_stream(source)
        except pa.ArrowInvalid:  # the file format rather than the stream format
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            columns = [c for c in batch.schema.names if c in RECORD_COLUMNS]
            yield batch.select(columns) if columns else batch


def iter_arrow_rows(data_file: DataFile) -> Iterator[tuple[int, Any]]:
    """``(row, record)`` for each row of a parquet/arrow file: ``row`` is 0-based, ``record`` a dict
    of the row's record columns (``messages`` stays a list of dicts, as in JSON).

    Raises:
        ImportError: pyarrow is missing (the message names ``pip install lora[data]``).
        ValueError: the file has none of the record columns.
    """
    row = 0
    for batch in _arrow_batches(data_file):
        for record in batch.to_pylist():
            yield row, record
            row += 1
