"""MoNuSeg 2018 (Kumar et al., IEEE TMI 2017 and 2019): 1000x1000 TCGA H&E images at 40x, every nucleus outlined.

Layout under the root, the release's: ``MoNuSegTrainingData/Tissue Images/<id>.tif`` and
``MoNuSegTrainingData/Annotations/<id>.xml`` (the zip's own ``MoNuSeg 2018 Training Data/`` is accepted too), and
optionally the test set ``MoNuSegTestData/<id>.tif`` with ``<id>.xml`` beside it.

An annotation is Aperio ImageScope XML: ``<Annotations MicronsPerPixel="0.2527">``, one ``<Region>`` per nucleus
with ``<Vertices><Vertex X=".." Y=".."/>...``, a closed outline in pixels (x = column, y = row). The nucleus is
placed at the outline's **area centroid** (shoelace formula). An outline of fewer than three distinct vertices or
an area below ``MIN_AREA_PX`` falls back to the mean of its vertices, with a warning: no nucleus is that small,
and the centroid of a sliver is unstable (one in our files, of 0.09 px², computes to 2 px outside its own
bounding box). A concave (bean-shaped) outline's centroid may lie outside it (2 of the 4,951 here); that is kept.

Origin: not documented. Measured on the 13 images as for CRCHisto (docs/formats.md): the darkness-weighted
centroid of a 13x13 window around each of 4,900 centres lies (-0.01, -0.02) px from it on average (CoNSeP's
0-based centres of mass: (+0.02, 0.00); CRCHisto's 1-based values: -0.5 px), so the vertices are pixel-centre
coordinates, denuc's, and are taken as they are.

Pixel size: each file's ``MicronsPerPixel`` (0.2456-0.2527 um/px in the files we have). A file without one (one of
our 13, TCGA-NH-A8F7) is read at ``MoNuSeg.mpp``, 0.25 um/px, the nominal 40x, with a warning.

No classes: detection only.

Split, by image. ``test`` is the release's test set when the copy has ``MoNuSegTestData/``. Otherwise (a copy of
training images only, like ours: 13 of them, 5 organs) test is held out of the training images **by organ**: of
each organ, the last image by name goes to test when the organ has at least two images among the 13 (breast,
kidney, liver, prostate: 4 images), and the next-to-last to ``val`` when it has at least three (breast, kidney,
liver: 3 images); ``train`` is the rest (6 images, all 5 organs). With the test set present, the held-out test
images are trained on. The lists are fixed by name (``VAL_IMAGES``, ``HELD_OUT_TEST_IMAGES``), so the split does
not depend on which images a copy holds; any image not in them is a training image.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np

from denuc.datasets.base import Dataset, Sample, read_image_size
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import UNLABELLED, Nuclei
from denuc.outlines import rasterise

ORGANS = {
    "TCGA-A7-A13E-01Z-00-DX1": "breast", "TCGA-AR-A1AK-01Z-00-DX1": "breast", "TCGA-AR-A1AS-01Z-00-DX1": "breast",
    "TCGA-E2-A1B5-01Z-00-DX1": "breast", "TCGA-B0-5698-01Z-00-DX1": "kidney", "TCGA-B0-5710-01Z-00-DX1": "kidney",
    "TCGA-B0-5711-01Z-00-DX1": "kidney", "TCGA-21-5784-01Z-00-DX1": "liver", "TCGA-21-5786-01Z-00-DX1": "liver",
    "TCGA-50-5931-01Z-00-DX1": "liver", "TCGA-CH-5767-01Z-00-DX1": "prostate", "TCGA-G9-6362-01Z-00-DX1": "prostate",
    "TCGA-NH-A8F7-01A-01-TS1": "colon",
}
"""Organ of each of the 13 training images whose annotations we have, as the challenge lists them (its "liver"
images come from TCGA lung projects)."""
HELD_OUT_TEST_IMAGES = ("TCGA-E2-A1B5-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1",
                        "TCGA-G9-6362-01Z-00-DX1")
VAL_IMAGES = ("TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1")
MIN_AREA_PX = 1.0
"""Outlines of a smaller area (px²) are slivers, not nuclei: they are placed at their vertex mean."""
TRAINING_FOLDERS = ("MoNuSegTrainingData", "MoNuSeg 2018 Training Data")
TEST_FOLDER = "MoNuSegTestData"


class MoNuSeg(Dataset):
    """MoNuSeg 2018 from a copy of the challenge release at ``root``."""

    name = "monuseg"
    classes = ()
    mpp = 0.25  # nominal 40x, used only for a file that gives no MicronsPerPixel

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        found = [self.root / name for name in TRAINING_FOLDERS if (self.root / name / "Annotations").is_dir()]
        if not found:
            raise InputError(self.root, f"not a MoNuSeg copy: no {TRAINING_FOLDERS[0]}/Annotations folder "
                                        "(with 'Tissue Images' beside it)")
        self._training = found[0]
        self._test = self.root / TEST_FOLDER if (self.root / TEST_FOLDER).is_dir() else None

    def _split_names(self, split: str) -> list[str]:
        training = sorted(path.stem for path in (self._training / "Annotations").glob("*.xml"))
        if split == "test" and self._test is not None:
            return sorted(path.stem for path in self._test.glob("*.xml"))
        if split == "test":
            return [name for name in training if name in HELD_OUT_TEST_IMAGES]
        if split == "val":
            return [name for name in training if name in VAL_IMAGES]
        held_out = () if self._test is not None else HELD_OUT_TEST_IMAGES
        return [name for name in training if name not in VAL_IMAGES and name not in held_out]

    def sample(self, name: str) -> Sample:
        if (self._training / "Annotations" / f"{name}.xml").is_file():
            image_path = self._training / "Tissue Images" / f"{name}.tif"
            label_path = self._training / "Annotations" / f"{name}.xml"
        elif self._test is not None and (self._test / f"{name}.xml").is_file():
            image_path, label_path = self._test / f"{name}.tif", self._test / f"{name}.xml"
        else:
            raise InputError(self.root, f"no MoNuSeg annotation for image {name!r}")
        nuclei = read_annotation_file(label_path, read_image_size(image_path))
        return Sample(name, image_path, nuclei, self.name)

    def instance_map(self, name: str) -> np.ndarray:
        """The outlines filled in by ``denuc.outlines.rasterise``, the rule every denuc instance map follows: a
        pixel inside two outlines (the release has a few overlaps) goes to the nucleus whose centre is nearer."""
        nuclei = self.sample(name).nuclei
        return rasterise(nuclei, nuclei.image_size)


def read_annotation_file(path: Path, image_size: tuple[int, int] | None = None) -> Nuclei:
    """Nuclei of one Aperio ImageScope XML file: one per ``Region``, at the outline's area centroid."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise InputError(path, "annotation file not found") from None
    except ET.ParseError as error:
        raise InputError(path, f"not valid XML: {error}") from None
    mpp = _microns_per_pixel(path, root)
    centres, region_ids, degenerate, outlines = [], [], [], []
    for k, region in enumerate(root.iter("Region")):
        region_ids.append(region.get("Id", str(k)))
        outline = _vertices(path, k, region)
        outlines.append(outline)
        centre = area_centroid(outline)
        if centre is None:
            degenerate.append(region_ids[-1])
            centre = outline.mean(axis=0)
        centres.append(centre)
    if degenerate:
        warnings.warn(f"{path}: {len(degenerate)} outline(s) of fewer than 3 distinct vertices or under "
                      f"{MIN_AREA_PX:g} px² are "
                      f"placed at the mean of their vertices (Region Id {', '.join(degenerate[:10])}"
                      f"{', ...' if len(degenerate) > 10 else ''})", stacklevel=2)
    nuclei = nuclei_from_columns(path, np.array(centres).reshape(-1, 2), [UNLABELLED] * len(centres),
                                 lambda i: f"Region {region_ids[i]}", classes=(), mpp=mpp, image_size=image_size)
    return replace(nuclei, outlines=outlines)



