"""Atomic file writes: a reader sees either the old file or the complete new one, never half.

Every writer in the package (checkpoints, adapters, training state, metrics snapshots) goes
through here: write to a temporary file in the same directory, flush, fsync, rename over the
target, then fsync the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "fsync_dir",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode={mode!r}; expected 'w' or 'wb'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def atomic_save_safetensors(
    tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically. Tensors are made contiguous; shared storage is copied."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors sharing storage (tied weights); clone those.
    seen: dict[tuple[int, int], str] = {}
    for k, v in list(flat.items()):
        if v.device.type == "meta":
            raise ValueError(
                f"atomic_save_safetensors: tensor {k!r} is on the meta device; nothing to save"
            )
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            flat[k] = v.clone()
        elif key is not None:
            seen[key] = k
    atomic_write_bytes(path, save(flat, metadata=metadata))
