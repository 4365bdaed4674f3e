"""Whole-slide images and plain images behind one small API: ``open_slide(path, mpp=None) -> Slide``.

Readers, tried in this order: OpenSlide (SVS, NDPI, MRXS, SCN, BIF, DICOM, generic tiled TIFF, ...), then
tiffslide for TIFFs OpenSlide cannot open, then Pillow for plain images (PNG, JPEG, BMP, untiled TIFF).

The pixel size comes from ``mpp`` when given (the ``--mpp`` option; a warning when it is more than 10% off the
metadata's), else from the file's metadata. When neither has it, opening fails with an InputError that says how
to pass it: denuc never guesses a pixel size from the objective power, because scanners differ (a "20x" scan
can be 0.5 or 0.46 um/px). ``--mpp auto`` estimates it from the pixels instead (``denuc.inference.mpp``): such a
file is opened with ``mpp_required=False`` and its pixel size set by the caller.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from denuc.errors import InputError
from denuc.io.images import read_image

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
PLAUSIBLE_MPP = (0.05, 50.0)
"""Pixel sizes (um/px) outside this range are metadata defaults or errors, not real scans."""
MPP_CONTRADICTION = 0.10
"""A given ``mpp`` this far (relative) from the metadata's is warned about: scanners' own values differ by a few %."""
BAND_ROWS = 512  # large reads are split into bands of this many rows, one band per thread at a time
WHOLE_LEVEL_MAX_BYTES = 256 * 2**20  # a level up to this size (RGB) may be decoded whole and held in memory


@dataclass
class Slide:
    """An open slide: level 0 is the full resolution; ``mpp`` is the pixel size of level 0 in um/px.

    ``read_region`` and ``thumbnail`` return RGB uint8 arrays; areas outside the slide and transparent
    pixels read as white (glass). Reading from several threads at once is safe.
    """

    path: Path
    backend: str
    mpp: float
    mpp_source: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    properties: dict[str, str] = field(default_factory=dict)
    _handle: object = None
    _in_memory: dict[int, np.ndarray] = field(default_factory=dict)  # level -> its decoded pixels

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", self.properties.get("tiffslide.vendor", self.backend))

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are no larger than ``target_mpp`` (never coarser: no lost detail)."""
        fitting = [k for k, d in enumerate(self.level_downsamples) if self.mpp * d <= target_mpp * (1 + 1e-3)]
        return max(fitting, key=lambda k: self.level_downsamples[k]) if fitting else 0

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """The ``width`` x ``height`` pixels of ``level`` whose top-left pixel is (x, y) in *level* pixels.

        The request may reach outside the level; that part is white.
        """
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        level_w, level_h = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, level_w), min(y + height, level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read(x0, y0, level, x1 - x0, y1 - y0)
        return out

    def thumbnail_level(self, max_size: int) -> int:
        """The level ``thumbnail(max_size)`` reads: the coarsest one still at least as fine as the thumbnail."""
        scale = min(1.0, max_size / max(self.dimensions))
        return max((k for k, d in enumerate(self.level_downsamples) if d * scale <= 1 + 1e-9),
                   key=lambda k: self.level_downsamples[k], default=0)

    def fits_in_memory(self, level: int) -> bool:
        """Whether ``level`` is small enough (at most WHOLE_LEVEL_MAX_BYTES as RGB) to be decoded whole."""
        width, height = self.level_dimensions[level]
        return 3 * width * height <= WHOLE_LEVEL_MAX_BYTES

    def thumbnail(self, max_size: int, workers: int = 2) -> np.ndarray:
        """The whole slide as RGB uint8, resized so that its longer side is at most ``max_size`` pixels.

        ``thumbnail_level`` is read and box-filtered: what OpenSlide's get_thumbnail does, without its RGBA
        round trip and Lanczos filter. A level larger than WHOLE_LEVEL_MAX_BYTES (a single-level slide's one
        level can be gigabytes) is read in bands of about BAND_ROWS rows on ``workers`` threads, each filtered
        to its rows of the thumbnail, so memory stays bounded; the result then differs from a whole-level
        filter only where a level pixel's centre falls exactly on a box edge (rounding, a few rows).
        """
        w, h = self.dimensions
        scale = min(1.0, max_size / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        level = self.thumbnail_level(max_size)
        level_w, level_h = self.level_dimensions[level]
        if (level_w, level_h) == size:
            return self._read(0, 0, level, level_w, level_h).copy()  # a copy: not a view of in-memory pixels
        step = size[1] if self.fits_in_memory(level) else max(1, BAND_ROWS * size[1] // level_h)  # rows per band

        def band(first: int) -> np.ndarray:
            last = min(first + step, size[1])
            y0, y1 = first * level_h / size[1], last * level_h / size[1]  # exact at 0 and level_h
            top, bottom = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, level_h)
            pixels = Image.fromarray(self._read(0, top, level, level_w, bottom - top))
            return np.asarray(pixels.resize((size[0], last - first), Image.Resampling.BOX,
                                            box=(0, y0 - top, level_w, y1 - top)))

        with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="denuc-decode") as pool:
            return np.concatenate(list(pool.map(band, range(0, size[1], step))))

    @contextlib.contextmanager
    def level_in_memory(self, level: int, workers: int = 2) -> Iterator[None]:
        """Within the block, ``level`` is held decoded in memory (3 bytes a pixel) and reads of it slice that.

        For a level that is read whole anyway: the only level of a single-level slide, which the thumbnail
        decodes in full, need not be decoded a second time for its tiles. Bands of rows are decoded on
        ``workers`` threads (the readers release the GIL while decoding). A Pillow image is in memory already.
        """
        if self.backend == "pil":
            yield
            return
        width, height = self.level_dimensions[level]
        pixels = np.empty((height, width, 3), np.uint8)

        def decode(y: int) -> None:
            rows = min(BAND_ROWS, height - y)
            pixels[y:y + rows] = self._read(0, y, level, width, rows)

        with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="denuc-decode") as pool:
            list(pool.map(decode, range(0, height, BAND_ROWS)))
        self._in_memory[level] = pixels
        try:
            yield
        finally:
            del self._in_memory[level]

    def close(self) -> None:
        if self.backend != "pil":
            self._handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels of a region that lies inside the level."""
        if level in self._in_memory:
            return self._in_memory[level][y:y + height, x:x + width]
        if self.backend == "pil":
            return self._handle[y:y + height, x:x + width]
        # Both libraries take the location in level-0 pixels and the size in pixels of the level.
        downsample = self.level_downsamples[level]
        try:
            region = self._handle.read_region((round(x * downsample), round(y * downsample)), level, (width, height))
        except Exception as error:  # a corrupt tile is the slide's problem: name it
            raise InputError(self.path, f"cannot read region ({x}, {y}) of level {level}: {error}") from None
        return _rgb_on_white(region)


def _rgb_on_white(image: Image.Image) -> np.ndarray:
    """RGB uint8 of a PIL image; transparent pixels (outside the scanned area) become white."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255:  # opaque tiles skip the blend
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, mpp_required: bool = True) -> Slide:
    """Open a whole-slide image or a plain image; ``mpp`` (um/px of level 0) overrides the metadata.

    Raises InputError naming the file when it is missing, unreadable, of an unsupported format, or has no
    (plausible) pixel size and none was passed; with ``mpp_required=False`` such a file opens with ``mpp`` NaN
    and ``mpp_source`` "unknown", for the caller to set.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a file")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise InputError(path, f"--mpp must be a positive number of um/px, got {mpp}")
    suffix = path.suffix.lower()
    if suffix in PLAIN_IMAGE_SUFFIXES:
        backend, handle, properties, levels = _open_pil(path)
    else:
        opened = _open_openslide(path)
        if opened is None and suffix in TIFF_SUFFIXES:
            opened = _open_tiffslide(path) or _open_pil(path)
        if opened is None:
            raise InputError(path, "unsupported or unreadable slide format: OpenSlide cannot open it "
                                   "(supported: SVS, NDPI, MRXS, SCN, BIF, VMS, DICOM, tiled TIFF; "
                                   "plain PNG, JPEG, TIFF, BMP images)")
        backend, handle, properties, levels = opened
    dimensions, downsamples = levels
    if mpp is not None:
        mpp_used, source = float(mpp), "--mpp"
        stated = _stated_mpp(properties)
        if stated is not None and abs(mpp_used - stated[0]) > MPP_CONTRADICTION * stated[0]:
            # a wrong pixel size gives plausible-looking junk, so a contradiction is said (and recorded in the source)
            source = f"--mpp (the metadata says {stated[0]:g} um/px)"
            warnings.warn(f"{path}: --mpp {mpp_used:g} um/px differs by more than {MPP_CONTRADICTION:.0%} from the "
                          f"pixel size in the slide's metadata, {stated[0]:g} um/px ({stated[1]}); using --mpp "
                          f"{mpp_used:g}", stacklevel=2)
    else:
        try:
            mpp_used, source = _metadata_mpp(path, properties)
        except InputError:
            if mpp_required:
                raise
            mpp_used, source = math.nan, "unknown"
    return Slide(path, backend, mpp_used, source, dimensions, downsamples, properties, handle)


def _open_openslide(path: Path):
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as error:
        raise InputError(path, f"unreadable slide: {error}") from None
    levels = ([tuple(d) for d in handle.level_dimensions], [float(d) for d in handle.level_downsamples])
    return "openslide", handle, dict(handle.properties), levels


def _open_tiffslide(path: Path):
    try:
        import tiffslide
    except ImportError:  # optional: without it, TIFFs OpenSlide refuses go straight to Pillow
        return None
    try:
        handle = tiffslide.TiffSlide(str(path))
        levels = ([tuple(d) for d in handle.level_dimensions], [float(d) for d in handle.level_downsamples])
    except Exception:  # tiffslide has no error hierarchy of its own; Pillow gets the next try
        return None
    return "tiffslide", handle, {k: str(v) for k, v in handle.properties.items() if v is not None}, levels


def _open_pil(path: Path):
    array = read_image(path)
    properties = {}
    try:
        with Image.open(path) as image:
            # TIFF resolution tags (282/283, unit 296: 2 inch, 3 cm) are real scanner metadata; PNG/JPEG dpi
            # are almost always an editor's 72 or 96 default and are ignored.
            if image.format == "TIFF":
                tags = image.tag_v2
                if 282 in tags and tags.get(296) in (2, 3):
                    per_unit = float(tags[282])
                    unit_um = 25400.0 if tags[296] == 2 else 10000.0
                    if per_unit > 0:
                        properties["tiff.mpp"] = repr(unit_um / per_unit)
    except OSError:
        pass  # read_image above succeeded, so the pixels are fine; only the optional tags are missing
    h, w = array.shape[:2]
    return "pil", array, properties, ([(w, h)], [1.0])


def _stated_mpp(properties: dict[str, str]) -> tuple[float, str] | None:
    """The pixel size in the metadata and the keys it came from (``"metadata: key_x, key_y"``), else None."""
    for key_x, key_y in (("openslide.mpp-x", "openslide.mpp-y"), ("tiffslide.mpp-x", "tiffslide.mpp-y"),
                         ("tiff.mpp", "tiff.mpp")):
        try:
            mpp_x, mpp_y = float(properties[key_x]), float(properties.get(key_y, properties[key_x]))
        except (KeyError, ValueError):
            continue
        return (mpp_x + mpp_y) / 2, f"metadata: {key_x}" + ("" if key_x == key_y else f", {key_y}")
    return None


def _metadata_mpp(path: Path, properties: dict[str, str]) -> tuple[float, str]:
    stated = _stated_mpp(properties)
    if stated is not None:
        mpp, source = stated
        if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            raise InputError(path, f"implausible pixel size {mpp:g} um/px ({source}): pass the right one with "
                                   "--mpp, e.g. --mpp 0.25 for a 40x scan")
        return mpp, source
    power = properties.get("openslide.objective-power") or properties.get("tiffslide.objective-power")
    hint = (f"; the objective power is {power}x, which often but not always means "
            f"{10 / float(power):g} um/px" if _is_number(power) and float(power) > 0 else "")
    raise InputError(path, "pixel size unknown: the file has no pixel size in its metadata" + hint +
                     ". Pass it with --mpp (um/px), e.g. --mpp 0.5 for a 20x scan or --mpp 0.25 for 40x, "
                     "or estimate it from the image with --mpp auto")


def _is_number(text: str | None) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def write_pyramidal_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float, tile: int = 256) -> None:
    """Save an RGB uint8 image as a tiled, pyramidal TIFF (levels halving down to one tile) with its pixel size
    in the resolution tags: a generic slide that OpenSlide and tiffslide open. Written atomically."""
    import tifffile

    from denuc.io.atomic import atomic_path

    levels = [rgb]
    while max(levels[-1].shape[:2]) > tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((max(1, w // 2), max(1, h // 2)),
                                                                    Image.Resampling.BOX)))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tiff:
        for k, level in enumerate(levels):
            per_cm = 1e4 / (mpp * rgb.shape[1] / level.shape[1])
            tiff.write(level, photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": 90},
                       resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                       subfiletype=0 if k == 0 else 1)
