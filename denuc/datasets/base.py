"""What every dataset offers: its taxonomy and pixel size, and its samples per split, read from a root folder.

A dataset never knows where its files live: the user passes the root of their own copy.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image, UnidentifiedImageError

from denuc.errors import InputError
from denuc.nuclei import NucleusClass, Nuclei

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val"}


@dataclass(frozen=True)
class Sample:
    """One annotated image: ``name`` is the image file's stem, ``nuclei`` its ground truth."""

    name: str
    image_path: Path
    nuclei: Nuclei
    dataset: str


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
