"""Your own annotated images, for training and scoring: ``--dataset points=ROOT``.

Layout under the root::

    dataset.json          {"mpp": 0.5, "classes": ["tumour", "lymphocyte"]}
    train/  a.png  a.csv  b.tif  b.geojson ...
    val/    ...
    test/   ...           (optional, as is val; train is required)

Each image (.png, .jpg, .jpeg, .bmp, .tif, .tiff) has a point file with the same stem: denuc's CSV (columns x, y
and optionally label) or a GeoJSON such as QuPath exports (docs/formats.md); an image without nuclei has an
empty one. ``mpp`` is the images' pixel size in um/px and is required: it is never guessed. ``classes`` is
optional: without it the points train a detector (class-agnostic) but not a classifier; with it, every label
must be one of them (an empty label is an unlabelled nucleus).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from denuc.datasets.base import SPLITS, Dataset, Sample, read_image_size
from denuc.errors import InputError
from denuc.io import read_points
from denuc.io.csv import as_classes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
POINT_SUFFIXES = (".csv", ".geojson", ".json")


class PointsFolder(Dataset):
    """Images and point files in ``train/``, ``val/`` and ``test/`` folders, described by ``dataset.json``."""

    name = "points"

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        meta_path = self._file("dataset.json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(meta_path, f"not valid JSON: {error}") from None
        mpp = meta.get("mpp") if isinstance(meta, dict) else None
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0:
            raise InputError(meta_path, 'needs the images\' pixel size, e.g. {"mpp": 0.5} (um/px): it is never guessed')
        self.mpp = float(mpp)
        names = meta.get("classes", [])
        if (not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names)
                or len(set(names)) != len(names)):
            raise InputError(meta_path, "'classes' must be a list of distinct class names")
        self.classes = tuple(as_classes(names))
        if not (self.root / "train").is_dir():
            raise InputError(self.root / "train", "points dataset: the train folder is missing")
        self._files: dict[str, tuple[str, Path, Path]] = {}  # name -> (split, image, point file)
        for split in SPLITS:
            for image, points in _pairs(self.root / split):
                if image.stem in self._files:
                    raise InputError(image, f"image name {image.stem!r} is used twice; names must be unique")
                self._files[image.stem] = (split, image, points)

    def _split_names(self, split: str) -> list[str]:
        return [name for name, (where, _, _) in self._files.items() if where == split]

    def sample(self, name: str) -> Sample:
        if name not in self._files:
            raise InputError(self.root, f"no image named {name!r}")
        _, image, points = self._files[name]
        nuclei = read_points(points, classes=self.classes or None, mpp=self.mpp, image_size=read_image_size(image))
        return Sample(name, image, nuclei, self.name)


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, point file) pairs of one split folder, sorted by name; an image without a point file is an error."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    points = {p.stem: p for p in files if p.suffix.lower() in POINT_SUFFIXES}
    pairs = []
    for image in (p for p in files if p.suffix.lower() in IMAGE_SUFFIXES):
        if image.stem not in points:
            raise InputError(image, f"no point file beside it ({image.stem}.csv or {image.stem}.geojson; "
                                    "an empty one for an image without nuclei)")
        pairs.append((image, points[image.stem]))
    return pairs
