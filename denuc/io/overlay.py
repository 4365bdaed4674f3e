"""Overlay pictures: nuclei drawn as coloured dots on the image, to look at what a model found."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from denuc.io.atomic import atomic_path
from denuc.nuclei import UNLABELLED, Nuclei

UNLABELLED_COLOR = (0, 255, 0)
PNG_COMPRESS_LEVEL = 1  # zlib's fastest: a 1024 px overview in 72 instead of 119 ms, 10% larger (measured)


def write_overlay(path: str | os.PathLike, image: np.ndarray, nuclei: Nuclei, radius: float = 3.0) -> None:
    """Write ``image`` (RGB uint8) as PNG with a dot of each nucleus's class colour (green when unlabelled)."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    colors = {c.name: tuple(c.color) for c in nuclei.classes}
    for (x, y), label in zip(nuclei.xy, nuclei.labels):
        color = UNLABELLED_COLOR if label == UNLABELLED else colors.get(label, UNLABELLED_COLOR)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=2)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
