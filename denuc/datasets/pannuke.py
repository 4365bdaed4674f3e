"""PanNuke (Gamper et al., ECDP 2019 and arXiv:2003.10778): 256x256 H&E patches of 19 tissues at 40x, 0.25 um/px.

Layout under the root, the release's three folds (warwick.ac.uk/fac/cross_fac/tia/data/pannuke, the paths DeNuC's
``preprocess/pannuke.py`` reads): ``Fold K/images/foldK/images.npy``, ``Fold K/images/foldK/types.npy`` and
``Fold K/masks/foldK/masks.npy`` for K = 1, 2, 3. ``images.npy`` is (N, 256, 256, 3), RGB values 0-255 stored as
float64; ``masks.npy`` (N, 256, 256, 6) holds per channel an instance map of one class (0: neoplastic,
1: inflammatory, 2: connective/soft tissue, 3: dead, 4: epithelial; 5: background, not used); ``types.npy`` is the
tissue of each patch (not used). The release's readme numbers the background channel 6: a typo, there are six.

Nuclei: one per instance id in each class channel, at the centre of mass of its pixels, (x, y) = (column, row).

The images are array entries, not files: ``Sample.read_image()`` reads them (``image_path`` is the
``images.npy`` and ``image_index`` the entry). Names are ``fold<K>_<index>``, index from 0 in the fold's arrays.

Split: fold 1 ``train``, fold 2 ``val``, fold 3 ``test`` (the usual order; DeNuC's ``pannuke123``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from denuc.datasets.base import Dataset, Sample, load_array
from denuc.errors import InputError
from denuc.nuclei import Nuclei, NucleusClass

CLASSES = (
    NucleusClass("neoplastic", (255, 0, 0)),
    NucleusClass("inflammatory", (0, 255, 0)),
    NucleusClass("connective", (0, 0, 255)),
    NucleusClass("dead", (255, 255, 0)),
    NucleusClass("epithelial", (255, 165, 0)),
)
"""The classes of mask channels 0-4, with the colours of HoVer-Net's PanNuke type_info."""
FOLD_OF_SPLIT = {"train": 1, "val": 2, "test": 3}
_NAME = re.compile(r"fold([123])_(\d+)")


class PanNuke(Dataset):
    """PanNuke from a copy of the three folds at ``root``."""

    name = "pannuke"
    classes = CLASSES
    mpp = 0.25

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # fold -> (images, masks), memory-mapped

    def _split_names(self, split: str) -> list[str]:
        fold = FOLD_OF_SPLIT[split]
        images, _ = self._fold(fold)
        return [f"fold{fold}_{index:04d}" for index in range(len(images))]

    def sample(self, name: str) -> Sample:
        match = _NAME.fullmatch(name)
        if match is None:
            raise InputError(self.root, f"not a PanNuke sample name: {name!r} (expected fold<K>_<index>)")
        fold, index = int(match.group(1)), int(match.group(2))
        images, masks = self._fold(fold)
        if index >= len(images):
            raise InputError(self.root, f"fold {fold} has {len(images)} images, no {name!r}")
        image_path = _fold_file(self.root, fold, "images", "images.npy")
        nuclei = mask_nuclei(np.asarray(masks[index]), str(_fold_file(self.root, fold, "masks", "masks.npy")))
        return Sample(name, image_path, nuclei, self.name, image_index=index)

    def _fold(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        if fold not in self._arrays:
            images = load_array(self._file(_fold_file(Path(), fold, "images", "images.npy")))
            masks = load_array(self._file(_fold_file(Path(), fold, "masks", "masks.npy")))
            if images.ndim != 4 or images.shape[-1] != 3:
                raise InputError(self.root, f"fold {fold} images.npy must be (N, H, W, 3), got {images.shape}")
            if masks.shape != images.shape[:3] + (6,):
                raise InputError(self.root, f"fold {fold} masks.npy must be {images.shape[:3] + (6,)} "
                                            f"(a 6-channel mask per image), got {masks.shape}")
            self._arrays[fold] = images, masks
        return self._arrays[fold]


def mask_nuclei(mask: np.ndarray, source: str = "<pannuke mask>") -> Nuclei:
    """Nuclei of one (H, W, 6) PanNuke mask: the centre of mass of each instance id of channels 0-4."""
    xy, labels = [], []
    for channel, cls in enumerate(CLASSES):
        instances = np.asarray(mask[..., channel]).astype(np.int64)
        ids = np.unique(instances[instances > 0])
        if len(ids):
            rows_cols = np.array(ndimage.center_of_mass(np.ones_like(instances), instances, ids)).reshape(-1, 2)
            xy.append(rows_cols[:, ::-1])
            labels += [cls.name] * len(ids)
    h, w = mask.shape[:2]
    nuclei = Nuclei(np.concatenate(xy) if xy else np.zeros((0, 2)), labels, classes=list(CLASSES),
                    mpp=PanNuke.mpp, image_size=(w, h))
    return nuclei.validate(source)


def _fold_file(root: Path, fold: int, kind: str, file_name: str) -> Path:
    return root / f"Fold {fold}" / kind / f"fold{fold}" / file_name
