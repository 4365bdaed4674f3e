"""`denuc evaluate`: score predicted nucleus points against ground truth (per-class and detection F1).

Predictions and ground truth are point files (CSV or GeoJSON, see docs/formats.md; predictions also other tools'
nuclei: QuPath/StarDist GeoJSON, CellViT cells.json, HoVer-Net JSON, see denuc.io.foreign), one per image, paired by
file stem; or the ground truth is a dataset split (--gt-dataset NAME --dataset-root ROOT, each prediction file
named after its image). Beside detection recall, the recall on crowded nuclei (ground-truth nuclei with >= 3 others
within 8 um). When the dataset has outlines (consep, monuseg) and the predictions carry outlines, also HoVer-Net's
instance segmentation scores of the outlines (Dice, AJI, AJI+, DQ, SQ, PQ). The protocols are described in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from denuc.cli.options import NON_NEGATIVE, POSITIVE, output_file
from denuc.config import PROTOCOLS
from denuc.errors import InputError

POINT_SUFFIXES = (".csv", ".geojson", ".json")
NOT_POINT_FILES = ("_summary.json",)
"""Files ``denuc predict`` writes beside its point files: a predict output folder is read as it is."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help=__doc__.split(": ", 1)[1].splitlines()[0],
                              description=__doc__.split(": ", 1)[1])
    p.add_argument("--pred", type=Path, required=True,
                   help="predictions: a point file, or a folder of point files named by image stem; besides denuc's, "
                        "other tools' nuclei: QuPath/StarDist GeoJSON, CellViT cells.json, HoVer-Net JSON")
    p.add_argument("--type-info", type=Path, help="HoVer-Net's type_info.json, naming the types of HoVer-Net --pred "
                                                  "files (else they are 'type N')")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt", type=Path, help="ground truth: a point file, or a folder of point files")
    gt.add_argument("--gt-dataset", metavar="NAME",
                    help="ground truth from a dataset: brcam2c, crchisto, consep, monuseg, puma, ocelot, pannuke, "
                         "lizard, or points for your own (docs/formats.md)")
    p.add_argument("--dataset-root", type=Path, help="folder of the dataset given by --gt-dataset")
    p.add_argument("--split", default="test", help="dataset split to score (default: test)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="denuc", help="scoring protocol (default: denuc)")
    p.add_argument("--radius-um", type=POSITIVE, default=3.0, help="matching radius in micrometres (default: 3)")
    p.add_argument("--mpp", type=POSITIVE, help="pixel size in um/px, for ground truth that does not give one")
    p.add_argument("--bootstrap", type=NON_NEGATIVE, default=0, metavar="N",
                   help="bootstrap resamples of the images for 95%% confidence intervals (default: 0, none)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the bootstrap resampling (default: 0)")
    p.add_argument("--missing-as-empty", action="store_true",
                   help="score an image without a prediction file as having no predictions (default: error)")
    p.add_argument("--out", type=Path, help="also write the report as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists (else refused)")


def run(args: argparse.Namespace) -> int:
    from denuc.io.atomic import write_json
    from denuc.metrics.evaluate import evaluate

    if args.out is not None:
        output_file(args.out, args.overwrite)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ground_truth = _dataset_ground_truth(args) if args.gt_dataset else _file_ground_truth(args)
        predictions = _prediction_files(args.pred, ground_truth)
        pairs = _pairs(args, ground_truth, predictions)
    for warning in caught:
        print(f"denuc evaluate: warning: {warning.message}", file=sys.stderr)
    unused = sorted(set(predictions) - set(ground_truth))
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        print(f"note: {len(unused)} prediction file(s) without ground truth were not scored: {shown}",
              file=sys.stderr)
    report = evaluate(pairs, radius_um=args.radius_um, protocol=args.protocol, bootstrap=args.bootstrap,
                      seed=args.seed, instance_maps=_instance_maps(args, pairs))
    print(report.format_table())
    if args.out is not None:
        write_json(args.out, report.to_dict())
        print(f"report written to {args.out}")
    return 0


def _pairs(args: argparse.Namespace, ground_truth: dict, predictions: dict[str, Path]) -> list:
    """(name, prediction, ground truth) for every image of the ground truth."""
    pairs = []
    for name, gt in ground_truth.items():
        if gt.mpp is None:
            if args.mpp is None:
                raise InputError(name, "pixel size unknown: pass --mpp (um/px), e.g. --mpp 0.5 for a 20x scan")
            gt = replace(gt, mpp=args.mpp)
        pairs.append((name, _read_prediction(name, predictions, gt, args.missing_as_empty, args.type_info), gt))
    return pairs


def _instance_maps(args: argparse.Namespace, pairs: list) -> dict | None:
    """The dataset's ground-truth instance maps by image name, when it has them and every prediction file with
    nuclei carries outlines; else None (no instance segmentation scores), with a note when that leaves outlines
    unscored. Read only then: filling in a dataset's outlines takes a while."""
    if args.gt_dataset is None:
        return None
    has_outlines = [pred.outlines is not None for _, pred, _ in pairs if len(pred)]
    if not any(has_outlines):
        return None
    if not all(has_outlines):
        print(f"note: {has_outlines.count(False)} of {len(has_outlines)} prediction files carry no outlines, so the "
              "outlines are not scored", file=sys.stderr)
        return None
    from denuc.datasets import get_dataset

    dataset = get_dataset(args.gt_dataset, args.dataset_root)
    maps = {}
    for name, _, _ in pairs:
        maps[name] = dataset.instance_map(name)
        if maps[name] is None:
            print(f"note: the {args.gt_dataset} dataset has no outlines, so the predicted outlines are not scored",
                  file=sys.stderr)
            return None
    return maps


def _file_ground_truth(args: argparse.Namespace) -> dict:
    from denuc.io import read_points

    if args.dataset_root is not None:
        raise InputError("--dataset-root", "only used with --gt-dataset")
    return {name: read_points(path, mpp=args.mpp) for name, path in _point_files(args.gt).items()}


def _dataset_ground_truth(args: argparse.Namespace) -> dict:
    from denuc.datasets import get_dataset

    if args.dataset_root is None:
        raise InputError("--gt-dataset", "pass --dataset-root, the folder holding the dataset")
    ground_truth = {}
    for sample in get_dataset(args.gt_dataset, args.dataset_root).samples(args.split):
        gt = sample.nuclei
        if args.mpp is not None and gt.mpp is not None and abs(gt.mpp - args.mpp) > 1e-9 * gt.mpp:
            raise InputError(sample.name, f"the dataset gives {gt.mpp} um/px; --mpp {args.mpp} disagrees "
                                          "(the ground-truth points are in the dataset's pixels)")
        ground_truth[sample.name] = gt
    if not ground_truth:
        raise InputError(args.dataset_root, f"the {args.gt_dataset} split {args.split!r} has no images")
    return ground_truth


def _prediction_files(pred: Path, ground_truth: dict) -> dict[str, Path]:
    """Prediction files by image name; a single file for a single image is paired whatever its name."""
    if pred.is_file() and len(ground_truth) == 1:
        return {next(iter(ground_truth)): pred}
    return _point_files(pred)


def _read_prediction(name: str, predictions: dict[str, Path], gt, missing_as_empty: bool, type_info: Path | None):
    from denuc.io.foreign import read_nuclei
    from denuc.nuclei import Nuclei

    if name in predictions:
        # points outside the ground truth's image (negative, or x and y swapped) are refused, not scored
        return read_nuclei(predictions[name], image_size=gt.image_size, type_info=type_info)
    if missing_as_empty:
        return Nuclei(xy=[], classes=gt.classes)
    raise InputError(name, "no prediction file for this image (pass --missing-as-empty to score it as having "
                           "no predictions)")


def _point_files(path: Path) -> dict[str, Path]:
    """Point files by stem: the file itself, or those in the folder (not recursive)."""
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        raise InputError(path, "no such file or folder")
    files: dict[str, Path] = {}
    # in POINT_SUFFIXES order, so that of a CSV and a GeoJSON with one stem (as denuc detect and predict write
    # them: the same points) the CSV is read
    found = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in POINT_SUFFIXES
             and not f.name.endswith(NOT_POINT_FILES)]
    both = 0
    for file in sorted(found, key=lambda f: (POINT_SUFFIXES.index(f.suffix.lower()), f.name)):
        if file.stem in files and files[file.stem].suffix.lower() == file.suffix.lower():
            raise InputError(path, f"two point files for image {file.stem!r}: {files[file.stem].name} and "
                                   f"{file.name}; keep one")
        both += file.stem in files
        files.setdefault(file.stem, file)
    if not files:
        raise InputError(path, f"no point files ({', '.join(POINT_SUFFIXES)}) in this folder")
    if both:
        print(f"note: {path}: {both} image(s) have both a CSV and a GeoJSON file (denuc writes the same points to "
              "both); the CSV was read", file=sys.stderr)
    return files
