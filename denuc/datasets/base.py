"""What every dataset offers: its taxonomy and pixel size, and its samples per split, read from a root folder.

A dataset never knows where its files live: the user passes the root of their own copy.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from denuc.errors import InputError
from denuc.io.images import read_image, to_rgb_uint8
from denuc.nuclei import Nuclei, NucleusClass

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val"}


@dataclass(frozen=True)
class Sample:
    """One annotated image: ``name`` is the image file's stem, ``nuclei`` its ground truth.

    ``image_index`` is None when ``image_path`` is an image file. Datasets published as arrays (PanNuke's
    ``images.npy``) give the array file and the image's index in it; ``read_image`` reads either.
    """

    name: str
    image_path: Path
    nuclei: Nuclei
    dataset: str
    image_index: int | None = None

    def read_image(self) -> np.ndarray:
        """The pixels, (H, W, 3) uint8 RGB."""
        if self.image_index is None:
            return read_image(self.image_path)
        return read_array_image(self.image_path, self.image_index)


class Dataset(ABC):
    """A dataset on disk. Subclasses set the class attributes and read one sample's annotations."""

    name: ClassVar[str]
    classes: ClassVar[tuple[NucleusClass, ...]]
    mpp: ClassVar[float]
    splits: ClassVar[tuple[str, ...]] = SPLITS

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(self.root, f"{self.name} dataset folder not found")

    def samples(self, split: str) -> list[Sample]:
        """The samples of ``split`` ("train", "val" or "test"; "validation" is accepted for "val"), in list order."""
        return [self.sample(name) for name in self.sample_names(split)]

    def sample_names(self, split: str) -> list[str]:
        """Names (image stems) of the samples of ``split``, without reading their annotations."""
        return self._split_names(self._split(split))

    @abstractmethod
    def sample(self, name: str) -> Sample:
        """One sample by name, with its ground truth."""

    def instance_map(self, name: str) -> np.ndarray | None:
        """The sample's nuclei as an instance map at the dataset's own pixel size: (H, W) int32, 0 background,
        1..n the nuclei in the order of ``sample(name).nuclei``; None for a dataset without outlines."""
        return None

    @abstractmethod
    def _split_names(self, split: str) -> list[str]:
        """Sample names of a canonical split name."""

    def _split(self, split: str) -> str:
        canonical = _SPLIT_ALIASES.get(split.lower(), split.lower())
        if canonical not in self.splits:
            raise InputError(self.name, f"unknown split {split!r}; expected one of {list(self.splits)}")
        return canonical

    def _file(self, relative: str | os.PathLike) -> Path:
        """A file under the root, which must exist."""
        path = self.root / relative
        if not path.is_file():
            raise InputError(path, f"{self.name} file not found")
        return path


def read_name_list(path: Path) -> list[str]:
    """Non-blank lines of a split list file, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, from its header only."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise InputError(path, "image not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(path, f"cannot read the image: {error}") from None


def read_array_image(path: Path, index: int) -> np.ndarray:
    """Image ``index`` of an (N, H, W, 3) ``.npy`` array as uint8 RGB. Floats are taken as 0-255 values (PanNuke
    stores them as float64), never rescaled from 0-1: an all-dark image must not turn white."""
    images = load_array(path)
    if images.ndim != 4 or images.shape[-1] != 3 or not 0 <= index < len(images):
        raise InputError(path, f"no RGB image {index} in an array of shape {images.shape}")
    image = np.asarray(images[index])
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return to_rgb_uint8(image, f"{path}[{index}]")


def load_array(path: Path) -> np.ndarray:
    """A ``.npy`` array, memory-mapped (PanNuke's mask files are gigabytes: only what is indexed is read)."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the array file: {error}") from None


def read_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a MATLAB file (only those are read), each required."""
    try:
        contents = scipy.io.loadmat(path, variable_names=list(keys))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    # a non-.mat file; NotImplementedError: a MATLAB 7.3 (HDF5) file, which scipy does not read
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, NotImplementedError) as error:
        raise InputError(path, f"cannot read the MATLAB file: {error}") from None
    missing = [key for key in keys if key not in contents]
    if missing:
        present = sorted(name for name, _, _ in scipy.io.whosmat(path))
        raise InputError(path, f"no {missing} array(s); the file holds {present}")
    return {key: contents[key] for key in keys}
