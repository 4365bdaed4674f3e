"""Reading H&E images into RGB uint8 arrays, and resampling them to a model's pixel size."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from denuc.errors import InputError

Image.MAX_IMAGE_PIXELS = None  # large tiles are legitimate here; memory is the caller's choice
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 is upright


def to_rgb_uint8(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Convert an image array to (H, W, 3) uint8 RGB, or refuse with a message saying why.

    - RGBA is composited onto white (transparent background in exports is white glass, not black).
    - 16-bit images are scaled to 8 bits (divided by 257, so 65535 -> 255).
    - Grayscale is refused: an H&E model on a grayscale image would silently produce nonsense.
    """
    array = np.asarray(array)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        raise InputError(source, "grayscale image: denuc needs an RGB H&E image (convert it or check the file)")
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(source, f"unsupported image shape {array.shape}: expected (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif array.dtype in (np.float32, np.float64):
        if not np.isfinite(array).all():
            raise InputError(source, "image contains NaN or infinite values")
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputError(source, f"unsupported pixel type {array.dtype}: expected 8- or 16-bit RGB")
    if array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        array = (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (PNG, JPEG, TIFF, BMP, ...) as (H, W, 3) uint8 RGB, upright.

    An EXIF orientation tag (cameras, phone photos of slides) is applied, so the pixels and every coordinate
    denuc reports are those of the image as viewers display it, not as the rotated bytes are stored.
    """
    try:
        with Image.open(path) as image:
            if image.getexif().get(ORIENTATION_TAG, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            if image.mode in ("L", "LA", "1", "I", "F") or image.mode.startswith("I;16"):
                raise InputError(path, f"grayscale image (mode {image.mode}): denuc needs an RGB H&E image")
            array = np.asarray(image)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read image: {error}") from None
    return to_rgb_uint8(array, str(path))


RESAMPLE_TOLERANCE = 0.01
"""Pixel sizes within 1% of the model's are used as they are: scanners report e.g. 0.499 or 0.504 um/px for
0.5, resampling those costs as much CPU as the detector itself, and a 1% scale change is well inside the
training's scale jitter (+-10%). Coordinates stay exact: they are mapped back with the true pixel size."""


def scale_to(mpp: float, target_mpp: float) -> float:
    """The factor that resamples pixels of ``mpp`` um to ``target_mpp``; 1 when they are within
    RESAMPLE_TOLERANCE of each other."""
    factor = mpp / target_mpp
    return 1.0 if abs(factor - 1.0) <= RESAMPLE_TOLERANCE else factor


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """An RGB uint8 ``image`` padded with white on the right and bottom to multiples of ``multiple`` pixels (a
    network's stride); unchanged when it already is."""
    h, w = image.shape[:2]
    if h % multiple == 0 and w % multiple == 0:
        return image
    padded = np.full((-(-h // multiple) * multiple, -(-w // multiple) * multiple, 3), 255, dtype=np.uint8)
    padded[:h, :w] = image
    return padded


def resample_tiles(tiles: np.ndarray, factor: float, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Each tile of a (B, H, W, 3) uint8 batch resampled by ``factor`` and padded to multiples of ``multiple``;
    and (fx, fy), what takes tile pixel coordinates to the resampled tiles' (``(xy + 0.5) * fxy - 0.5``; from the
    rounded sizes, not the factor)."""
    work = np.stack([pad_to_multiple(resample(tile, factor), multiple) for tile in tiles])
    height, width = tiles.shape[1:3]
    return work, np.array([round(width * factor) / width, round(height * factor) / height])


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize an RGB uint8 image by ``factor`` (antialiased bicubic); factor 1 returns it unchanged."""
    if abs(factor - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, int(round(w * factor))), max(1, int(round(h * factor))))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=None))
