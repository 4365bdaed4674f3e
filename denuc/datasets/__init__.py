"""Annotated datasets of nucleus points, read from the user's own copy: ``get_dataset("brcam2c", root)``."""

from __future__ import annotations

import os

from denuc.datasets.base import SPLITS, Dataset, Sample
from denuc.datasets.brcam2c import BRCAM2C
from denuc.datasets.crchisto import CRCHisto
from denuc.datasets.points import PointsFolder
from denuc.errors import InputError

DATASETS: dict[str, type[Dataset]] = {cls.name: cls for cls in (BRCAM2C, CRCHisto, PointsFolder)}


def get_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """The dataset ``name`` ("brcam2c", "crchisto", or "points" for your own; any case) read from ``root``."""
    try:
        cls = DATASETS[name.lower()]
    except KeyError:
        raise InputError(name, f"unknown dataset; expected one of {sorted(DATASETS)}") from None
    return cls(root)


__all__ = ["BRCAM2C", "CRCHisto", "DATASETS", "PointsFolder", "SPLITS", "Dataset", "Sample", "get_dataset"]