def area_centroid(outline: np.ndarray) -> np.ndarray | None:
    """Area centroid (x, y) of a closed polygon by the shoelace formula (the closing vertex may be repeated or
    not); None when it has fewer than 3 distinct vertices or an area below MIN_AREA_PX."""
    if len(np.unique(outline, axis=0)) < 3:
        return None
    origin = outline[0]  # relative coordinates keep the shoelace terms small and exact
    x, y = (outline - origin).T
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    cross = x * y_next - x_next * y
    area = cross.sum() / 2
    if abs(area) < MIN_AREA_PX:
        return None
    return origin + np.array([((x + x_next) * cross).sum(), ((y + y_next) * cross).sum()]) / (6 * area)


def _microns_per_pixel(path: Path, root: ET.Element) -> float:
    text = root.get("MicronsPerPixel")
    if text is None:
        warnings.warn(f"{path}: no MicronsPerPixel; read at the nominal 40x pixel size, {MoNuSeg.mpp} um/px",
                      stacklevel=3)
        return MoNuSeg.mpp
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not (np.isfinite(mpp) and mpp > 0):
        raise InputError(path, f"MicronsPerPixel must be a positive number, got {text!r}")
    return mpp


def _vertices(path: Path, k: int, region: ET.Element) -> np.ndarray:
    try:
        outline = np.array([(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")])
    except (TypeError, ValueError):
        raise InputError(path, "a Vertex without numeric X and Y", f"Region {region.get('Id', k)}") from None
    if outline.size == 0 or not np.isfinite(outline).all():
        raise InputError(path, "an outline without vertices or with a non-finite one", f"Region {region.get('Id', k)}")
    return outline
