"""`denuc classify`: name the cell types of nuclei another tool found (QuPath, StarDist, CellViT, HoVer-Net).

The decoupled design of DeNuC: a bundle's classifier runs at the given nuclei instead of its detector's points.
The outputs are those of `denuc predict` (tables, QuPath GeoJSON with the nuclei's own outlines, overview,
summary), one row per given nucleus in its file's order, the score being the classifier's probability that
the point is a nucleus; --drop-rejected leaves out those the classifier calls "not a nucleus", as predict does
with its own detections (the summary lists them). That probability was learned from the detector's false
positives, so it judges points a detector would find, not any point (blank glass can score high).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from denuc.cli.options import COUNT, NON_NEGATIVE, POSITIVE, device, output_folder
from denuc.config import RUNTIMES

OUTPUT_SUFFIXES = (".csv", ".parquet", ".geojson", "_overview.png", "_summary.json")
"""What classify writes, per input: ``denuc predict``'s outputs but the tissue mask and embeddings."""
MPP_MISMATCH = 0.1
"""Relative difference between the pixel size a nuclei file gives and the input's that is warned of."""
TABLE_BLOCK = 100_000
"""Nuclei written to the tables at a time (bounds the memory of the formatted rows)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("classify", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1])
    p.add_argument("input", type=Path, help="the slide (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...) or image the "
                                            "nuclei were found in")
    p.add_argument("--nuclei", type=Path, required=True,
                   help="the nuclei, level-0 pixels of the input: QuPath GeoJSON (StarDist's too), CellViT "
                        "cells.json or its GeoJSON, HoVer-Net JSON, or a denuc CSV")
    p.add_argument("--type-info", type=Path,
                   help="HoVer-Net's type_info.json, naming the types of a HoVer-Net --nuclei file")
    p.add_argument("--out", type=Path, required=True, help="output folder (files named after the input's stem)")
    p.add_argument("--model", default="default-bundle",
                   help="a shipped bundle (denuc models) or a bundle file; its classifier runs (default: "
                        "%(default)s)")
    p.add_argument("--taxonomy", help="the classifier head, i.e. which classes nuclei get (default: the bundle's "
                                      "first)")
    p.add_argument("--mpp", type=POSITIVE,
                   help="pixel size of the input in um/px: required for plain images, overrides a slide's metadata")
    p.add_argument("--drop-rejected", action="store_true",
                   help="leave out the nuclei the classifier calls \"not a nucleus\" (default: keep every one)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("--device", type=device, default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="where the classifier runs: torch, onnx (ONNX Runtime, CPU; a convolutional encoder), or "
                        "auto: onnx on a CPU, torch on a GPU (default)")
    p.add_argument("--batch-size", type=COUNT, default=8, help="tiles per model call (default: %(default)s)")
    p.add_argument("--workers", type=NON_NEGATIVE, default=2, help="tile-reading threads; 0 reads in the main thread")
    p.add_argument("--quiet", action="store_true", help="no progress bar or closing line (errors still print)")


def run(args: argparse.Namespace) -> int:
    from denuc.errors import OutputExistsError
    from denuc.inference.given_nuclei import classify_given_nuclei
    from denuc.io.foreign import read_nuclei
    from denuc.io.slides import open_slide

    started = time.perf_counter()
    output_folder(args.out)
    paths = {suffix: args.out / f"{args.input.stem}{suffix}" for suffix in OUTPUT_SUFFIXES}
    existing = [path for path in paths.values() if path.exists()]
    if existing and not args.overwrite:
        raise OutputExistsError(existing[0], "exists: pass --overwrite to replace the outputs of an earlier run, "
                                             "or choose another --out")
    with warnings.catch_warnings(record=True) as caught:  # opening warns of a contradicted --mpp
        warnings.simplefilter("always")
        try:
            with open_slide(args.input, mpp=args.mpp) as slide:
                given = read_nuclei(args.nuclei, image_size=slide.dimensions, type_info=args.type_info)
                if given.mpp is not None and abs(given.mpp - slide.mpp) > MPP_MISMATCH * slide.mpp:
                    warnings.warn(f"{args.nuclei}: the file gives {given.mpp:g} um/px, {args.input} has "
                                  f"{slide.mpp:g}: its coordinates must be level-0 pixels of {args.input}")
                model = _classifier(args)
                named, rejected = classify_given_nuclei(slide, model, given, batch_size=args.batch_size,
                                                        workers=args.workers, progress=not args.quiet)
                kept = _write(args, paths, slide, model, named, rejected, started)
        finally:
            for warning in caught:
                print(f"denuc classify: warning: {warning.message}", file=sys.stderr)
    if not args.quiet:
        print(f"{args.input}: {kept} of {len(given)} nuclei classified -> {args.out / args.input.stem}.*")
    return 0



def _classifier(args: argparse.Namespace):
    """The bundle's pipeline (its classifier is what runs); a detector alone is refused."""
    from denuc.errors import InputError
    from denuc.inference.pipeline import Pipeline

    model = Pipeline.from_pretrained(args.model, device=args.device, runtime=args.runtime, taxonomy=args.taxonomy)
    if model.classifier is None:
        raise InputError(args.model, "is a detector alone: classify runs a bundle's classifier (e.g. the default, "
                                     "default-bundle)")
    return model


