"""OCELOT 2023 (Ryu et al., CVPR 2023; the OCELOT 2023 challenge): cell points in 1024x1024 H&E patches.

Layout under the root, the Zenodo release's (record 8417503, ``ocelot2023_v1.0.1``): ``metadata.json``,
``images/{train,val,test}/cell/<id>.jpg`` and ``annotations/{train,val,test}/cell/<id>.csv`` (the tissue patches
beside them are not used). A cell CSV has no header, one cell per line, ``x,y,class``: integer pixel indices,
0-based (the official scorer, ``evaluation/eval.py`` of github.com/lunit-io/ocelot23algo, requires 0-1023), taken
as denuc's pixel centres as they are; class 1 is a background cell (BC), 2 a tumour cell (TC). A patch without
cells has an empty CSV.

Pixel size: per patch, ``metadata.json``'s ``sample_pairs[<id>].cell.resized_mpp_x`` (and ``_y``; about 0.2
um/px): the cell patches were resampled from their slides to that size.

Split: the release's own ``train``, ``val`` and ``test`` folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from denuc.datasets.base import Dataset, Sample, read_image_size
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import Nuclei, NucleusClass

CLASS_IDS = {
    1: NucleusClass("background", (0, 160, 255)),
    2: NucleusClass("tumour", (255, 0, 0)),
}


class OCELOT(Dataset):
    """OCELOT 2023 from a copy of the Zenodo release at ``root``."""

    name = "ocelot"
    classes = tuple(CLASS_IDS.values())
    mpp = 0.2  # nominal; each patch's own size is in metadata.json

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        path = self._file("metadata.json")
        try:
            pairs = json.loads(path.read_text(encoding="utf-8"))["sample_pairs"]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(path, f"not valid JSON: {error}") from None
        except (KeyError, TypeError):
            raise InputError(path, "expected OCELOT's metadata: {\"sample_pairs\": {\"<id>\": {...}}}") from None
        self._pairs = pairs if isinstance(pairs, dict) else {}
        self._split_of = {path.stem: split for split in ("train", "val", "test")
                          for path in sorted((self.root / "images" / split / "cell").glob("*.jpg"))}

    def _split_names(self, split: str) -> list[str]:
        return [name for name, where in self._split_of.items() if where == split]

    def sample(self, name: str) -> Sample:
        if name not in self._split_of:
            raise InputError(self.root, f"no OCELOT cell patch named {name!r}")
        split = self._split_of[name]
        image_path = self._file(Path("images") / split / "cell" / f"{name}.jpg")
        label_path = self._file(Path("annotations") / split / "cell" / f"{name}.csv")
        nuclei = read_cell_file(label_path, self._mpp(name), read_image_size(image_path))
        return Sample(name, image_path, nuclei, self.name)

    def _mpp(self, name: str) -> float:
        where = f"sample_pairs[{name!r}].cell"
        try:
            cell = self._pairs[name]["cell"]
            mpp_x, mpp_y = float(cell["resized_mpp_x"]), float(cell["resized_mpp_y"])
        except (KeyError, TypeError, ValueError):
            raise InputError(self.root / "metadata.json", "no resized_mpp_x and resized_mpp_y numbers", where) from None
        if not (np.isfinite([mpp_x, mpp_y]).all() and mpp_x > 0 and mpp_y > 0):
            raise InputError(self.root / "metadata.json", f"pixel size must be positive, got {mpp_x}, {mpp_y}", where)
        return (mpp_x + mpp_y) / 2


def read_cell_file(path: Path, mpp: float, image_size: tuple[int, int] | None = None) -> Nuclei:
    """Nuclei of one OCELOT cell CSV (``x,y,class`` lines, no header; empty: no cells)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(path, f"not a text file: {error}") from None
    xy, labels, lines = [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            x, y, class_id = (int(field) for field in fields)
        except ValueError:
            raise InputError(path, f"expected three integers 'x,y,class', got {line!r}",
                             f"line {line_number}") from None
        if class_id not in CLASS_IDS:
            raise InputError(path, f"unknown class {class_id}; expected 1 (background cell) or 2 (tumour cell)",
                             f"line {line_number}")
        xy.append((x, y))
        labels.append(CLASS_IDS[class_id].name)
        lines.append(line_number)
    return nuclei_from_columns(path, np.array(xy, dtype=np.float64).reshape(-1, 2), labels,
                               lambda i: f"line {lines[i]}", classes=OCELOT.classes, mpp=mpp, image_size=image_size)
