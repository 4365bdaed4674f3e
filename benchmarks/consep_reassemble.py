"""Rebuild CoNSeP's 1000x1000 train images from this project's copy of 256x256 crops (the release's own form).

The copy (`../shared/datasets/consep`, DATASET.md) cut each train image into 16 crops. Their placement, read off
the images (the 24-px overlaps match to JPEG noise, every other pair does not; checked for every image here):
crops 000-008 are the 3 x 3 grid at 0, 256, 512 px (row by row), 009-011 the bottom row at y = 744 (x = 0, 256,
512), 012-014 the right column at x = 744 (y = 0, 256, 512), 015 the corner (744, 744). So the crops tile the
whole image, abutting except for the 24 px where the last row and column overlap the ones before.

Nuclei cut by a seam are joined: two instances of neighbouring crops are one nucleus when their pixels along the
seam (or in the overlap) coincide: they share at least half of the smaller one's pixels there (a cut nucleus
shows the same chord on both sides, two touching nuclei do not). Each rebuilt nucleus gets the centroid of all its
pixels and the class of its largest part. Written in the release's layout (`Train/Images/train_N.png`,
`Train/Labels/train_N.mat` with `inst_map`, `type_map`, `inst_type`, `inst_centroid`), which `denuc`'s `consep`
reader and its split by source image read as they read the release.

    python benchmarks/consep_reassemble.py --out /data/consep_reassembled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "consep"
CROP, SIDE = 256, 1000
ORIGINS = ([(256 * (c % 3), 256 * (c // 3)) for c in range(9)] + [(256 * c, 744) for c in range(3)]
           + [(744, 256 * c) for c in range(3)] + [(744, 744)])  # (x, y) of crops 000-015
MAX_SEAM_DIFFERENCE = 5.0  # mean absolute RGB difference across a 24-px overlap: JPEG noise only


def read_crop(root: Path, name: str) -> tuple[np.ndarray, dict]:
    image = np.asarray(Image.open(root / "Train" / "Images" / f"{name}.jpg").convert("RGB"))
    return image, scipy.io.loadmat(root / "Train" / "Labels" / f"{name}.mat")


def check_placement(images: list[np.ndarray], source: str) -> None:
    """Refuse a source image whose overlapping crops do not show the same pixels where ORIGINS overlap them."""
    for a, b in ((2, 12), (5, 13), (8, 14), (11, 15), (6, 9), (7, 10), (8, 11), (14, 15)):
        (ax, ay), (bx, by) = ORIGINS[a], ORIGINS[b]
        x0, y0 = max(ax, bx), max(ay, by)
        x1, y1 = min(ax, bx) + CROP, min(ay, by) + CROP
        pa = images[a][y0 - ay:y1 - ay, x0 - ax:x1 - ax].astype(float)
        pb = images[b][y0 - by:y1 - by, x0 - bx:x1 - bx].astype(float)
        difference = np.abs(pa - pb).mean()
        if difference > MAX_SEAM_DIFFERENCE:
            raise SystemExit(f"{source}: crops {a:03d} and {b:03d} differ by {difference:.1f} where they overlap")


def reassemble(root: Path, source: str) -> tuple[np.ndarray, dict]:
    images, labels = zip(*(read_crop(root, f"{source}_{c:03d}") for c in range(16)))
    check_placement(list(images), source)
    image = np.zeros((SIDE, SIDE, 3), np.uint8)
    # every (crop, instance) is a node; ids on the canvas are offset per crop
    offsets = np.cumsum([0] + [int(lab["inst_map"].max()) for lab in labels])
    canvas = np.zeros((16, SIDE, SIDE), np.int64)  # each crop's nodes where it covers the image (0: none)
    for c, ((x, y), im, lab) in enumerate(zip(ORIGINS, images, labels)):
        image[y:y + CROP, x:x + CROP] = im
        inst = lab["inst_map"].astype(np.int64)
        canvas[c, y:y + CROP, x:x + CROP] = np.where(inst > 0, inst + offsets[c], 0)
    links = []
    for a in range(16):
        for b in range(a + 1, 16):
            (ax, ay), (bx, by) = ORIGINS[a], ORIGINS[b]
            x0, y0, x1, y1 = max(ax, bx), max(ay, by), min(ax, bx) + CROP, min(ay, by) + CROP
            if x1 > x0 and y1 > y0:  # an overlap: the same pixels in both crops
                pa, pb = canvas[a, y0:y1, x0:x1].ravel(), canvas[b, y0:y1, x0:x1].ravel()
            elif x1 == x0 and y1 > y0:  # side by side: the columns either side of the seam
                left, right = (a, b) if ax < bx else (b, a)
                pa, pb = canvas[left, y0:y1, x0 - 1], canvas[right, y0:y1, x0]
            elif y1 == y0 and x1 > x0:  # one above the other: the rows either side of the seam
                top, bottom = (a, b) if ay < by else (b, a)
                pa, pb = canvas[top, y0 - 1, x0:x1], canvas[bottom, y0, x0:x1]
            else:
                continue
            links += same_nuclei(pa, pb)
    n = int(offsets[-1]) + 1
    rows, cols = (np.array([link[k] for link in links], dtype=np.int64) for k in (0, 1))
    _, component = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    # the rebuilt instance map: the crop placed last wins a pixel of an overlap (both show the same nucleus there)
    node = np.zeros((SIDE, SIDE), np.int64)
    for c in range(16):
        node = np.where(canvas[c] > 0, canvas[c], node)
    ids, inst_map = np.unique(np.where(node > 0, component[node] + 1, 0), return_inverse=True)
    inst_map = inst_map.reshape(SIDE, SIDE).astype(np.int32)  # 0 stays 0 (background is the smallest id)
    count = len(ids) - 1
    # each nucleus's class: that of its largest part in any crop
    node_type = np.zeros(n, np.int64)
    node_area = np.zeros(n)
    for c, lab in enumerate(labels):
        types = np.asarray(lab["inst_type"]).reshape(-1)
        node_type[offsets[c] + 1:offsets[c] + 1 + len(types)] = types
        area = np.bincount(lab["inst_map"].ravel().astype(np.int64), minlength=len(types) + 1)[1:len(types) + 1]
        node_area[offsets[c] + 1:offsets[c] + 1 + len(types)] = area
    instance_of_node = np.searchsorted(ids, component + 1)
    inst_type = np.zeros(count, np.int32)
    best = np.full(count, -1.0)
    for v in range(1, n):
        k = instance_of_node[v] - 1
        if 0 <= k < count and ids[k + 1] == component[v] + 1 and node_area[v] > best[k]:
            best[k], inst_type[k] = node_area[v], node_type[v]
    rows_, cols_ = np.indices(inst_map.shape)
    pixels = np.bincount(inst_map.ravel(), minlength=count + 1)[1:]
    cx = np.bincount(inst_map.ravel(), weights=cols_.ravel(), minlength=count + 1)[1:] / pixels
    cy = np.bincount(inst_map.ravel(), weights=rows_.ravel(), minlength=count + 1)[1:] / pixels
    type_map = np.concatenate([[0], inst_type])[inst_map].astype(np.int32)
    return image, {"inst_map": inst_map, "type_map": type_map, "inst_type": inst_type.reshape(-1, 1),
                   "inst_centroid": np.stack([cx, cy], 1)}


def same_nuclei(pa: np.ndarray, pb: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of nodes (a's, b's) that are one nucleus: at the same places (overlap or seam) they share at least half
    of the smaller one's pixels (a sliver cut off by a seam meets its nucleus's chord; two touching nuclei share
    a point or two)."""
    both = (pa > 0) & (pb > 0)
    pairs, shared = np.unique(np.stack([pa[both], pb[both]], 1), axis=0, return_counts=True)
    a_count = dict(zip(*np.unique(pa[pa > 0], return_counts=True)))
    b_count = dict(zip(*np.unique(pb[pb > 0], return_counts=True)))
    return [(int(u), int(v)) for (u, v), s in zip(pairs, shared) if s >= 0.5 * min(a_count[u], b_count[v])]


def write(out: Path, source: str, image: np.ndarray, label: dict) -> None:
    """One rebuilt image and its labels in the release's layout under ``out``."""
    (out / "Train" / "Images").mkdir(parents=True, exist_ok=True)
    (out / "Train" / "Labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out / "Train" / "Images" / f"{source}.png")
    scipy.io.savemat(out / "Train" / "Labels" / f"{source}.mat", label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=SHARED, help="the copy of crops (default: ours)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sources = sorted({p.stem.rsplit("_", 1)[0] for p in (args.root / "Train" / "Labels").glob("train_*_*.mat")},
                     key=lambda s: int(s.split("_")[1]))
    counts, small = {}, {}
    for source in sources:
        image, label = reassemble(args.root, source)
        write(args.out, source, image, label)
        counts[source] = int(label["inst_type"].shape[0])
        small[source] = int((np.bincount(label["inst_map"].ravel())[1:] < 10).sum())  # slivers left unjoined
        print(source, counts[source], "nuclei")
    summary = {"from": str(args.root), "nuclei": sum(counts.values()), "instances_under_10_px": sum(small.values()),
               "nuclei_per_image": counts}
    (args.out / "reassembled.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
