"""One run per output directory: an exclusive ``fcntl.flock`` on ``<output_dir>/.lora-run.lock``.

    lock = OutputDirLock.acquire("out")   # OutputDirBusy naming the holder's PID if taken
    ...                                    # the whole run: recovery, training, checkpoints, merge
    lock.release()

The lock is held on an open file description, so the kernel drops it when the process dies, even
by ``kill -9``: a stale lock file never blocks a later run. The file itself is never deleted
(deleting a lock file lets two processes each lock a different inode). The holder writes its PID
into it so that a refused run can say who holds the directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["LOCK_FILE", "OutputDirBusy", "OutputDirLock", "check_output_dir"]

LOCK_FILE = ".lora-run.lock"


class OutputDirBusy(ValueError):
    """Another live process holds the output directory's lock."""


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Make sure ``output_dir`` is (or can become) a writable directory, before any work is done.

    Raises:
        ValueError: it is an existing file, or a parent is a file, or it cannot be created or
            written (read-only filesystem, permissions); the message names the path and the reason.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {str(path)!r} is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"--output {str(path)!r}: cannot create the directory ({_reason(e)})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--output {str(path)!r}: the directory is not writable")
    return path


def _reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


class OutputDirLock:
    """An exclusive, non-blocking lock on an output directory, held until :meth:`release`."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> OutputDirLock:
        """Lock ``output_dir`` (created if missing) for this process.

        Raises:
            OutputDirBusy: another process holds it; the message names that process's PID.
            ValueError: the directory cannot be created or written (see :func:`check_output_dir`).
        """
        import fcntl

        directory = check_output_dir(output_dir)
        path = directory / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(
                f"--output {str(directory)!r}: cannot create {LOCK_FILE} ({_reason(e)})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise OutputDirBusy(
                    f"output_dir {str(directory)!r} is in use by another run ({who}); "
                    "wait for it to finish or choose another --output"
                ) from None
            raise ValueError(
                f"--output {str(directory)!r}: cannot lock {LOCK_FILE} ({_reason(e)})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The PID is cleared so that it names no finished process."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
