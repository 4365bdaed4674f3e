"""Whole-slide prediction: tissue tiles on the model's working grid, read ahead, batched, streamed to disk.

``predict_slide(slide, model, out_dir)`` writes, for a slide whose file stem is S:

- ``S.csv``, ``S.parquet``, ``S.geojson``: one row / Point feature per nucleus (see ``denuc.io.tables``);
- ``S_embeddings.npy`` (with ``embeddings=True``): float16 (n, d), row i is nucleus id i;
- ``S_tissue.png``: the tissue mask on the thumbnail; ``S_overview.png``: the thumbnail with class-coloured
  dots (a density map when dots would cover it);
- ``S_summary.json``, written last: counts, densities, tissue area, runtime, model, versions, pixel size.

How (docs/slides.md has more): the slide is seen through the model's working grid (``model.mpp`` um/px),
cut into the detector's overlapping tiles; each tile owns the half of every overlap nearest to it, so a
nucleus is kept by exactly one tile. Only tiles whose owned area touches tissue are read, from the pyramid
level closest to the working resolution but not coarser, and resampled. Tiles are grouped into chunks of
``chunk_tiles``; each finished chunk is saved as a shard under ``.S.partial/`` (temporary name, then rename),
so a killed run restarted with ``resume=True`` redoes at most one chunk. When all chunks are done, the shards
are streamed twice: once to drop duplicates across tile seams (two tiles that placed the same nucleus on
either side of their shared border), once to write the outputs, which are renamed into place together.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import platform
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree

import denuc
from denuc.inference.tiling import ALIGN, ownership_bounds, tile_origins
from denuc.inference.pipeline import Pipeline
from denuc.inference.tissue import METHOD as TISSUE_METHOD
from denuc.inference.tissue import TissueMask, detect_tissue
from denuc.errors import InputError
from denuc.io.atomic import atomic_path
from denuc.io.images import scale_to
from denuc.io.slides import Slide
from denuc.io.tables import EmbeddingWriter, NucleusTableWriter
from denuc.io.overlay import PNG_COMPRESS_LEVEL, UNLABELLED_COLOR
from denuc.nuclei import Nuclei, concat

THUMBNAIL_MIN_MPP = 2.0  # um per thumbnail pixel: about a nucleus radius, so overview dots can sit on nuclei
THUMBNAIL_MAX_SIDE = 4096
OVERVIEW_MIN_SIDE = 1024  # small inputs (plain images) get an overview this large, up to their own pixels
DOT_RADIUS_UM = 2.4  # overview dots: about a small nucleus
DOTS_PER_PIXEL_MAX = 1 / 16  # above this many nuclei per overview pixel, dots hide the tissue: draw density
DENSITY_SIGMA_UM = 50.0
OUTPUT_SUFFIXES = (".csv", ".parquet", ".geojson", "_embeddings.npy", "_tissue.png", "_overview.png",
                   "_summary.json")

Tile = tuple[int, int]
"""(row, column) of a tile in the grid."""


@dataclass
class Grid:
    """The model's working grid over a slide, and where its tiles come from.

    Working pixels are ``scale`` times level-0 pixels; the read level's pixels are ``ratio`` per working pixel
    (>= 1: the level is never coarser than the model needs; exactly 1 when the level's pixel size is within
    RESAMPLE_TOLERANCE of the model's, and then scale = slide mpp / model mpp only approximately).
    """

    scale: float
    level: int
    ratio: float
    extent: tuple[float, float]  # working-pixel width and height of the slide (not rounded)
    tile_size: tuple[int, int]  # (width, height)
    xs: list[int]
    ys: list[int]
    xbounds: list[tuple[float, float]]
    ybounds: list[tuple[float, float]]

    @classmethod
    def for_slide(cls, slide: Slide, model: Pipeline) -> "Grid":
        cfg = model.detector.config
        level = slide.best_level(model.mpp)
        downsample = slide.level_downsamples[level]
        ratio = scale_to(model.mpp, slide.mpp * downsample)  # 1: the level's pixels are read as they are
        scale = 1.0 / (ratio * downsample)
        width, height = slide.dimensions[0] * scale, slide.dimensions[1] * scale
        # Like iter_tiles: pad to a multiple of the backbone stride, tiles no larger than the padded image.
        padded_w, padded_h = (math.ceil(math.ceil(v) / ALIGN) * ALIGN for v in (width, height))
        tile_w, tile_h = min(cfg.tile_size, padded_w), min(cfg.tile_size, padded_h)
        xs = tile_origins(padded_w, tile_w, cfg.tile_overlap)
        ys = tile_origins(padded_h, tile_h, cfg.tile_overlap)
        return cls(scale, level, ratio, (width, height), (tile_w, tile_h), xs, ys,
                   ownership_bounds(xs, tile_w, padded_w), ownership_bounds(ys, tile_h, padded_h))

    def owned_box(self, tile: Tile) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1): the working-pixel edges of the part of the slide a tile owns."""
        (ylo, yhi), (xlo, xhi) = self.ybounds[tile[0]], self.xbounds[tile[1]]
        return (max(xlo + 0.5, 0.0), max(ylo + 0.5, 0.0), min(xhi + 0.5, self.extent[0]),
                min(yhi + 0.5, self.extent[1]))

    def read(self, slide: Slide, tile: Tile) -> np.ndarray:
        """The tile's pixels (RGB uint8, tile_size) at the working resolution."""
        x0, y0 = self.xs[tile[1]], self.ys[tile[0]]
        width, height = self.tile_size
        if self.ratio == 1.0:
            return slide.read_region(x0, y0, self.level, width, height)
        # Read the level pixels under the tile plus a margin for the bicubic filter's support, then resample
        # exactly the tile's footprint (PIL's box is in source pixels, fractional).
        r = self.ratio
        margin = math.ceil(2 * r) + 1
        ax, ay = math.floor(x0 * r) - margin, math.floor(y0 * r) - margin
        bx, by = math.ceil((x0 + width) * r) + margin, math.ceil((y0 + height) * r) + margin
        region = slide.read_region(ax, ay, self.level, bx - ax, by - ay)
        box = (x0 * r - ax, y0 * r - ay, (x0 + width) * r - ax, (y0 + height) * r - ay)
        return np.asarray(Image.fromarray(region).resize((width, height), Image.Resampling.BICUBIC, box=box,
                                                         reducing_gap=None))


def tissue_tiles(grid: Grid, mask: TissueMask, level0_size: tuple[int, int]) -> list[Tile]:
    """Tiles, row by row, whose owned area touches the mask (grown by one mask pixel, not to miss edges)."""
    mh, mw = mask.mask.shape
    fx, fy = mw / (level0_size[0] * grid.scale), mh / (level0_size[1] * grid.scale)  # mask px per working px
    tiles = []
    for row in range(len(grid.ys)):
        for col in range(len(grid.xs)):
            x0, y0, x1, y1 = grid.owned_box((row, col))
            if x1 <= x0 or y1 <= y0:
                continue
            a, b = max(int(x0 * fx) - 1, 0), min(math.ceil(x1 * fx) + 1, mw)
            c, d = max(int(y0 * fy) - 1, 0), min(math.ceil(y1 * fy) + 1, mh)
            if mask.mask[c:d, a:b].any():
                tiles.append((row, col))
    return tiles


def model_fingerprint(model: Pipeline) -> str:
    """SHA-256 of the model's weights, configuration and classes: resumed work must come from the same model."""
    digest = hashlib.sha256(model.detector.config.to_json().encode())
    digest.update(str(getattr(model.classifier, "test_time_views", None)).encode())  # an inference setting
    digest.update(json.dumps([[c.name, list(c.color)] for c in model.classes]).encode())
    modules = [model.detector.model]
    if model.classifier is not None:
        parts = [model.classifier] if isinstance(model.classifier, torch.nn.Module) else vars(model.classifier).values()
        modules += [m for m in parts if isinstance(m, torch.nn.Module)]
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    return {suffix: out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES}


def predict_slide(
    slide: Slide,
    model: Pipeline,
    out_dir: str | Path,
    *,
    tissue_mask: bool = True,
    resume: bool = False,
    batch_size: int = 8,
    workers: int = 2,
    embeddings: bool = False,
    progress: bool = True,
    model_name: str = "",
    model_id: str | None = None,
    chunk_tiles: int = 64,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Detect (and classify) the nuclei of a slide and write the outputs listed in the module docstring.

    Returns the summary (also written as ``<stem>_summary.json``). Outputs that already exist complete, from
    the same slide, model and settings, are kept and their summary returned with ``"skipped": True``. With
    ``resume``, the shards of an interrupted run with the same settings are reused. ``on_chunk(done)`` is
    called after each chunk is saved, with the number of chunks done. ``model_id`` (see
    ``model_fingerprint``) saves hashing the weights again for every slide of a batch.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    stem = slide.path.stem
    paths = output_paths(out_dir, stem)
    partial = out_dir / f".{stem}.partial"
    if embeddings and model.classifier is None:
        raise InputError(slide.path, "embeddings are the classifier's features: a detector-only model has none")
    grid = Grid.for_slide(slide, model)
    settings = {
        "slide": {"name": slide.path.name, "bytes": slide.path.stat().st_size,
                  "quickhash": slide.properties.get("openslide.quickhash-1")},
        "mpp": slide.mpp, "model": model_id or model_fingerprint(model), "device": str(model.detector.device.type),
        "runtime": model.detector.runtime, "tissue_mask": tissue_mask, "embeddings": embeddings,
        "batch_size": batch_size, "chunk_tiles": chunk_tiles, "denuc": denuc.__version__,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    done = _completed_summary(paths, fingerprint, embeddings)
    if done is not None:
        shutil.rmtree(partial, ignore_errors=True)
        return {**done, "skipped": True}
    _remove_stale_temporaries(out_dir, paths)

    mask_side, picture_side = _thumbnail_sides(slide)
    # The level the tiles come from, when the thumbnail decodes it whole anyway (the only level of a
    # single-level slide): decode it once and keep it while the tiles are read, if it is small enough.
    in_memory = slide.thumbnail_level(picture_side) == grid.level and slide.fits_in_memory(grid.level)
    timings = {"level_in_memory": -time.perf_counter()}
    with slide.level_in_memory(grid.level, workers) if in_memory else contextlib.nullcontext():
        timings["level_in_memory"] += time.perf_counter()
        timings["tissue_mask"] = -time.perf_counter()
        thumbnail, thumb_mpp, picture = _thumbnails(slide, mask_side, picture_side)
        if tissue_mask:
            mask = detect_tissue(thumbnail, thumb_mpp)
            tiles = tissue_tiles(grid, mask, slide.dimensions)
        else:
            mask = TissueMask(np.ones(thumbnail.shape[:2], dtype=bool), thumb_mpp, threshold=0.0)
            tiles = [(row, col) for row in range(len(grid.ys)) for col in range(len(grid.xs))]
        chunks = [tiles[i:i + chunk_tiles] for i in range(0, len(tiles), chunk_tiles)]
        timings["tissue_mask"] += time.perf_counter()

        manifest = {"settings": settings, "fingerprint": fingerprint, "chunks": len(chunks), "tiles": len(tiles)}
        if resume and (partial / "manifest.json").is_file():
            previous = json.loads((partial / "manifest.json").read_text())
            if previous.get("fingerprint") != fingerprint:
                raise InputError(slide.path, f"cannot resume: the partial run in {partial} used other settings or "
                                             "another model; delete that folder or run without --resume")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            with atomic_path(partial / "manifest.json") as tmp:
                tmp.write_text(json.dumps(manifest, indent=1))

        todo = [k for k in range(len(chunks)) if not _shard(partial, k).is_file()]
        _run_chunks(slide, model, grid, chunks, todo, partial, batch_size=batch_size, workers=workers,
                    embeddings=embeddings, progress=progress, on_chunk=on_chunk, stem=stem, timings=timings)
    timings["assemble_outputs"] = -time.perf_counter()
    summary = _assemble(slide, model, grid, chunks, partial, paths, mask, picture, embeddings=embeddings)
    timings["assemble_outputs"] += time.perf_counter()
    summary.update({
        "slide": {"path": str(slide.path), "backend": slide.backend, "vendor": slide.vendor,
                  "dimensions": list(slide.dimensions), "levels": [list(d) for d in slide.level_dimensions],
                  "level_read": grid.level, "level_read_mpp": slide.mpp * slide.level_downsamples[grid.level],
                  "level_read_in_memory": in_memory},
        "mpp": slide.mpp, "mpp_source": slide.mpp_source,
        "tissue": {"method": TISSUE_METHOD if tissue_mask else "none (--no-tissue-mask): the whole slide",
                   "area_mm2": mask.area_mm2, "threshold": mask.threshold, "mask_mpp": mask.mpp},
        "tiles": {"total": len(grid.xs) * len(grid.ys), "processed": len(tiles), "size": list(grid.tile_size),
                  "overlap": model.detector.config.tile_overlap, "chunks": len(chunks),
                  "chunks_reused": len(chunks) - len(todo)},
        "model": {"name": model_name, "sha256": settings["model"], "mpp": model.mpp,
                  "classifier": model.classifier is not None,
                  "classifier_test_time_views": getattr(model.classifier, "test_time_views", None),
                  "classes": [{"name": c.name, "color": list(c.color)} for c in model.classes],
                  "detector": json.loads(model.detector.config.to_json())},
        "settings": {"batch_size": batch_size, "workers": workers, "device": settings["device"],
                     "runtime": settings["runtime"],
                     "tissue_mask": tissue_mask, "embeddings": embeddings, "resumed": len(todo) < len(chunks)},
        "versions": software_versions(),
        "runtime_s": time.perf_counter() - started,
        # where the time went (this run's tiles only): reading runs in worker threads, overlapped with the model,
        # so "waiting_for_tiles" is what reading cost the main thread
        "timing_s": timings,
        "fingerprint": fingerprint,
        "outputs": {k: p.name for k, p in paths.items() if k != "_embeddings.npy" or embeddings},
    })
    if not tiles:
        summary["warnings"].append("no tissue found on the thumbnail: the outputs are empty; "
                                   "pass --no-tissue-mask to process the whole slide")
    for message in summary["warnings"]:
        warnings.warn(f"{slide.path}: {message}", stacklevel=2)
    with atomic_path(paths["_summary.json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _completed_summary(paths: dict[str, Path], fingerprint: str, embeddings: bool) -> dict | None:
    """The summary of a finished run with the same fingerprint whose outputs are all there, else None."""
    try:
        summary = json.loads(paths["_summary.json"].read_text())
    except (OSError, ValueError):
        return None
    wanted = [p for k, p in paths.items() if k != "_embeddings.npy" or embeddings]
    if summary.get("fingerprint") == fingerprint and all(p.is_file() for p in wanted):
        return summary
    return None


def _remove_stale_temporaries(out_dir: Path, paths: dict[str, Path]) -> None:
    """Temporary files a killed run left behind (atomic_path names them .<name>.<pid>.tmp)."""
    for path in paths.values():
        for stale in out_dir.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _thumbnail_sides(slide: Slide) -> tuple[int, int]:
    """Longest sides in pixels of the tissue mask's thumbnail (at least THUMBNAIL_MIN_MPP um/px, at most
    THUMBNAIL_MAX_SIDE px) and of the overview's picture: the same, or for small inputs up to
    OVERVIEW_MIN_SIDE px (so dots sit on nuclei)."""
    longest_um = max(slide.dimensions) * slide.mpp
    mask_side = max(1, round(longest_um / max(THUMBNAIL_MIN_MPP, longest_um / THUMBNAIL_MAX_SIDE)))
    return mask_side, max(mask_side, min(max(slide.dimensions), OVERVIEW_MIN_SIDE))


def _thumbnails(slide: Slide, mask_side: int, picture_side: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The tissue mask's thumbnail and its pixel size, and the overview's picture (see ``_thumbnail_sides``),
    read once and shrunk for the mask."""
    picture = slide.thumbnail(picture_side)
    if max(picture.shape[:2]) > mask_side:
        scale = mask_side / max(slide.dimensions)
        shape = (max(1, round(slide.dimensions[0] * scale)), max(1, round(slide.dimensions[1] * scale)))
        thumbnail = np.asarray(Image.fromarray(picture).resize(shape, Image.Resampling.BOX))
    else:
        thumbnail = picture
    return thumbnail, slide.mpp * slide.dimensions[0] / thumbnail.shape[1], picture


def _shard(partial: Path, chunk: int) -> Path:
    return partial / f"chunk_{chunk:06d}.parquet"


def _read_ahead(read: Callable[[Tile], np.ndarray], tiles: Iterable[Tile], workers: int,
                depth: int) -> Iterator[np.ndarray]:
    """``read(tile)`` for each tile, in order, with up to ``depth`` reads running ahead on ``workers`` threads
    (OpenSlide and Pillow release the GIL while decoding, so reads overlap the model)."""
    if workers <= 0:
        yield from map(read, tiles)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="denuc-read")
    try:
        tiles = iter(tiles)
        pending = deque(pool.submit(read, tile) for tile in itertools.islice(tiles, depth))
        while pending:
            future = pending.popleft()
            pending.extend(pool.submit(read, tile) for tile in itertools.islice(tiles, 1))
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_chunks(slide: Slide, model: Pipeline, grid: Grid, chunks: list[list[Tile]], todo: list[int],
                partial: Path, *, batch_size: int, workers: int, embeddings: bool, progress: bool,
                on_chunk: Callable[[int], None] | None, stem: str, timings: dict[str, float]) -> None:
    """Predict the chunks ``todo`` and save each as a shard; add seconds per stage to ``timings``."""
    from tqdm.auto import tqdm

    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, initial=total - sum(len(chunks[k]) for k in todo), unit="tile", desc=stem,
               disable=not progress, dynamic_ncols=True)
    nuclei_found = 0
    read_seconds = []  # appended to by the reading threads (list.append is atomic)

    def read(tile: Tile) -> np.ndarray:
        begin = time.perf_counter()
        pixels = grid.read(slide, tile)
        read_seconds.append(time.perf_counter() - begin)
        return pixels

    reader = _read_ahead(read, (t for k in todo for t in chunks[k]), workers, depth=max(2 * batch_size, 2 * workers))
    radius = model.detector.config.nms_radius_um / model.mpp
    clock = dict.fromkeys(("waiting_for_tiles", "model", "ownership", "shard_writes"), 0.0)
    try:
        for done, k in enumerate(todo, start=len(chunks) - len(todo) + 1):
            parts = []
            for first in range(0, len(chunks[k]), batch_size):
                batch = chunks[k][first:first + batch_size]
                t0 = time.perf_counter()
                pixels = np.stack([next(reader) for _ in batch])
                t1 = time.perf_counter()
                found = model.predict_tiles(pixels, embeddings=embeddings)
                t2 = time.perf_counter()
                for tile, nuclei in zip(batch, found):
                    owned, seam = _owned(grid, slide, tile, nuclei, radius)
                    parts.append((tile, owned, seam))
                    nuclei_found += len(owned)
                clock["waiting_for_tiles"] += t1 - t0
                clock["model"] += t2 - t1
                clock["ownership"] += time.perf_counter() - t2
                bar.update(len(batch))
                bar.set_postfix(nuclei=nuclei_found, refresh=False)
            t0 = time.perf_counter()
            _write_shard(_shard(partial, k), parts, model, embeddings)
            clock["shard_writes"] += time.perf_counter() - t0
            if on_chunk is not None:
                on_chunk(done)
    finally:
        reader.close()
        bar.close()
        timings.update(clock, reading_in_threads=sum(read_seconds))


def _owned(grid: Grid, slide: Slide, tile: Tile, found: Nuclei, radius: float) -> tuple[Nuclei, np.ndarray]:
    """The nuclei a tile owns, in level-0 pixels, and which of them lie within ``radius`` working pixels of a
    border shared with another tile (where the neighbour may have placed the same nucleus)."""
    row, col = tile
    u, v = found.xy[:, 0] + grid.xs[col], found.xy[:, 1] + grid.ys[row]
    (xlo, xhi), (ylo, yhi) = grid.xbounds[col], grid.ybounds[row]
    width, height = grid.extent
    owned = ((u >= xlo) & (u < xhi) & (v >= ylo) & (v < yhi)
             & (u >= -0.5) & (u <= width - 0.5) & (v >= -0.5) & (v <= height - 0.5))
    seam = np.minimum.reduce([u - xlo, xhi - u, v - ylo, yhi - v]) <= radius if len(u) else np.zeros(0, bool)
    kept = found.subset(owned)
    level0 = np.stack([(u[owned] + 0.5) / grid.scale - 0.5, (v[owned] + 0.5) / grid.scale - 0.5], axis=1)
    kept.xy = np.clip(level0, -0.5, np.array(slide.dimensions) - 0.5).reshape(-1, 2)
    return kept, seam[owned]


def _write_shard(path: Path, parts: list[tuple[Tile, Nuclei, np.ndarray]], model: Pipeline,
                 embeddings: bool) -> None:
    """One chunk's nuclei (a chunk has at least one tile) as Parquet, with the embeddings as a .npy beside it,
    written first: the Parquet file's presence is what marks the chunk done."""
    found = concat([n for _, n, _ in parts])
    columns = {
        "x": found.xy[:, 0], "y": found.xy[:, 1], "score": found.scores,
        "label": pa.array(found.labels.tolist(), pa.string()),
        "row": np.concatenate([np.full(len(n), tile[0], np.int32) for tile, n, _ in parts]),
        "col": np.concatenate([np.full(len(n), tile[1], np.int32) for tile, n, _ in parts]),
        "seam": np.concatenate([seam for _, _, seam in parts]),
    }
    for j, _ in enumerate(model.classes):
        columns[f"p{j}"] = found.probs[:, j]
    if embeddings:
        with atomic_path(path.with_suffix(".npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, found.embeddings.astype(np.float16))
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def _read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    # ParquetFile, not pq.read_table: read_table goes through pyarrow.dataset, whose first import costs a fresh
    # process 0.05-0.08 s (measured), more than reading a region's shards
    with pq.ParquetFile(path) as shard:
        return shard.read(columns=columns)


def _seam_duplicates(shards: list[Path], radius: float) -> tuple[np.ndarray, int]:
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
        table = _read_shard(path, columns=["x", "y", "score", "row", "col", "seam"])
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


def _assemble(slide: Slide, model: Pipeline, grid: Grid, chunks: list[list[Tile]], partial: Path,
              paths: dict[str, Path], mask: TissueMask, picture: np.ndarray, *, embeddings: bool) -> dict:
    """Stream the shards into the final tables, embeddings and pictures; return the counting part of the
    summary."""
    shards = [_shard(partial, k) for k in range(len(chunks))]
    radius = model.detector.config.nms_radius_um / slide.mpp
    dropped, total = _seam_duplicates(shards, radius)
    count = total - len(dropped)
    classes = model.classes
    per_class = {c.name: 0 for c in classes} if classes else {}
    overview = _Overview(picture, slide, classes, dots=count <= max(mask.mask.sum(), 1) * DOTS_PER_PIXEL_MAX)
    dim = _embedding_dim(shards) if embeddings else 0
    vectors = EmbeddingWriter(paths["_embeddings.npy"], count, dim) if embeddings else contextlib.nullcontext()
    with NucleusTableWriter(paths[".csv"].with_suffix(""), classes, slide.mpp) as tables, vectors:
        offset = 0
        for path in shards:
            table = _read_shard(path)
            n = table.num_rows
            keep = ~np.isin(np.arange(offset, offset + n), dropped)
            offset += n
            nuclei = Nuclei(
                xy=np.stack([table["x"].to_numpy(), table["y"].to_numpy()], axis=1)[keep],
                labels=np.asarray(table["label"].to_pylist(), dtype=object)[keep],
                scores=table["score"].to_numpy()[keep],
                probs=np.stack([table[f"p{j}"].to_numpy() for j in range(len(classes))], axis=1)[keep]
                if classes else None,
                classes=classes,
            )
            ids = tables.write(nuclei)
            if embeddings:
                vectors.write(ids, np.load(path.with_suffix(".npy"))[keep])
            labels, counts = np.unique(nuclei.labels.astype(str), return_counts=True)
            for label, k in zip(labels.tolist(), counts.tolist()):
                per_class[label] = per_class.get(label, 0) + k
            overview.add(nuclei)
    overview.save(paths["_overview.png"])
    with atomic_path(paths["_tissue.png"]) as tmp:
        Image.fromarray(mask.mask.astype(np.uint8) * 255).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    area = mask.area_mm2
    return {
        "nuclei": count,
        "counts": per_class,
        "density_per_mm2": {"all": count / area if area else None,
                            **{name: k / area if area else None for name, k in per_class.items()}},
        "seam_duplicates_removed": int(len(dropped)),
        "overview": "dots" if overview.dots else "density map",
        "warnings": [],
    }


def _embedding_dim(shards: list[Path]) -> int:
    for path in shards:
        array = np.load(path.with_suffix(".npy"), mmap_mode="r")
        if array.shape[0]:
            return int(array.shape[1])
    return 0


class _Overview:
    """The thumbnail with a dot per nucleus in its class colour, or a nucleus density map when there are too
    many nuclei per thumbnail pixel for dots to be read."""

    def __init__(self, thumbnail: np.ndarray, slide: Slide, classes: list, dots: bool) -> None:
        self.dots = dots
        self.image = Image.fromarray(thumbnail).convert("RGB")
        self.draw = ImageDraw.Draw(self.image)
        self.scale = thumbnail.shape[1] / slide.dimensions[0], thumbnail.shape[0] / slide.dimensions[1]
        self.mpp = slide.mpp / self.scale[0]
        self.colors = {c.name: tuple(c.color) for c in classes}
        self.counts = np.zeros(thumbnail.shape[:2], dtype=np.float64)

    def add(self, nuclei: Nuclei) -> None:
        x = (nuclei.xy[:, 0] + 0.5) * self.scale[0] - 0.5
        y = (nuclei.xy[:, 1] + 0.5) * self.scale[1] - 0.5
        if not self.dots:
            h, w = self.counts.shape
            np.add.at(self.counts, (np.clip(np.round(y).astype(int), 0, h - 1),
                                    np.clip(np.round(x).astype(int), 0, w - 1)), 1)
            return
        radius = max(1.2, DOT_RADIUS_UM / self.mpp)
        for px, py, label in zip(x.tolist(), y.tolist(), nuclei.labels.tolist()):
            self.draw.ellipse([px - radius, py - radius, px + radius, py + radius],
                              fill=self.colors.get(label, UNLABELLED_COLOR))

    def save(self, path: Path) -> None:
        image = self.image
        if not self.dots:
            # nuclei per mm^2, smoothed over DENSITY_SIGMA_UM; drawn as a yellow-to-red veil over the tissue
            density = ndimage.gaussian_filter(self.counts, DENSITY_SIGMA_UM / self.mpp) / (self.mpp * 1e-3) ** 2
            top = np.percentile(density[density > 0], 99) if (density > 0).any() else 1.0
            heat = np.clip(density / top, 0, 1)[..., None]
            veil = np.concatenate([np.full_like(heat, 255), 255 * (1 - heat), np.zeros_like(heat)], axis=2)
            alpha = 0.7 * heat
            image = Image.fromarray((np.asarray(image) * (1 - alpha) + veil * alpha).round().astype(np.uint8))
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def software_versions() -> dict[str, str]:
    """Versions of the software a result depends on (recorded in every summary)."""
    import openslide

    return {"denuc": denuc.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pyarrow": pa.__version__, "openslide-python": openslide.__version__,
            "openslide": openslide.__library_version__, "platform": sys.platform}
