"""`denuc detect`: nucleus centres in image files, written as CSV, QuPath GeoJSON and an overview PNG."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from denuc.cli.options import COUNT, PROBABILITY, device, output_folder, pixel_size
from denuc.config import MPP_AUTO, RUNTIMES

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from denuc.inference.detect import Detector
    from denuc.inference.mpp import MppEstimate

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
    p.add_argument("--mpp", type=pixel_size,
                   help="pixel size of the images in um/px: required for plain images (PNG, JPEG, BMP); for a "
                        "slide or TIFF with one in its metadata, overrides it (with a warning when they differ by "
                        "more than 10%%); auto: estimated from each image's pixels (roughly: docs/pixel_size.md)")
    p.add_argument("--model", default="default",
                   help="detector: a shipped name (denuc models; default: %(default)s) or a .safetensors file; a "
                        "bundle runs its own detector")
    p.add_argument("--threshold", type=PROBABILITY,
                   help="score threshold in [0, 1], for every scan (default: the model's, chosen on validation, one "
                        "for 20x and one for 40x scans)")
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
    from denuc.hub import resolve
    from denuc.inference.detect import Detector
    from denuc.inference.mpp import check_plausibility, estimating_detector
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
        detector.with_settings(score_threshold=args.threshold, score_threshold_40x=None)  # for every scan
    own_file = resolve(args.model, kind="detector")

    def estimator() -> Detector:
        return estimating_detector(detector, own_file)

    failed = []
    for path, mpp in jobs:
        try:
            image, image_mpp, estimate = _read(path, mpp, estimator)
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
        # the whole image's area: detect finds no tissue, so an image mostly of glass can read as sparse
        area_mm2 = image.shape[0] * image.shape[1] * image_mpp**2 / 1e6
        for warning in check_plausibility(nuclei.scores, image_mpp, area_mm2, estimate):
            print(f"denuc detect: warning: {path}: {warning}", file=sys.stderr)
        print(f"{path}: {len(nuclei)} nuclei -> {csv}, {geojson}, {overview}")
    if failed:
        print(f"denuc detect: {len(failed)} of {len(jobs)} images not done: " + ", ".join(map(os.fspath, failed)),
              file=sys.stderr)
        return 2
    return 0


def _read(path: Path, mpp: float | str | None, estimator: Callable[[], Detector]
          ) -> tuple[np.ndarray, float, MppEstimate | None]:
    """The pixels of an image or of a slide's full resolution, their pixel size and the image's estimate of it
    when one was taken, as ``denuc predict`` opens an input (``inference.mpp.open_for_run``: ``mpp`` if given,
    the estimate for ``auto``, else the file's own); the opening's warnings (a contradicted --mpp) are printed."""
    from denuc.errors import InputError
    from denuc.inference.mpp import open_for_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open_for_run(path, mpp, estimator) as (slide, estimate):
                if not slide.fits_in_memory(0):
                    width, height = slide.dimensions
                    raise InputError(path, f"too large for `denuc detect` ({width} x {height} px): `denuc predict "
                                           "--detector-only` reads a slide tile by tile")
                if mpp == MPP_AUTO:
                    print(f"{path}: pixel size estimated from the image: {estimate.mpp:.2f} um/px "
                          f"(confidence {estimate.confidence:.2f})")
                return slide.read_region(0, 0, 0, *slide.dimensions), slide.mpp, estimate
        finally:
            for warning in caught:
                print(f"denuc detect: warning: {warning.message}", file=sys.stderr)


def outputs(out: Path, image: Path) -> tuple[Path, Path, Path]:
    """The CSV, GeoJSON and overview PNG written for ``image`` (the overview named as ``denuc predict``'s)."""
    # names by concatenation: Path.with_suffix would cut a dotted stem such as BRCAM2C's "..._1000_0.9824"
    csv, geojson, overview = (out / f"{image.stem}{suffix}" for suffix in (".csv", ".geojson", "_overview.png"))
    return csv, geojson, overview
