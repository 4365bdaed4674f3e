"""Annotated datasets of nucleus points, read from the user's own copy: ``get_dataset("brcam2c", root)``.

Each reader takes a dataset as its authors publish it (docs/formats.md lists the layouts, classes, pixel sizes
and splits); ``points`` is a folder of your own images and point files.
"""

from __future__ import annotations

import os

from denuc.datasets.base import SPLITS, Dataset, Sample
from denuc.datasets.brcam2c import BRCAM2C
from denuc.datasets.consep import CoNSeP
from denuc.datasets.crchisto import CRCHisto
from denuc.datasets.lizard import Lizard
from denuc.datasets.monuseg import MoNuSeg
from denuc.datasets.ocelot import OCELOT
from denuc.datasets.pannuke import PanNuke
from denuc.datasets.points import PointsFolder
from denuc.datasets.puma import PUMA
from denuc.errors import InputError

DATASETS: dict[str, type[Dataset]] = {
    cls.name: cls for cls in (BRCAM2C, CRCHisto, CoNSeP, MoNuSeg, PUMA, OCELOT, PanNuke, Lizard, PointsFolder)
}


def get_dataset(name: str, root: str | os.PathLike) -> Dataset:
    """The dataset ``name`` (a key of DATASETS, e.g. "brcam2c", "consep", "puma", or "points" for your own; any
    case) read from ``root``."""
    try:
        cls = DATASETS[name.lower()]
    except KeyError:
        raise InputError(name, f"unknown dataset; expected one of {sorted(DATASETS)}") from None
    return cls(root)


__all__ = ["BRCAM2C", "CRCHisto", "CoNSeP", "DATASETS", "Dataset", "Lizard", "MoNuSeg", "OCELOT", "PUMA", "PanNuke",
           "PointsFolder", "SPLITS", "Sample", "get_dataset"]
