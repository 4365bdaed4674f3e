"""`denuc detect`: nucleus centres in image files, written as CSV, QuPath GeoJSON and an overview PNG."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from denuc.cli.options import COUNT, POSITIVE, PROBABILITY, device, output_folder
from denuc.config import RUNTIMES

if TYPE_CHECKING:
    import numpy as np

SAMPLE = ("sample_brcam2c.png", 0.5)  # bundled sample image and its pixel size (BRCA-M2C, BSD-3)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help=__doc__.split(": ", 1)[1])
    p.add_argument("images", nargs="*", type=Path,
                   help="image files (PNG, JPEG, TIFF, BMP) or slides small enough to hold in memory (larger "
                        "ones: denuc predict --detector-only)")
    p.add_argument("--sample", action="store_true", help="also run on the bundled sample H&E image (0.5 um/px)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs of an earlier run in --out (without it, an image whose outputs exist is "
                        "refused before any work)")
    p.add_argument("--mpp", type=POSITIVE,
                   help="pixel size of the images in um/px: required for plain images (PNG, JPEG, BMP); for a "
                        "slide or TIFF with one in its metadata, overrides it (with a warning when they differ by "
                        "more than 10%%)")
    p.add_argument("--model", default="default",
                   help="detector: a shipped name (denuc models; default: %(default)s) or a .safetensors file; a "
                        "bundle runs its own detector")
    p.add_argument("--threshold", type=PROBABILITY,
                   help="score threshold in [0, 1] (default: the model's, chosen on validation)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="where the detector runs: torch, onnx (ONNX Runtime, CPU), or auto: onnx on a CPU, torch "
                        "on a GPU (default)")
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="test-time augmentation: detect in this many flipped/transposed views and fuse the points "
                        "(8: +1.5 validation F1 points for 8x the detector's time; default: %(default)s, off)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="tiles per model call (default: %(default)s)")
    p.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")


def run(args: argparse.Namespace) -> int:
    """Like ``denuc predict --detector-only``: each input's own pixel size unless --mpp; a bad input is reported
    and the others still run; the status is 2 when any was not done."""
    from denuc.errors import InputError, OutputExistsError, describe_os_error
    from denuc.inference.detect import Detector
    from denuc.io import write_points
    from denuc.io.overlay import write_overlay

    jobs = [(path, args.mpp) for path in args.images]
    if args.sample:
        jobs.append((Path(str(resources.files("denuc") / "data" / SAMPLE[0])), SAMPLE[1]))
    if not jobs:
        raise InputError("", "no images given (pass image files, or --sample)")
    output_folder(args.out)
    stems = {}
    for path, _ in jobs:  # checked before any work; outputs are named by stem
        if path.stem in stems:
            raise InputError(path, f"same file name as {stems[path.stem]}: its outputs in {args.out} would "
                                   "overwrite each other; process it into another --out folder")
        stems[path.stem] = path
        existing = [output for output in outputs(args.out, path) if output.exists()]
        if existing and not args.overwrite:
            raise OutputExistsError(existing[0], "exists (an earlier run's output): pass --overwrite to replace it, "
                                                 "or choose another --out")
    detector = Detector.from_pretrained(args.model, device=args.device, runtime=args.runtime)
    detector.with_settings(test_time_views=args.tta)
    if args.threshold is not None:
        detector.with_settings(score_threshold=args.threshold)
    failed = []
    for path, mpp in jobs:
        try:
            image, image_mpp = _read(path, mpp)
            nuclei = detector.detect(image, mpp=image_mpp, batch_size=args.batch_size)
            csv, geojson, overview = outputs(args.out, path)
            write_points(csv, nuclei)
            write_points(geojson, nuclei)
            write_overlay(overview, image, nuclei)
        except (InputError, OSError) as error:  # OSError: a full disk, an unreadable file; the next image may do
            print(f"denuc detect: error: {error if isinstance(error, InputError) else describe_os_error(error)}",
                  file=sys.stderr)
            failed.append(path)
            continue
        print(f"{path}: {len(nuclei)} nuclei -> {csv}, {geojson}, {overview}")
    if failed:
        print(f"denuc detect: {len(failed)} of {len(jobs)} images not done: " + ", ".join(map(os.fspath, failed)),
              file=sys.stderr)
        return 2
    return 0


def _read(path: Path, mpp: float | None) -> tuple[np.ndarray, float]:
    """The pixels of an image or of a slide's full resolution, and their pixel size: ``mpp`` if given, else the
    file's own (as ``denuc predict`` reads it); the slide reader's warnings (a contradicted --mpp) are printed."""
    from denuc.errors import InputError
    from denuc.io.slides import open_slide

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open_slide(path, mpp=mpp) as slide:
                if not slide.fits_in_memory(0):
                    width, height = slide.dimensions
                    raise InputError(path, f"too large for `denuc detect` ({width} x {height} px): `denuc predict "
                                           "--detector-only` reads a slide tile by tile")
                return slide.read_region(0, 0, 0, *slide.dimensions), slide.mpp
        finally:
            for warning in caught:
                print(f"denuc detect: warning: {warning.message}", file=sys.stderr)


def outputs(out: Path, image: Path) -> tuple[Path, Path, Path]:
    """The CSV, GeoJSON and overview PNG written for ``image`` (the overview named as ``denuc predict``'s)."""
    # names by concatenation: Path.with_suffix would cut a dotted stem such as BRCAM2C's "..._1000_0.9824"
    csv, geojson, overview = (out / f"{image.stem}{suffix}" for suffix in (".csv", ".geojson", "_overview.png"))
    return csv, geojson, overview