def _write(args: argparse.Namespace, paths: dict[str, Path], slide, model, named, rejected, started: float) -> int:
    """The tables, overview and summary (written last) of the classified nuclei; returns how many were written."""
    import numpy as np

    from denuc.hub import describe
    from denuc.inference.slide import DOTS_PER_PIXEL_MAX, THUMBNAIL_MAX_SIDE, THUMBNAIL_MIN_MPP, software_versions
    from denuc.io.atomic import write_json
    from denuc.io.overlay import Overview
    from denuc.io.tables import NucleusTableWriter

    kept = named.subset(~rejected) if args.drop_rejected else named
    paths["_summary.json"].unlink(missing_ok=True)  # an earlier run's summary must not describe these outputs
    with NucleusTableWriter(paths[".csv"].with_suffix(""), model.classes, slide.mpp) as tables:
        for first in range(0, len(kept), TABLE_BLOCK):
            tables.write(kept.subset(np.arange(first, min(first + TABLE_BLOCK, len(kept)))))
    picture = slide.thumbnail(min(max(slide.dimensions), THUMBNAIL_MAX_SIDE), workers=max(args.workers, 1))
    scale = picture.shape[1] / slide.dimensions[0], picture.shape[0] / slide.dimensions[1]
    # dots while there are fewer than predict's limit per tissue-mask pixel (THUMBNAIL_MIN_MPP), over the whole input
    mask_pixels = slide.dimensions[0] * slide.dimensions[1] * (slide.mpp / THUMBNAIL_MIN_MPP) ** 2
    overview = Overview(picture, model.classes, slide.mpp / scale[0], scale,
                        dots=len(kept) <= max(mask_pixels, 1) * DOTS_PER_PIXEL_MAX)
    overview.add(kept)
    overview.save(paths["_overview.png"])
    described = describe(args.model)
    rows = np.flatnonzero(rejected).tolist()
    write_json(paths["_summary.json"], {
        "input": {"path": str(slide.path), "backend": slide.backend, "dimensions": list(slide.dimensions)},
        "mpp": slide.mpp, "mpp_source": slide.mpp_source,
        "nuclei_file": str(args.nuclei),
        "nuclei_given": len(named),
        "nuclei": len(kept),
        "counts": {c.name: int((kept.labels == c.name).sum()) for c in model.classes},
        "rows": "the given nuclei in their file's order" + (", less those dropped" if args.drop_rejected else ""),
        "score": "the classifier's probability that the point is a nucleus: 1 - P(not a nucleus)",
        "not_a_nucleus": {"count": len(rows), "dropped": args.drop_rejected,
                          "why": "the classifier finds \"not a nucleus\" more probable than every class",
                          "given_rows": rows},
        "model": {"name": args.model, **{k: described[k] for k in ("tag", "file", "sha256", "kind", "denuc_version")},
                  "taxonomy": model.classifier.taxonomy, "mpp": model.mpp,
                  "classes": [{"name": c.name, "color": list(c.color)} for c in model.classes]},
        "settings": {"batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                     "runtime": "torch" if model.classifier.encoder_runtime is None else "onnx",
                     "drop_rejected": args.drop_rejected},
        "command": args.command_line,
        "versions": software_versions(),
        "runtime_s": time.perf_counter() - started,
        "outputs": {suffix: path.name for suffix, path in paths.items()},
    })
    return len(kept)
