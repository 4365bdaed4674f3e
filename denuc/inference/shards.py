"""A slide's finished chunks of tiles on disk, and the duplicates across tile seams found while streaming them.

Each chunk's nuclei are one Parquet shard ``chunk_<k>.parquet`` (columns x, y in level-0 pixels, score, label,
row and col of the tile, seam, then p0, p1, ... per class), with the embeddings as ``chunk_<k>.npy`` beside it.
Both are written under a temporary name and renamed, the Parquet file last: its presence marks the chunk done.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from denuc.inference.slide_grid import Tile
from denuc.io.atomic import atomic_path
from denuc.nuclei import Nuclei, NucleusClass, concat


def shard_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk_{chunk:06d}.parquet"


def write_shard(path: Path, parts: list[tuple[Tile, Nuclei, np.ndarray, dict[str, np.ndarray] | None]],
                classes: list[NucleusClass], embeddings: bool) -> None:
    """One chunk's nuclei: (tile, owned nuclei, seam flags, their measurements or None) per tile of the chunk
    (at least one). Outlines (all of one vertex count: the outline head's rays) are a list column ``outline`` of
    x0, y0, x1, y1, ...; measurements are columns ``m:<name>``."""
    found = concat([n for _, n, _, _ in parts])
    columns = {
        "x": found.xy[:, 0], "y": found.xy[:, 1], "score": found.scores,
        "label": pa.array(found.labels.tolist(), pa.string()),
        "row": np.concatenate([np.full(len(n), tile[0], np.int32) for tile, n, _, _ in parts]),
        "col": np.concatenate([np.full(len(n), tile[1], np.int32) for tile, n, _, _ in parts]),
        "seam": np.concatenate([seam for _, _, seam, _ in parts]),
    }
    for j, _ in enumerate(classes):
        columns[f"p{j}"] = found.probs[:, j]
    if found.outlines is not None:
        columns["outline"] = pa.array([o.astype(np.float32).ravel() for o in found.outlines],
                                      pa.list_(pa.float32()))
        for name in parts[0][3]:
            columns[f"m:{name}"] = np.concatenate([values[name] for _, _, _, values in parts])
    if embeddings:
        with atomic_path(path.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, found.embeddings.astype(np.float16))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    # ParquetFile, not pq.read_table: read_table goes through pyarrow.dataset, whose first import costs a fresh
    # process 0.05-0.08 s (measured), more than reading a region's shards
    with pq.ParquetFile(path) as shard:
        return shard.read(columns=columns)


def shard_nuclei(table: pa.Table, classes: list[NucleusClass]) -> Nuclei:
    """A shard's rows as Nuclei (level-0 pixels), with their outlines when the shard has them."""
    outlines = None
    if "outline" in table.column_names:
        outlines = [np.asarray(o, dtype=np.float64).reshape(-1, 2) for o in table["outline"].to_numpy(
            zero_copy_only=False)]
    return Nuclei(
        xy=np.stack([table["x"].to_numpy(), table["y"].to_numpy()], axis=1),
        labels=np.asarray(table["label"].to_pylist(), dtype=object),
        scores=table["score"].to_numpy(),
        probs=np.stack([table[f"p{j}"].to_numpy() for j in range(len(classes))], axis=1) if classes else None,
        classes=classes,
        outlines=outlines,
    )


def shard_measurements(table: pa.Table) -> dict[str, np.ndarray]:
    """A shard's per-nucleus measurements (``write_shard``'s ``m:<name>`` columns), by name."""
    return {name[2:]: table[name].to_numpy() for name in table.column_names if name.startswith("m:")}


def embedding_dim(shards: list[Path]) -> int:
    """Length of the embedding vectors saved beside the shards (0 when no shard holds a nucleus)."""
    for path in shards:
        array = np.load(path.with_suffix(".npy"), mmap_mode="r")
        if array.shape[0]:
            return int(array.shape[1])
    return 0


def seam_duplicates(shards: list[Path], radius: float) -> tuple[np.ndarray, int]:
    """Global row indices (over all shards, in order) of the nuclei to drop as seam duplicates, and the total
    row count.

    A seam duplicate is a nucleus within ``radius`` (level-0 px) of one owned by another tile with a higher
    score (equal scores: the later one goes). Shards are in row-major tile order and only neighbouring tile
    rows can hold such pairs, so two tile rows of seam points are in memory at a time.
    """
    dropped, total = [], 0
    previous = current = None
    current_row = None
    for path in shards:
        table = read_shard(path, columns=["x", "y", "score", "row", "col", "seam"])
        seam = np.flatnonzero(table["seam"].to_numpy(zero_copy_only=False))
        rows = table["row"].to_numpy()[seam]
        points = {"xy": np.stack([table["x"].to_numpy()[seam], table["y"].to_numpy()[seam]], axis=1),
                  "score": table["score"].to_numpy()[seam],
                  "tile": rows.astype(np.int64) * 1_000_000 + table["col"].to_numpy()[seam],
                  "index": seam + total}
        for row in np.unique(rows):
            part = {k: v[rows == row] for k, v in points.items()}
            if row != current_row:
                if current is not None:
                    dropped.append(_losers(previous, current, radius))
                previous = current if current_row is not None and row == current_row + 1 else None
                current, current_row = part, row
            else:
                current = {k: np.concatenate([current[k], part[k]]) for k in current}
        total += table.num_rows
    if current is not None:
        dropped.append(_losers(previous, current, radius))
    return (np.unique(np.concatenate(dropped)) if dropped else np.zeros(0, np.int64)), total


def _losers(previous: dict | None, current: dict, radius: float) -> np.ndarray:
    """Indices of the weaker nucleus of each close pair from different tiles, at least one in ``current``."""
    first = 0 if previous is None else len(previous["score"])
    points = current if previous is None else {k: np.concatenate([previous[k], current[k]]) for k in current}
    if len(points["score"]) < 2:
        return np.zeros(0, np.int64)
    pairs = cKDTree(points["xy"]).query_pairs(radius, output_type="ndarray")
    pairs = pairs[(points["tile"][pairs[:, 0]] != points["tile"][pairs[:, 1]]) & (pairs.max(axis=1) >= first)]
    a, b = pairs[:, 0], pairs[:, 1]
    score, index = points["score"], points["index"]
    a_loses = (score[a] < score[b]) | ((score[a] == score[b]) & (index[a] > index[b]))
    return np.where(a_loses, index[a], index[b])
