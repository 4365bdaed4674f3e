"""Reading and writing nucleus points: CSV and (QuPath) GeoJSON, chosen by the file extension.

See docs/formats.md for the formats and their coordinate conventions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from denuc.errors import InputError
from denuc.io.csv import read_csv, write_csv
from denuc.io.geojson import read_geojson, write_geojson
from denuc.nuclei import Nuclei, NucleusClass

_READERS = {".csv": read_csv, ".geojson": read_geojson, ".json": read_geojson}
_WRITERS = {".csv": write_csv, ".geojson": write_geojson, ".json": write_geojson}


def read_points(
    path: str | os.PathLike,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> Nuclei:
    """Read nucleus points from a .csv, .geojson or .json file (see ``read_csv`` and ``read_geojson``)."""
    return _by_extension(path, _READERS)(path, classes=classes, mpp=mpp, image_size=image_size)


def write_points(path: str | os.PathLike, nuclei: Nuclei) -> None:
    """Write nucleus points to a .csv, .geojson or .json file, atomically."""
    _by_extension(path, _WRITERS)(path, nuclei)


def _by_extension(path: str | os.PathLike, table: dict):
    suffix = Path(path).suffix.lower()
    if suffix not in table:
        expected = ", ".join(sorted(table))
        raise InputError(path, f"unknown point file type {suffix or '(no extension)'!r}; expected {expected}")
    return table[suffix]


__all__ = ["read_csv", "read_geojson", "read_points", "write_csv", "write_geojson", "write_points"]
