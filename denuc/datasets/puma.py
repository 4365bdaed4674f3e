"""PUMA (Schuiveling et al., GigaScience 2025; the PUMA 2024 challenge): melanoma H&E regions of interest at 40x.

Layout under the root, the Zenodo release's (record 15050523, the one DeNuC's ``preprocess/puma.py`` reads):
``01_training_dataset_tif_ROIs/<name>.tif`` (1024x1024, RGB or RGBA) and
``01_training_dataset_geojson_nuclei/<name>_nuclei.geojson``, for names ``training_set_primary_roi_NNN`` and
``training_set_metastatic_roi_NNN``. A nuclei file is a GeoJSON FeatureCollection, one feature per nucleus: a
``Polygon`` (or ``MultiPolygon``) outline and ``properties.classification.name``, one of ten classes
(``nuclei_tumor``, ``nuclei_lymphocyte``, ``nuclei_plasma_cell``, ``nuclei_histiocyte``, ``nuclei_melanophage``,
``nuclei_neutrophil``, ``nuclei_stroma``, ``nuclei_endothelium``, ``nuclei_epithelium``, ``nuclei_apoptosis``).

Classes: the challenge's track 1, three classes: tumour, TILs (lymphocytes and plasma cells), other (the remaining
seven). DeNuC's PUMA rows use a different three: its ``preprocess/puma.py`` keeps lymphocytes alone and puts plasma
cells in "other"; detection scores are unaffected, class scores are not comparable.

Centre: the challenge's rule, the **mean of the outline's vertices** (``calculate_centroid`` in ``eval_nuclei.py``
of github.com/tueimage/PUMA-challenge-eval-track2), over the outer ring's distinct vertices (a GeoJSON ring repeats
its first vertex at the end; that copy is not counted twice). A MultiPolygon is one nucleus, at the mean of the
vertices of all its outer rings. The files are QuPath exports (``classification`` objects as QuPath writes them),
whose origin is the image's top-left corner, so 0.5 px is subtracted, as denuc's GeoJSON reader does.

Pixel size: the TIFF's resolution tags when it has them, else ``PUMA.mpp``, 0.25 um/px (40x, what DeNuC assumes).

Split: the challenge's test labels are not public, and DeNuC's split lists are not published with its code. By
default, within each of the primary and metastatic series ordered by ROI number, ROI k (counting from 0) goes to
``test`` when k % 10 is 8 or 9, to ``val`` when it is 7, else to ``train`` (70/10/20, both series in every split).
A file ``splits.json`` in the root, ``{"train": [names], "val": [...], "test": [...]}``, replaces that split (to
reproduce someone else's); every ROI must then be in exactly one list.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from denuc.datasets.base import SPLITS, Dataset, Sample, read_image_size
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import Nuclei, NucleusClass

CLASSES = (
    NucleusClass("tumour", (255, 0, 0)),
    NucleusClass("TILs", (0, 0, 255)),
    NucleusClass("other", (255, 200, 0)),
)
TRACK1_CLASS = {
    "nuclei_tumor": "tumour",
    "nuclei_lymphocyte": "TILs",
    "nuclei_plasma_cell": "TILs",
    "nuclei_histiocyte": "other",
    "nuclei_melanophage": "other",
    "nuclei_neutrophil": "other",
    "nuclei_stroma": "other",
    "nuclei_endothelium": "other",
    "nuclei_epithelium": "other",
    "nuclei_apoptosis": "other",
}
"""The challenge's ten nucleus classes and their track-1 class."""
IMAGE_FOLDER = "01_training_dataset_tif_ROIs"
NUCLEI_FOLDER = "01_training_dataset_geojson_nuclei"
SPLIT_FILE = "splits.json"
PLAUSIBLE_MPP = (0.1, 2.0)
"""Resolution tags outside this range (um/px) are not a microscope's: such a file is read at the nominal size."""
_ROI = re.compile(r"training_set_(primary|metastatic)_roi_(\d+)")
_QUPATH_ORIGIN = 0.5


class PUMA(Dataset):
    """PUMA from a copy of the Zenodo release at ``root``."""

    name = "puma"
    classes = CLASSES
    mpp = 0.25

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        if not (self.root / IMAGE_FOLDER).is_dir() or not (self.root / NUCLEI_FOLDER).is_dir():
            raise InputError(self.root, f"not a PUMA copy: {IMAGE_FOLDER}/ and {NUCLEI_FOLDER}/ are needed")
        names = sorted(path.stem for path in (self.root / IMAGE_FOLDER).glob("*.tif"))
        split_file = self.root / SPLIT_FILE
        self._split_of = read_split_file(split_file, names) if split_file.is_file() else default_split(names)

    def _split_names(self, split: str) -> list[str]:
        return [name for name, where in self._split_of.items() if where == split]

    def sample(self, name: str) -> Sample:
        image_path = self._file(Path(IMAGE_FOLDER) / f"{name}.tif")
        nuclei = read_nuclei_file(self._file(Path(NUCLEI_FOLDER) / f"{name}_nuclei.geojson"),
                                  tiff_mpp(image_path) or self.mpp, read_image_size(image_path))
        return Sample(name, image_path, nuclei, self.name)


