"""Shared test helpers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denuc.io import write_points
from denuc.nuclei import Nuclei


def write_points_folder(root: Path, splits: dict[str, list[tuple[str, np.ndarray | Path, Nuclei]]],
                        meta: dict | None = None, suffix: str = ".csv") -> Path:
    """A `points` dataset: ``splits`` maps a split to (name, image array or file, nuclei) items."""
    for split, items in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, image, nuclei in items:
            if isinstance(image, Path):
                shutil.copy(image, root / split / f"{name}{image.suffix}")
            else:
                Image.fromarray(image).save(root / split / f"{name}.png")
            write_points(root / split / f"{name}{suffix}", nuclei)
    (root / "dataset.json").write_text(json.dumps({"mpp": 0.5} if meta is None else meta))
    return root


@pytest.fixture
def points_folder() -> Callable[..., Path]:
    return write_points_folder


@pytest.fixture(autouse=True, scope="session")
def onnx_cache(tmp_path_factory) -> Path:
    """Exported ONNX graphs go to a folder of this test session, not the user's cache."""
    folder = tmp_path_factory.mktemp("denuc_cache")
    os.environ["DENUC_CACHE"] = str(folder)
    return folder / "onnx"
