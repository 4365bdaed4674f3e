"""Write files so that a reader never sees a half-written one: write to a temporary name, then rename. A full
disk is reported naming the file; Ctrl-C can be held while a set of files is renamed into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from denuc.errors import DiskFullError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# the mode a plain open() gives a new file; some writers (safetensors) create theirs 0600, unreadable to others
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming_full_disk(path):
            yield tmp
            if tmp.is_file():
                os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn "no space left on the device" in the block into a ``DiskFullError`` that names ``path`` (the file the
    block writes: the OS's error names none) and the space free there."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(path, free_bytes(path)) from None


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free on the file system that holds ``path`` (or its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has run, then deliver it: for steps that must finish together, such
    as renaming a set of outputs into place. Only the main thread handles signals; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # to the handler the block held it from (Python's: KeyboardInterrupt)


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
