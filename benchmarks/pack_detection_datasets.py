"""Copy annotated datasets, in their own layouts, small enough for a machine the datasets are not on (the session's GPU
machine takes 64 MiB): `denuc train-detector --dataset NAME=COPY` reads the copy as it reads the original.

    python benchmarks/pack_detection_datasets.py --dataset brcam2c=../shared/datasets/brcam2c \
        --dataset crchisto=... --dataset monuseg=... --dataset consep=/work/consep_full --out .gpu/datasets

Test splits are left out (a run trains and validates; score it on the original files): a file is left out when its
name, without suffix, is that of a test image. Every other file is copied as it is, except: images (.png, .bmp,
.tif, .jpg) are re-encoded as JPEG (quality 95) under their own names - denuc reads images by their content, not
their suffix - and MATLAB label files are re-saved compressed (the same arrays) and XML outlines (MoNuSeg's) cut to
what the reader reads (``minimal_outlines``: the same polygons). Lossy: a model trained on a copy has seen
JPEG-compressed pixels; choose and score it on the original files. A list of what was re-encoded (source, bytes
before and after) is written beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from denuc.datasets import get_dataset

IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg"}


def minimal_outlines(path: Path) -> str:
    """An Aperio XML (MoNuSeg's) with only what the reader reads: the pixel size, each Region's Id and its
    vertices, less those that lie on the straight line from one neighbour on to the other (the same polygon, so the
    same area centroid; MoNuSeg's outlines step 0.2 px at a time, mostly along rows and columns)."""
    root = ET.parse(path).getroot()
    regions = []
    for region in root.iter("Region"):
        text = [(v.get("X"), v.get("Y")) for v in region.iter("Vertex")]
        xy = np.array(text, dtype=float)
        keep = np.ones(len(xy), bool)
        x, y = xy.T
        area = abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2
        if len(xy) > 3 and area >= 10:  # the reader places tiny outlines at the mean of their vertices: kept whole
            before, after = np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0)
            d0, d1 = xy - before, after - xy
            cross, dot = d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0], (d0 * d1).sum(1)
            keep = (np.abs(cross) > 1e-9) | (dot <= 0)  # a vertex where the outline turns back stays
        vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for (x, y), kept in zip(text, keep) if kept)
        regions.append(f'<Region Id="{region.get("Id")}"><Vertices>{vertices}</Vertices></Region>')
    mpp = root.get("MicronsPerPixel")  # some files have none: the reader's fallback then applies to the copy too
    return (f'<Annotations{"" if mpp is None else f" MicronsPerPixel={mpp!r}"}><Annotation><Regions>\n'
            + "\n".join(regions) + "\n</Regions></Annotation></Annotations>\n")


def pack_file(source: Path, target: Path, quality: int) -> str:
    """Copy one file to ``target``; returns what was done to it."""
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        with Image.open(source) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        target.write_bytes(buffer.getvalue())
        return "jpeg"
    if suffix == ".mat":
        contents = {k: v for k, v in scipy.io.loadmat(source).items() if not k.startswith("__")}
        scipy.io.savemat(target, contents, do_compression=True)
        return "mat compressed"
    if suffix == ".xml":
        target.write_text(minimal_outlines(source), encoding="utf-8")
        return "xml outlines only"
    shutil.copyfile(source, target)
    return "copied"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=ROOT")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    report = []
    for spec in args.dataset:
        name, root = spec.split("=", 1)
        test = {Path(sample.image_path).stem for sample in get_dataset(name, root).samples("test")}
        for source in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.stem not in test):
            target = args.out / name / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            done = pack_file(source, target, args.quality)
            report.append({"dataset": name, "source": str(source), "done": done,
                           "bytes": source.stat().st_size, "packed_bytes": target.stat().st_size})
    (args.out / "packed.json").write_text(json.dumps(report, indent=1))
    before, after = sum(r["bytes"] for r in report), sum(r["packed_bytes"] for r in report)
    print(f"{len(report)} files: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
