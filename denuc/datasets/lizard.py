"""Lizard (Graham et al., ICCV Workshops 2021): colon H&E regions at 20x, 0.5 um/px, with every nucleus labelled.

Layout under the root, the release's three zips unpacked side by side (warwick.ac.uk/fac/cross_fac/tia/data/lizard):
``lizard_images1/Lizard_Images1/<name>.png``, ``lizard_images2/Lizard_Images2/<name>.png``,
``lizard_labels/Lizard_Labels/Labels/<name>.mat`` and ``lizard_labels/Lizard_Labels/info.csv`` (the inner folders
directly under the root are accepted too). A label file holds (``read_label.py`` of the release) ``inst_map`` (H, W),
``id`` (N, 1), the instance ids of the map, and per id ``class`` (N, 1), ``bbox`` (N, 4) and ``centroid`` (N, 2),
ordered **(x, y)**. The centroids are taken as 0-based pixel centres, as the release's code (HoVer-Net's tools)
computes them; ``inst_map`` and ``bbox`` are not read.

Classes: 1 neutrophil, 2 epithelial, 3 lymphocyte, 4 plasma, 5 eosinophil, 6 connective (the release's readme
lists class 5 as "Neutrophil" a second time: a typo; the paper's class 5 is eosinophil).

Split: ``info.csv`` gives each image (``Filename``, ``Source``, ``Split``) one of the paper's three folds; fold 1 is
``train``, 2 ``val``, 3 ``test``. Fold 3 holds every CoNSeP-derived image (``consep_*``, from both CoNSeP splits)
and every PanNuke-derived one: do not train on CoNSeP or PanNuke and test on Lizard's fold 3.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from denuc.datasets.base import Dataset, Sample, read_image_size, read_mat
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import Nuclei, NucleusClass

CLASS_IDS = {
    1: NucleusClass("neutrophil", (0, 0, 0)),
    2: NucleusClass("epithelial", (0, 255, 0)),
    3: NucleusClass("lymphocyte", (255, 0, 0)),
    4: NucleusClass("plasma", (0, 191, 255)),
    5: NucleusClass("eosinophil", (0, 0, 255)),
    6: NucleusClass("connective", (255, 255, 0)),
}
SPLIT_OF_FOLD = {"1": "train", "2": "val", "3": "test"}
IMAGE_FOLDERS = ("lizard_images1/Lizard_Images1", "lizard_images2/Lizard_Images2", "Lizard_Images1", "Lizard_Images2")
LABEL_FOLDERS = ("lizard_labels/Lizard_Labels", "Lizard_Labels")


class Lizard(Dataset):
    """Lizard from a copy of the Warwick TIA release at ``root``."""

    name = "lizard"
    classes = tuple(CLASS_IDS.values())
    mpp = 0.5

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        labels = [self.root / f for f in LABEL_FOLDERS if (self.root / f / "info.csv").is_file()]
        if not labels:
            raise InputError(self.root, f"not a Lizard copy: no {LABEL_FOLDERS[0]}/info.csv")
        self._labels = labels[0]
        self._image_folders = [self.root / f for f in IMAGE_FOLDERS if (self.root / f).is_dir()]
        self._split_of = read_info(self._labels / "info.csv")

    def _split_names(self, split: str) -> list[str]:
        return [name for name, where in self._split_of.items() if where == split]

    def sample(self, name: str) -> Sample:
        images = [folder / f"{name}.png" for folder in self._image_folders if (folder / f"{name}.png").is_file()]
        if not images:
            raise InputError(self.root, f"Lizard image {name}.png not found in {', '.join(IMAGE_FOLDERS)}")
        label_path = self._labels / "Labels" / f"{name}.mat"
        nuclei = read_label_file(label_path, read_image_size(images[0]))
        return Sample(name, images[0], nuclei, self.name)


def read_info(path: Path) -> dict[str, str]:
    """Image name -> split from ``info.csv`` (columns Filename, Source, Split; Split is the fold, 1-3)."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except UnicodeDecodeError as error:
        raise InputError(path, f"not a text file: {error}") from None
    split_of = {}
    for line_number, row in enumerate(rows, start=2):
        name, fold = (row.get("Filename") or "").strip(), (row.get("Split") or "").strip()
        if not name or fold not in SPLIT_OF_FOLD:
            raise InputError(path, f"expected a Filename and a Split of 1, 2 or 3, got {name!r}, {fold!r}",
                             f"line {line_number}")
        split_of[name] = SPLIT_OF_FOLD[fold]
    return split_of


def read_label_file(path: Path, image_size: tuple[int, int] | None = None) -> Nuclei:
    """Nuclei of one Lizard ``.mat`` label file, at its ``centroid`` (x, y), in instance id order."""
    arrays = read_mat(path, ("id", "class", "centroid"))
    ids = np.asarray(arrays["id"]).reshape(-1)
    class_ids = np.asarray(arrays["class"]).reshape(-1)
    xy = np.asarray(arrays["centroid"], dtype=np.float64)
    xy = xy.reshape(0, 2) if xy.size == 0 else xy
    if xy.ndim != 2 or xy.shape[1] != 2 or not len(xy) == len(ids) == len(class_ids):
        raise InputError(path, f"id, class and centroid must have one row per nucleus, got shapes "
                               f"{arrays['id'].shape}, {arrays['class'].shape}, {arrays['centroid'].shape}")
    unknown = sorted({int(c) for c in class_ids} - set(CLASS_IDS))
    if unknown:
        raise InputError(path, f"unknown class id(s) {unknown}; expected {sorted(CLASS_IDS)}")
    order = np.argsort(ids, kind="stable")
    labels = [CLASS_IDS[int(c)].name for c in class_ids[order]]
    return nuclei_from_columns(path, xy[order], labels, lambda i: f"instance {ids[order][i]}", classes=Lizard.classes,
                               mpp=Lizard.mpp, image_size=image_size)
