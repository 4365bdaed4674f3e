"""`denuc predict`: nuclei of whole slides (or images): tables, QuPath GeoJSON, overview and summary."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from denuc.cli import predict_cohort
from denuc.cli.detect import SAMPLE
from denuc.cli.options import COUNT, NON_NEGATIVE, PROBABILITY, device, output_folder, pixel_size
from denuc.config import FINE_SCAN_MPP, MPP_AUTO, RUNTIMES

if TYPE_CHECKING:  # the networks' modules load only when a command runs
    from denuc.colour import StainNormaliser
    from denuc.inference.outline import Outliner
    from denuc.inference.pipeline import Pipeline

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm",
                  ".png", ".jpg", ".jpeg", ".bmp"}
"""What a folder is searched for: the formats OpenSlide reads, and plain images."""
AUTO_DETECTOR = "auto"
"""``--detector auto``: `precise` for 40x scans (finer than ``FINE_SCAN_MPP``), the bundle's own detector otherwise."""
OUTLINES_FOR_DETECTOR = "for-detector"
"""``--outlines`` without a model: the shipped head that reads the run's detector's maps (``Outliner.for_detector``)."""
TRAINING_COLOURS = "training"
"""``--normalise-stain`` without a reference: the model's training colours (``denuc.hub.describe``)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help=__doc__.split(": ", 1)[1],
                              description="Detect and classify the nuclei of whole-slide images; see docs/slides.md.")
    p.add_argument("inputs", nargs="*", type=Path,
                   help="slides (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...), plain images, or folders of them")
    p.add_argument("--out", type=Path, required=True, help="output folder (one set of files per slide)")
    p.add_argument("--sample", action="store_true", help="also run on the bundled sample H&E image (0.5 um/px)")
    p.add_argument("--model", help="a shipped model name (denuc models) or a model file (default: default-bundle, the "
                                   "detector + classifier; with --detector-only: default, the detector `denuc detect` "
                                   "runs)")
    p.add_argument("--detector-only", action="store_true",
                   help="detect only, as `denuc detect` does with the same --model (a bundle's own detector for a "
                        "bundle): no classifier, every nucleus unlabelled")
    p.add_argument("--detector", metavar="MODEL",
                   help="detect with this detector instead of the bundle's own; the bundle's classifier labels its "
                        "nuclei (e.g. --detector precise: crowded 40x tissue); auto: precise for each 40x scan "
                        "(finer than 0.35 um/px), the bundle's own for the others")
    p.add_argument("--threshold", type=PROBABILITY,
                   help="the detector's score threshold in [0, 1], for every scan (default: the model's, chosen on "
                        "validation, one for 20x and one for 40x scans; per-dataset optima in DETECTOR_CARD.md)")
    p.add_argument("--taxonomy",
                   help="the classifier head, i.e. which classes nuclei get (the default bundle's heads: "
                        f"{_default_taxonomies()}; default: the bundle's first)")
    p.add_argument("--mpp", type=pixel_size,
                   help="pixel size of the inputs in um/px: overrides the slide metadata (with a warning when "
                        "they differ by more than 10%%); auto: estimated from each input's pixels (roughly: "
                        "docs/pixel_size.md). Every run checks the pixel size used against the nuclei found")
    p.add_argument("--no-tissue-mask", action="store_true", help="process the whole slide, not just the tissue")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue interrupted runs from their saved chunks")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the outputs in --out of earlier runs (other inputs of the same name, other "
                            "settings) and discard their saved chunks; without it these are refused, and a slide "
                            "already done with the same model and settings is kept")
    p.add_argument("--embeddings", action="store_true", help="also save the classifier's per-nucleus features")
    p.add_argument("--keep-rejected", action="store_true",
                   help="keep the detections the classifier calls 'not a nucleus', labelled with their most probable "
                        "class: for images unlike the training data, where that class rejects true nuclei "
                        "(CLASSIFIER_CARD.md)")
    p.add_argument("--normalise-stain", nargs="?", const=TRAINING_COLOURS, metavar="REFERENCE",
                   help="move each slide's colours to the model's training colours (Reinhard's transfer of the "
                        "slide's tissue colour statistics, one for the whole slide) before it runs: for slides from "
                        "another lab, where it kept 6 more points of class F1 on validation, but it costs 4 in our "
                        "own labs' colours (CLASSIFIER_CARD.md); REFERENCE: an image whose colours to use instead")
    p.add_argument("--outlines", nargs="?", const=OUTLINES_FOR_DETECTOR, metavar="MODEL",
                   help="also outline each nucleus and measure it (area, perimeter, shape, haematoxylin density): "
                        "polygons in the GeoJSON, measurements in every table (docs/outlines.md); MODEL: an outline "
                        "head (default: the shipped head that reads the detector's own maps, precise-outlines "
                        "behind precise, else default-outlines)")
    p.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="where the networks run: torch, onnx (ONNX Runtime, CPU: the detector and a convolutional "
                        "classifier encoder), or auto: onnx on a CPU, torch on a GPU (default)")
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="test-time augmentation: detect and classify in this many flipped/transposed views of each "
                        "tile and fuse the results (8: +2 validation F1 points for about 8x the time; default: "
                        "%(default)s, off)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="tiles per model call (default: %(default)s)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=2, help="tile-reading threads; 0 reads in the main thread")
    p.add_argument("--chunk-tiles", type=COUNT, help=argparse.SUPPRESS)  # tiles per saved chunk, for tests
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-slide lines (errors still print)")
    predict_cohort.add_options(p)  # --manifest, --cluster, --retries


def _default_taxonomies() -> str:
    """The default bundle's heads and their classes, from its metadata (no torch), for --help."""
    import json

    from denuc.errors import InputError
    from denuc.hub import read_metadata, shipped

    try:
        heads = json.loads(read_metadata(shipped("default-bundle").path)["taxonomies"])
    except (InputError, KeyError, ValueError):  # weights missing or without heads: --help must still work
        return "see `denuc models`"
    return "; ".join(f"{head} ({', '.join(c['name'] for c in classes)})" for head, classes in heads.items())


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the slides and images in them (recursively, sorted). A DICOM slide is
    a folder of .dcm files: its first file stands for it."""
    from denuc.errors import InputError

    found = []
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                           and not p.name.startswith("."))
            seen_dicom = set()
            for file in files:
                if file.suffix.lower() == ".dcm":
                    if file.parent in seen_dicom:
                        continue
                    seen_dicom.add(file.parent)
                found.append(file)
            if not files:
                raise InputError(path, f"folder holds no slides or images (looked for {sorted(SLIDE_SUFFIXES)})")
        else:
            found.append(path)
    return found


def run(args: argparse.Namespace) -> int:
    from denuc.errors import InputError, describe_os_error
    from denuc.hub import describe, resolve
    from denuc.inference.detect import Detector
    from denuc.inference.mpp import estimating_detector, open_for_run
    from denuc.inference.pipeline import Pipeline
    from denuc.inference.slide import predict_slide

    output_folder(args.out)
    if args.taxonomy is not None and args.detector_only:
        raise InputError("--taxonomy", "chooses a classifier head, and --detector-only runs no classifier: drop "
                                       "one of them")
    if args.detector is not None and args.detector_only:
        raise InputError("--detector", "replaces a bundle's detector before its classifier; for a detector alone "
                                       "use --model with --detector-only")
    if args.cluster or args.manifest:
        for option, value in (("--detector", args.detector), ("--threshold", args.threshold),
                              ("--keep-rejected", args.keep_rejected or None),
                              ("--normalise-stain", args.normalise_stain)):
            if value is not None:
                raise InputError(option, "not supported with --manifest or --cluster yet: run without it")
        if args.taxonomy is not None:
            raise InputError("--taxonomy", "not supported with --manifest or --cluster yet: run without them")
        if args.outlines is not None:
            raise InputError("--outlines", "not supported with --manifest or --cluster yet: run without them")
        return predict_cohort.run(args)
    jobs = [(path, args.mpp, None) for path in collect_inputs(args.inputs)]
    if args.sample:
        sample = Path(str(resources.files("denuc") / "data" / SAMPLE[0]))
        jobs.append((sample, SAMPLE[1], f"bundled sample image ({SAMPLE[1]} um/px)"))
    if not jobs:
        raise InputError("", "no slides given (pass slide files or folders, or --sample)")
    if args.detector_only:
        name = args.model or "default"
        model = Pipeline(Detector.from_pretrained(name, device=args.device, runtime=args.runtime))
    else:
        name = args.model or "default-bundle"
        if args.taxonomy is not None:  # checked on the metadata, before the networks load
            heads = describe(name).get("taxonomies", {})
            if args.taxonomy not in heads:
                raise InputError(name, f"--taxonomy {args.taxonomy!r}: no such classifier head; this model has "
                                       + (", ".join(heads) if heads else "none (it is a detector alone)"))
        model = Pipeline.from_pretrained(name, device=args.device, runtime=args.runtime, taxonomy=args.taxonomy)
        if args.detector is not None and model.classifier is None:
            raise InputError(name, "--detector replaces a bundle's detector, and this model has no classifier")
    if args.embeddings and model.classifier is None:
        raise InputError(name, "--embeddings saves the classifier's features, and this model has no classifier")
    if args.keep_rejected and model.classifier is None:
        raise InputError(name, "--keep-rejected keeps what the classifier rejects, and this model has no classifier")
    described = describe(name)
    base = {"model": {k: described[k] for k in ("tag", "file", "sha256", "kind", "denuc_version")},
            "detector_only": args.detector_only, "command": args.command_line}
    normaliser = None if args.normalise_stain is None else _normaliser(args.normalise_stain, name, described)
    # what an input runs: with --detector auto, `precise` for 40x scans (chosen once the input's pixel size is known)
    auto = args.detector == AUTO_DETECTOR
    coarse = _prepared(model, None if auto else args.detector, args, base)
    fine = _prepared(model, "precise", args, base) if auto else coarse
    say = (lambda *a: None) if args.quiet else print
    detector = None if auto else args.detector
    own_file = (resolve(detector, kind="detector") if detector is not None  # a bundle's detector has none
                else resolve(name, kind="detector") if args.detector_only else None)

    def estimator() -> Detector:  # the pixel-size estimator runs the detector of 20x scans
        return estimating_detector(coarse.model.detector, own_file)

    failed, stems = [], {}
    for index, (path, mpp, mpp_source) in enumerate(jobs):
        try:
            if path.stem in stems:
                raise InputError(path, f"same file name as {stems[path.stem]}: its outputs in {args.out} would "
                                       "overwrite each other; process it into another --out folder")
            stems[path.stem] = path
            with warnings.catch_warnings(record=True) as caught:  # opening warns too (a contradicted --mpp)
                warnings.simplefilter("always")
                try:
                    with open_for_run(path, mpp, estimator, mpp_source) as (slide, estimate):
                        if mpp == MPP_AUTO:
                            say(f"{path}: pixel size estimated from the image: {estimate.mpp:.2f} um/px "
                                f"(confidence {estimate.confidence:.2f})")
                        run = fine if slide.mpp < FINE_SCAN_MPP else coarse
                        summary = predict_slide(
                            slide, run.model, args.out, tissue_mask=not args.no_tissue_mask, resume=args.resume,
                            overwrite=args.overwrite, batch_size=args.batch_size, workers=args.workers,
                            embeddings=args.embeddings, progress=not args.quiet, model_name=name,
                            model_id=run.model_id, provenance=run.provenance, mpp_estimate=estimate,
                            outliner=run.outliner, normaliser=normaliser,
                            **({"chunk_tiles": args.chunk_tiles} if args.chunk_tiles else {}))
                finally:
                    for warning in caught:
                        print(f"denuc predict: warning: {warning.message}", file=sys.stderr)
        except (InputError, OSError) as error:  # OSError: a full disk, an unreadable file; the next input may do
            print(f"denuc predict: error: {error if isinstance(error, InputError) else describe_os_error(error)}",
                  file=sys.stderr)
            failed.append(path)
            continue
        except KeyboardInterrupt:
            print(_interrupted(args, path, failed + [job[0] for job in jobs[index:]]), file=sys.stderr)
            return 130
        if summary.get("skipped"):
            say(f"{path}: already done with the same model and settings, kept ({args.out / path.stem}_summary.json)")
            continue
        density = summary["density_per_mm2"]["all"]
        say(f"{path}: {summary['nuclei']} nuclei in {summary['tissue']['area_mm2']:.2f} mm^2 of tissue "
            f"({density or 0:.0f}/mm^2), {summary['runtime_s']:.1f} s -> {args.out / path.stem}.*")
    if failed:
        saved = [p for p in failed if (args.out / f".{p.stem}.partial").is_dir()]
        print(f"denuc predict: {len(failed)} of {len(jobs)} inputs not done: " + ", ".join(map(os.fspath, failed))
              + (f"; the chunks saved for {len(saved)} of them are kept: add --resume to continue" if saved else ""),
              file=sys.stderr)
        return 2
    return 0


def _normaliser(reference: str, name: str, described: dict) -> "StainNormaliser":
    """What ``--normalise-stain`` moves slides to: the model's training colours, or a reference image's."""
    from denuc.colour import StainNormaliser
    from denuc.errors import InputError
    from denuc.io.images import read_image

    if reference != TRAINING_COLOURS:
        try:
            return StainNormaliser.fit([read_image(reference)])
        except ValueError:
            raise InputError(reference, "--normalise-stain: no tissue in this image to take colours from") from None
    if described["training_colours"] is None:
        raise InputError(name, "--normalise-stain: this model records no training colours; give an image whose "
                               "colours to use (--normalise-stain REFERENCE.png)")
    return StainNormaliser.from_dict(described["training_colours"])


@dataclass
class _Run:
    """What an input runs: the pipeline, its outline head (None: no outlines), its fingerprint and provenance."""

    model: Pipeline
    outliner: Outliner | None
    model_id: str
    provenance: dict


def _prepared(model: Pipeline, detector: str | None, args: argparse.Namespace, base: dict) -> _Run:
    """``model``, with ``detector`` (a detector name or file) in place of its own when given, the --threshold and
    --outlines of ``args`` applied, and the provenance ``base`` completed for it."""
    from denuc.hub import describe
    from denuc.inference.detect import Detector
    from denuc.inference.slide import model_fingerprint

    if detector is not None:
        model = model.with_detector(Detector.from_pretrained(detector, device=args.device, runtime=args.runtime))
    model.with_test_time_views(args.tta)
    model.reject = not args.keep_rejected
    if args.threshold is not None:
        model.detector.with_settings(score_threshold=args.threshold, score_threshold_40x=None)  # for every scan
    outliner, outlines = None, args.outlines
    if outlines is not None:
        from denuc.inference.outline import Outliner

        if outlines == OUTLINES_FOR_DETECTOR:
            outliner, outlines = Outliner.for_detector(model.detector, device=args.device, runtime=args.runtime)
        else:
            outliner = Outliner.from_pretrained(outlines, device=args.device, runtime=args.runtime)
    keys = ("tag", "file", "sha256", "denuc_version")
    provenance = {**base, "outlines": None if outlines is None else {k: describe(outlines)[k] for k in keys},
                  "detector": None if detector is None else {k: describe(detector)[k] for k in keys}}
    return _Run(model, outliner, model_fingerprint(model), provenance)


def _interrupted(args: argparse.Namespace, path: Path, not_done: list[Path]) -> str:
    """What Ctrl-C stopped, what is kept, and the command that continues (the same one, with --resume)."""
    import json

    partial = args.out / f".{path.stem}.partial"
    try:
        total = json.loads((partial / "manifest.json").read_text())["chunks"]
        kept = f"{len(list(partial.glob('chunk_*.parquet')))} of its {total} chunks are saved in {partial}"
    except (OSError, ValueError, KeyError):
        kept = "no chunk of it was saved yet"
    command = ["denuc", *(a for a in args.command_line[1:] if a != "--overwrite")]
    command += [] if "--resume" in command else ["--resume"]
    return (f"denuc predict: interrupted while processing {path}: {kept}; not done: "
            f"{', '.join(map(os.fspath, not_done))}\ndenuc predict: to continue: {shlex.join(command)}")
