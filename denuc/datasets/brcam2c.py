"""BRCA-M2C (Abousamra et al., ICCV 2021): 120 breast-cancer patches at 20x with 3 classes of nucleus points.

Layout under the root: ``images/<stem>.png``, ``labels/<stem>_gt_class_coords.txt`` and the official split
lists ``brca_ds_{train,val,test}.txt`` (image file names). A label file holds one nucleus per line,
``<row> <col> <class id>``: **row (y) first**. Values are integer pixel indices, 0-based (what the dataset's
own code does with them), which are denuc's pixel-centre coordinates as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from denuc.datasets.base import Dataset, Sample, read_image_size, read_name_list
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import Nuclei, NucleusClass

# Colours of the dataset's own visualisations: lymphocytes blue, tumour red, stromal yellow.
CLASS_IDS = {
    1: NucleusClass("lymphocyte", (0, 0, 255)),
    2: NucleusClass("tumour", (255, 0, 0)),
    3: NucleusClass("stromal", (255, 255, 0)),
}
_SPLIT_FILES = {"train": "brca_ds_train.txt", "val": "brca_ds_val.txt", "test": "brca_ds_test.txt"}


class BRCAM2C(Dataset):
    """BRCA-M2C from a copy of github.com/TopoXLab/Dataset-BRCA-M2C at ``root``."""

    name = "brcam2c"
    classes = tuple(CLASS_IDS.values())
    mpp = 0.5  # 1000 px crops at 40x downsampled to about 500 px: treated as 20x, 0.5 um/px

    def _split_names(self, split: str) -> list[str]:
        return [Path(file_name).stem for file_name in read_name_list(self._file(_SPLIT_FILES[split]))]

    def sample(self, name: str) -> Sample:
        image_path = self._file(Path("images") / f"{name}.png")
        label_path = self._file(Path("labels") / f"{name}_gt_class_coords.txt")
        nuclei = read_label_file(label_path, read_image_size(image_path))
        return Sample(name, image_path, nuclei, self.name)


def read_label_file(path: Path, image_size: tuple[int, int] | None = None) -> Nuclei:
    """Nuclei of one ``<row> <col> <class id>`` label file (an empty file is an image without nuclei)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "label file not found") from None
    rows, lines = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        rows.append(_parse_line(path, line_number, fields))
        lines.append(line_number)
    values = np.array(rows, dtype=np.float64).reshape(-1, 3)
    return nuclei_from_columns(
        path,
        values[:, [1, 0]],  # the file is (row, col); denuc is (x, y) = (col, row)
        [CLASS_IDS[int(class_id)].name for class_id in values[:, 2]],
        lambda i: f"line {lines[i]}",
        classes=BRCAM2C.classes,
        mpp=BRCAM2C.mpp,
        image_size=image_size,
    )


def _parse_line(path: Path, line_number: int, fields: list[str]) -> tuple[float, float, int]:
    def fail(problem: str) -> InputError:
        return InputError(path, problem, f"line {line_number}")

    if len(fields) != 3:
        raise fail(f"expected 3 fields '<row> <col> <class id>', got {len(fields)}")
    try:
        row, col, class_id = float(fields[0]), float(fields[1]), int(fields[2])
    except ValueError:
        raise fail(f"expected numbers '<row> <col> <class id>', got {' '.join(fields)!r}") from None
    if class_id not in CLASS_IDS:
        raise fail(f"unknown class id {class_id}; expected one of {sorted(CLASS_IDS)}")
    return row, col, class_id
