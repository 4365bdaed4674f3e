"""Write files so that a reader never sees a half-written one: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


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
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
