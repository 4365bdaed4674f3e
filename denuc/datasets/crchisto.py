"""CRCHisto (Sirinukunwattana et al., IEEE TMI 2016): 100 colorectal H&E images, 500x500 px at 20x.

Layout under the root: ``imgN/imgN.bmp``, ``imgN/imgN_detection.mat`` (every annotated nucleus centre) and
``imgN/imgN_<class>.mat`` for the classes epithelial, fibroblast, inflammatory and others (the centres that
also carry a class), each an (n, 2) array of (x, y) under the key ``detection``; split lists
``split_train.txt``, ``split_validation.txt``, ``split_test.txt`` (one ``imgN`` per line, the 70/10/20 split
of the SFCN-OPI paper).

Traps, and what is done about them (docs/formats.md has the measurements behind these choices):

* Coordinates are 1-based (MATLAB): the dark mass of the nuclei sits 1 px before the values as read. They are
  shifted by -1, then clipped into the image, as ten values (down to 0.15 as read) lie just beyond its edge.
* Class centres are not always exact copies of detection centres (82 of 22,444 lie 0.97-9.5 px away). Each
  class centre is paired with a distinct detection centre within ``PAIRING_TOLERANCE_PX``, minimising the
  total distance (so two class centres never label one nucleus). A class centre left without a partner is
  kept as an extra labelled nucleus, with a warning: it is an annotated nucleus, and dropping it would lose
  a label. Detection centres without a class are UNLABELLED.
* ``_detection.mat`` holds a few exact duplicate centres (kept: they are in the published 29,756 count).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.io
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from denuc.datasets.base import Dataset, Sample, read_image_size, read_name_list
from denuc.errors import InputError
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass

CLASSES = (
    NucleusClass("epithelial", (255, 0, 0)),
    NucleusClass("fibroblast", (0, 160, 0)),
    NucleusClass("inflammatory", (0, 0, 255)),
    NucleusClass("others", (255, 200, 0)),
)
PAIRING_TOLERANCE_PX = 10.0
"""Farthest a class centre may lie from the detection centre it labels: above the 9.5 px the data needs,
below a nucleus diameter (about 15-20 px at 0.55 um/px), so a class never jumps to a neighbouring nucleus."""
ORIGIN = 1.0
"""File coordinate of the centre of the top-left pixel (MATLAB's 1-based convention)."""
_SPLIT_FILES = {"train": "split_train.txt", "val": "split_validation.txt", "test": "split_test.txt"}


class CRCHisto(Dataset):
    """CRCHisto (CRCHistoPhenotypes) from a copy of the Warwick TIA release at ``root``."""

    name = "crchisto"
    classes = CLASSES
    mpp = 0.55

    def _split_names(self, split: str) -> list[str]:
        return read_name_list(self._file(_SPLIT_FILES[split]))

    def sample(self, name: str) -> Sample:
        folder = Path(name)
        image_path = self._file(folder / f"{name}.bmp")
        width, height = read_image_size(image_path)
        detections = read_centres(self._file(folder / f"{name}_detection.mat"))
        class_centres = {c.name: read_centres(self._file(folder / f"{name}_{c.name}.mat")) for c in CLASSES}
        xy, labels = label_detections(detections, class_centres, source=self.root / folder)
        # Shift to 0-based pixel centres, then clip the few clicks beyond the image edge back onto it.
        xy = np.clip(xy - ORIGIN, -0.5, [width - 0.5, height - 0.5])
        nuclei = Nuclei(xy, labels, classes=list(CLASSES), mpp=self.mpp, image_size=(width, height))
        return Sample(name, image_path, nuclei.validate(str(self.root / folder)), self.name)


def read_centres(path: Path) -> np.ndarray:
    """The (n, 2) float array of (x, y) stored under ``detection`` in a CRCHisto .mat file."""
    try:
        contents = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError) as error:  # loadmat on a non-.mat file
        raise InputError(path, f"cannot read the MATLAB file: {error}") from None
    if "detection" not in contents:
        arrays = sorted(key for key in contents if not key.startswith("__"))
        raise InputError(path, f"no 'detection' array; the file holds {arrays}")
    centres = np.asarray(contents["detection"], dtype=np.float64)
    # An image without a nucleus of a class stores an empty array, sometimes (0, 0) rather than (0, 2).
    if centres.size == 0:
        return np.zeros((0, 2))
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise InputError(path, f"'detection' must be an (n, 2) array of (x, y), got shape {centres.shape}")
    bad = ~np.isfinite(centres).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(path, f"coordinate {tuple(centres[i])} is not a finite number", f"row {i}")
    return centres


def label_detections(
    detections: np.ndarray,
    class_centres: dict[str, np.ndarray],
    tolerance: float = PAIRING_TOLERANCE_PX,
    source: object = "<crchisto>",
) -> tuple[np.ndarray, np.ndarray]:
    """Points and labels: every detection centre, labelled by the class centre paired with it, then any
    class centre left unpaired (see the module docstring). ``source`` names the sample in the warning."""
    names = np.array([name for name, centres in class_centres.items() for _ in range(len(centres))], dtype=object)
    centres = np.concatenate([np.zeros((0, 2)), *class_centres.values()])
    partner = pair_points(centres, detections, tolerance)
    labels = np.full(len(detections), UNLABELLED, dtype=object)
    labels[partner[partner >= 0]] = names[partner >= 0]
    unpaired = partner < 0
    if unpaired.any():
        warnings.warn(
            f"{source}: {int(unpaired.sum())} class centre(s) have no detection centre within {tolerance} px "
            f"and are kept as extra labelled nuclei: (x, y) as in the files {centres[unpaired].round(2).tolist()}, "
            f"classes {names[unpaired].tolist()}",
            stacklevel=2,
        )
    return np.concatenate([detections, centres[unpaired]]), np.concatenate([labels, names[unpaired]])


def pair_points(points: np.ndarray, targets: np.ndarray, tolerance: float) -> np.ndarray:
    """For each point, the index of a distinct target within ``tolerance``, or -1.

    Pairs as many points as possible, then minimises the total distance (a one-to-one assignment, not
    nearest neighbours: two points whose nearest target is the same must not share it).
    """
    partner = np.full(len(points), -1)
    if len(points) == 0 or len(targets) == 0:
        return partner
    distance = cdist(points, targets)
    # A pair beyond tolerance costs more than all pairs within it together, so the assignment first
    # maximises the number of pairs within tolerance; those beyond it are then dropped.
    too_far = distance > tolerance
    cost = np.where(too_far, tolerance * len(points) + 1.0, distance)
    rows, cols = linear_sum_assignment(cost)
    kept = ~too_far[rows, cols]
    partner[rows[kept]] = cols[kept]
    return partner
