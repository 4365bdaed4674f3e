"""CoNSeP (Graham et al., Medical Image Analysis 2019, the HoVer-Net paper): colorectal H&E at 40x, 0.25 um/px.

Layout under the root, the original release's: ``Train/Images/<name>.png`` and ``Train/Labels/<name>.mat``, the
same under ``Test/`` (optional). Images may also be ``.jpg``: the copy of 256x256 crops this project uses
(``train_N_CCC``, crop CCC of source image ``train_N``) was published as JPEG. A label file holds (read with
``scipy.io.loadmat``) ``inst_map`` and ``type_map`` (H, W), ``inst_type`` (n, 1), the class id of instance i+1, and
``inst_centroid`` (n, 2), its centre of mass as **(x, y)**, 0-based pixel centres (denuc's convention as it is).

Classes: HoVer-Net's four (``type_info.json`` of github.com/vqdang/hover_net, with its colours). The original
release stores seven ids (1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant epithelial,
5 fibroblast, 6 muscle, 7 endothelial), which HoVer-Net's loader (``dataset.py``, ``__CoNSeP.load_ann``) merges
3+4 -> epithelial and 5+6+7 -> spindle; copies already merged (our crops) store 1-4. An id of 4 means malignant
epithelial in the one and spindle in the other, so the reader decides once per copy, not per file: if any
label file holds an id of 5-7, every file is read as seven-id and merged.

Split, by **source image** (crops of one image overlap, so they never cross splits): ``val`` is the images
``train_8`` and ``train_18`` of the release's Train set; ``test`` is the release's Test set when the copy has
``Test/``, else the Train images ``train_9``, ``train_10``, ``train_19`` and ``train_20`` (a copy of the train
split alone, like ours); ``train`` is every other Train image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from denuc.datasets.base import Dataset, Sample, read_image_size, read_mat
from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns
from denuc.nuclei import Nuclei, NucleusClass

CLASS_IDS = {
    1: NucleusClass("other", (255, 0, 0)),
    2: NucleusClass("inflammatory", (0, 255, 0)),
    3: NucleusClass("epithelial", (0, 0, 255)),
    4: NucleusClass("spindle", (255, 255, 0)),
}
SEVEN_TO_FOUR = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
"""HoVer-Net's merge of the original release's seven ids into the four classes."""
VAL_SOURCES = ("train_8", "train_18")
HELD_OUT_TEST_SOURCES = ("train_9", "train_10", "train_19", "train_20")
"""Test when the copy has no Test/ folder; trained on otherwise."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SOURCE = re.compile(r"(train|test)_\d+")
_LABEL_KEYS = ("inst_type", "inst_centroid")


class CoNSeP(Dataset):
    """CoNSeP from a copy of the Warwick TIA release (or of crops in its layout) at ``root``."""

    name = "consep"
    classes = tuple(CLASS_IDS.values())
    mpp = 0.25

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root)
        if not (self.root / "Train" / "Labels").is_dir():
            raise InputError(self.root, "not a CoNSeP copy: Train/Images and Train/Labels are missing")
        self._seven_ids: bool | None = None  # decided on the first sample read

    def _split_names(self, split: str) -> list[str]:
        has_test = (self.root / "Test" / "Labels").is_dir()
        if split == "test" and has_test:
            return _label_names(self.root / "Test")
        held_out = VAL_SOURCES if split == "val" else HELD_OUT_TEST_SOURCES if split == "test" else ()
        names = []
        for name in _label_names(self.root / "Train"):
            source = source_image(name)
            if split == "train":
                if source not in VAL_SOURCES and (has_test or source not in HELD_OUT_TEST_SOURCES):
                    names.append(name)
            elif source in held_out:
                names.append(name)
        return names

    def sample(self, name: str) -> Sample:
        folder = self.root / ("Test" if name.startswith("test_") else "Train")
        image_path = _image_file(folder / "Images", name)
        label_path = self._file(folder.relative_to(self.root) / "Labels" / f"{name}.mat")
        if self._seven_ids is None:
            self._seven_ids = self._has_seven_ids()
        nuclei = read_label_file(label_path, self._seven_ids, read_image_size(image_path))
        return Sample(name, image_path, nuclei, self.name)

    def instance_map(self, name: str) -> np.ndarray:
        """The release's ``inst_map``: instance i + 1 is nucleus i of ``sample(name)``."""
        folder = "Test" if name.startswith("test_") else "Train"
        path = self._file(f"{folder}/Labels/{name}.mat")
        inst_map = np.asarray(read_mat(path, ("inst_map",))["inst_map"])
        if inst_map.ndim != 2:
            raise InputError(path, f"inst_map must be 2-D, got shape {inst_map.shape}")
        return inst_map.astype(np.int32)

    def _has_seven_ids(self) -> bool:
        """Whether the copy stores the release's seven ids: any label file with an id of 5-7."""
        for split in ("Train", "Test"):
            for path in sorted((self.root / split / "Labels").glob("*.mat")):
                ids = read_mat(path, ("inst_type",))["inst_type"]
                if ids.size and np.isin(ids, (5, 6, 7)).any():
                    return True
        return False


def source_image(name: str) -> str:
    """The release image a name comes from: ``train_8`` for the crop ``train_8_013`` and for ``train_8`` itself."""
    match = _SOURCE.match(name)
    if match is None:
        raise InputError(name, "not a CoNSeP image name: expected train_N or test_N, optionally _CCC for a crop")
    return match.group(0)


def read_label_file(path: Path, seven_ids: bool, image_size: tuple[int, int] | None = None) -> Nuclei:
    """The nuclei of one CoNSeP ``.mat`` label file; ``seven_ids``: merge the release's seven ids into four."""
    arrays = read_mat(path, _LABEL_KEYS)
    ids = np.asarray(arrays["inst_type"]).reshape(-1)
    xy = np.asarray(arrays["inst_centroid"], dtype=np.float64)
    xy = xy.reshape(0, 2) if xy.size == 0 else xy  # a crop without nuclei stores (0, 2), or sometimes (0, 0)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != len(ids):
        raise InputError(path, f"inst_centroid must be ({len(ids)}, 2) (x, y), one per inst_type, "
                               f"got shape {xy.shape}")
    known = SEVEN_TO_FOUR if seven_ids else {k: k for k in CLASS_IDS}
    unknown = sorted({int(i) for i in ids} - set(known))
    if unknown:
        raise InputError(path, f"unknown class id(s) {unknown} in inst_type; expected {sorted(known)}")
    labels = [CLASS_IDS[known[int(i)]].name for i in ids]
    return nuclei_from_columns(path, xy, labels, lambda i: f"instance {i + 1}", classes=CoNSeP.classes,
                               mpp=CoNSeP.mpp, image_size=image_size)


def _label_names(folder: Path) -> list[str]:
    """Stems of the label files of Train/ or Test/, in natural order (train_2 before train_10)."""
    names = [path.stem for path in (folder / "Labels").glob("*.mat")]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def _image_file(folder: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise InputError(folder / name, f"CoNSeP image not found (looked for {', '.join(IMAGE_SUFFIXES)})")
