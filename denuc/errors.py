"""Errors that name the user's file and the problem. The CLI turns them into one line and a non-zero exit."""

from __future__ import annotations

import errno
import os


class InputError(ValueError):
    """Bad input from the user: a file that cannot be read, a malformed row, a missing pixel size, ...

    ``source`` is the file or option at fault; empty when the command line as a whole is (nothing to process)."""

    def __init__(self, source: str | os.PathLike, problem: str, where: str | None = None) -> None:
        self.source = str(source)
        self.problem = problem
        self.where = where
        location = f"{self.source}: {where}" if where else self.source
        super().__init__(f"{location}: {problem}" if location else problem)


class OutputExistsError(InputError):
    """An output that a run would replace: refused unless the user says ``--overwrite`` (or ``--resume``)."""


class DiskFullError(OSError):
    """No space left on the device while writing ``path``: says how much space is free and, when known, how much
    the outputs need. An OSError (errno ENOSPC), so whoever handles a failed write handles it."""

    def __init__(self, path: str | os.PathLike, free: int, needed: int | None = None) -> None:
        wanted = f"; the outputs need about {_size(needed)}" if needed else ""
        super().__init__(errno.ENOSPC, f"no space left on the device while writing this file ({_size(free)} free"
                                       f"{wanted})", str(path))
        self.free, self.needed = free, needed

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def describe_os_error(error: OSError) -> str:
    """One line for an operating-system error: the file(s) it names, then what went wrong."""
    names = [os.fspath(name) for name in (error.filename, error.filename2) if name is not None]
    what = error.strerror or str(error)
    return f"{' -> '.join(names)}: {what}" if names else what


def _size(n: float) -> str:
    """Bytes in the largest decimal unit (up to GB) that keeps the number at 1 or more."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    return f"{n:.1f} {unit}"
