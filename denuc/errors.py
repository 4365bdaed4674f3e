"""Errors that name the user's file and the problem. The CLI turns them into a message and a non-zero exit."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input from the user: a file that cannot be read, a malformed row, a missing pixel size, ..."""

    def __init__(self, source: str | os.PathLike, problem: str, where: str | None = None) -> None:
        self.source = str(source)
        self.problem = problem
        self.where = where
        location = f"{self.source}: {where}" if where else self.source
        super().__init__(f"{location}: {problem}")