def default_split(names: list[str]) -> dict[str, str]:
    """Name -> split: in each series by ROI number, k % 10 of 8-9 test, 7 val, else train (see the module)."""
    series: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        match = _ROI.fullmatch(name)
        if match is None:
            raise InputError(name, "not a PUMA ROI name (training_set_primary_roi_NNN or "
                                   "training_set_metastatic_roi_NNN); give the split in splits.json")
        series.setdefault(match.group(1), []).append((int(match.group(2)), name))
    split_of = {}
    for members in series.values():
        for k, (_, name) in enumerate(sorted(members)):
            split_of[name] = "test" if k % 10 >= 8 else "val" if k % 10 == 7 else "train"
    return dict(sorted(split_of.items()))


def read_split_file(path: Path, names: list[str]) -> dict[str, str]:
    """Name -> split from ``{"train": [...], "val": [...], "test": [...]}``; each ROI in exactly one list."""
    try:
        lists = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON: {error}") from None
    if not isinstance(lists, dict) or set(lists) - set(SPLITS) or not all(isinstance(v, list) for v in lists.values()):
        raise InputError(path, 'expected {"train": [ROI names], "val": [...], "test": [...]}')
    split_of: dict[str, str] = {}
    for split, members in lists.items():
        for name in members:
            if name in split_of:
                raise InputError(path, f"ROI {name!r} is in both {split_of[name]!r} and {split!r}")
            split_of[name] = split
    unknown, missing = sorted(set(split_of) - set(names)), sorted(set(names) - set(split_of))
    if unknown or missing:
        raise InputError(path, f"the lists must name every ROI once: not ROIs of this copy {unknown[:5]}, "
                               f"in no list {missing[:5]}")
    return {name: split_of[name] for name in names}


def read_nuclei_file(path: Path, mpp: float, image_size: tuple[int, int] | None = None) -> Nuclei:
    """Nuclei of one PUMA GeoJSON file, each at the mean of its outline's vertices, in the three classes."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not valid JSON: {error}") from None
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise InputError(path, "expected a GeoJSON FeatureCollection")
    centres, labels = [], []
    for k, feature in enumerate(features):
        try:
            centre = vertex_mean(feature["geometry"])
            name = feature["properties"]["classification"]
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise InputError(path, "expected a Polygon or MultiPolygon feature with properties.classification "
                                   f"({type(error).__name__}: {error})", f"feature {k}") from None
        name = name.get("name") if isinstance(name, dict) else name
        if not isinstance(name, str) or name not in TRACK1_CLASS:
            raise InputError(path, f"unknown class {name!r}; expected one of {sorted(TRACK1_CLASS)}", f"feature {k}")
        centres.append(centre - _QUPATH_ORIGIN)
        labels.append(TRACK1_CLASS[name])
    return nuclei_from_columns(path, np.array(centres).reshape(-1, 2), labels, lambda i: f"feature {i}",
                               classes=CLASSES, mpp=mpp, image_size=image_size)


def vertex_mean(geometry: dict) -> np.ndarray:
    """Mean (x, y) of the distinct vertices of a Polygon's outer ring, or of all outer rings of a MultiPolygon."""
    polygons = {"Polygon": [geometry["coordinates"]],
                "MultiPolygon": geometry["coordinates"]}[geometry["type"]]
    rings = []
    for polygon in polygons:
        ring = np.asarray(polygon[0], dtype=np.float64)[:, :2]
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]  # GeoJSON closes a ring by repeating its first vertex
        rings.append(ring)
    vertices = np.concatenate(rings)
    if len(vertices) == 0 or not np.isfinite(vertices).all():
        raise ValueError("an outline without vertices or with a non-finite one")
    return vertices.mean(axis=0)


def tiff_mpp(path: Path) -> float | None:
    """Pixel size from a TIFF's resolution tags (282 XResolution, 296 unit: 2 inch, 3 cm), or None."""
    try:
        with Image.open(path) as image:
            tags = image.tag_v2 if image.format == "TIFF" else {}
            per_unit, unit = tags.get(282), tags.get(296)
    except OSError as error:
        raise InputError(path, f"cannot read the image: {error}") from None
    if per_unit is None or unit not in (2, 3) or not float(per_unit) > 0:
        return None
    mpp = (25400.0 if unit == 2 else 10000.0) / float(per_unit)
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None
