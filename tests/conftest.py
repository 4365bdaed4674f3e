"""Shared test helpers, and where the tests find data.

Tests run on a clean clone: they use the files packaged with denuc (``SAMPLE_IMAGE`` and its ground-truth
``SAMPLE_POINTS``) and data they build. The tests that need the read-only shared data (datasets, real slides)
find it under ``SHARED`` and skip, saying what is missing, when it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denuc.io import write_points
from denuc.nuclei import Nuclei

SHARED = Path(os.environ.get("DENUC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
"""The shared data: ``../shared`` beside the checkout, or ``$DENUC_SHARED`` (``=/nonexistent`` runs the tests as
a clone without it would)."""
SAMPLE_IMAGE = Path(str(resources.files("denuc") / "data" / "sample_brcam2c.png"))
SAMPLE_POINTS = SAMPLE_IMAGE.with_suffix(".csv")  # its annotated nuclei (BRCA-M2C), see denuc/data/README.md
SAMPLE_MPP = 0.5


def _absent(path: Path) -> str:
    return f"{path} is absent: this test needs the shared data (../shared beside the checkout, or $DENUC_SHARED)"


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Mark a test to skip, with the reason, when a file or folder of the shared data is absent."""
    return pytest.mark.skipif(not path.exists(), reason=_absent(path))


def shared_or_skip(path: Path) -> Path:
    """``path`` when it exists, else skip the test (or fixture) calling this, with the reason."""
    if not path.exists():
        pytest.skip(_absent(path))
    return path


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
