"""Whole-slide prediction: tissue tiles on the model's working grid, read ahead, batched, streamed to disk.

``predict_slide(slide, model, out_dir)`` writes, for a slide whose file stem is S:

- ``S.csv``, ``S.parquet``, ``S.geojson``: one row / Point feature per nucleus (see ``denuc.io.tables``);
- ``S_embeddings.npy`` (with ``embeddings=True``): float16 (n, d), row i is nucleus id i;
- ``S_tissue.png``: the tissue mask on the thumbnail; ``S_overview.png``: the thumbnail with class-coloured
  dots (a density map when dots would cover it) and a legend of the classes' colours and counts;
- ``S_summary.json``, written last: counts, densities, tissue area, runtime, model, versions, pixel size and
  where it came from, the image's own estimate of it when one was taken, and warnings (``inference.mpp``'s
  plausibility check of the nuclei found: docs/pixel_size.md).

How (docs/slides.md has more): the slide is seen through the model's working grid (``model.mpp`` um/px),
cut into the detector's overlapping tiles; each tile owns the half of every overlap nearest to it, so a
nucleus is kept by exactly one tile. Only tiles whose owned area touches tissue are read, from the pyramid
level closest to the working resolution but not coarser, and resampled. Tiles are grouped into chunks of
``chunk_tiles``; each finished chunk is saved as a shard under ``.S.partial/`` (temporary name, then rename),
so a killed run restarted with ``resume=True`` redoes at most one chunk. When all chunks are done, the shards
are streamed twice: once to drop duplicates across tile seams (two tiles that placed the same nucleus on
either side of their shared border), once to write the outputs beside them, which are then renamed into place
together, the summary last, with Ctrl-C held meanwhile: outputs without their summary never appear.

What an earlier run left is never replaced silently: complete outputs of the same slide, model and settings are
kept (the run is skipped); other outputs under the slide's names (another input's, or other settings') are
refused unless ``overwrite``; saved chunks of an interrupted run are refused unless ``resume`` (continue) or
``overwrite`` (start again).

Here: the run (fingerprint, resume, reading ahead, chunks, assembling the outputs). The grid and tile
ownership are in ``slide_grid``, the shards and seam duplicates in ``shards``, the overview's renderer in
``denuc.io.overlay``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import denuc
from denuc.colour import StainNormaliser
from denuc.errors import DiskFullError, InputError, OutputExistsError
from denuc.inference.mpp import MppEstimate, check_plausibility
from denuc.inference.outline import Outliner
from denuc.inference.pipeline import Pipeline
from denuc.inference.shards import (
    embedding_dim,
    read_shard,
    seam_duplicates,
    shard_measurements,
    shard_nuclei,
    shard_path,
    write_shard,
)
from denuc.inference.slide_grid import Grid, Tile, tissue_tiles
from denuc.inference.tissue import METHOD as TISSUE_METHOD
from denuc.inference.tissue import TissueMask, detect_tissue
from denuc.io.atomic import atomic_path, deferred_interrupt, free_bytes
from denuc.io.overlay import PNG_COMPRESS_LEVEL, Overview
from denuc.io.slides import Slide
from denuc.io.tables import EmbeddingWriter, NucleusTableWriter
from denuc.outlines import MEASUREMENTS, clip_outlines

THUMBNAIL_MIN_MPP = 2.0  # um per thumbnail pixel: about a nucleus radius, so overview dots can sit on nuclei
THUMBNAIL_MAX_SIDE = 4096
OVERVIEW_MIN_SIDE = 1024  # small inputs (plain images) get an overview this large, up to their own pixels
STAIN_SAMPLE_TILES = 16  # tiles whose colours a slide's stain normalisation starts from
DOTS_PER_PIXEL_MAX = 1 / 16  # above this many nuclei per tissue-mask pixel, dots hide the tissue: draw density
# the CSV, Parquet and GeoJSON rows of one nucleus, measured (a detector's: 105 + 70 + 227 bytes), and what each
# class's probability adds to them (19 + 10 + 45 bytes): to say how much space the outputs need when it runs out
TABLE_BYTES_PER_NUCLEUS = 400
TABLE_BYTES_PER_CLASS = 75
OUTPUT_SUFFIXES = (".csv", ".parquet", ".geojson", "_embeddings.npy", "_tissue.png", "_overview.png",
                   "_summary.json")


def model_fingerprint(model: Pipeline) -> str:
    """SHA-256 of the model's weights, configuration and classes: resumed work must come from the same model."""
    digest = hashlib.sha256(model.detector.config.to_json().encode())
    digest.update(str(getattr(model.classifier, "test_time_views", None)).encode())  # an inference setting
    if not model.reject:  # an inference setting too (only when off, so earlier runs' fingerprints still hold)
        digest.update(b"keep rejected")
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
    overwrite: bool = False,
    batch_size: int = 8,
    workers: int = 2,
    embeddings: bool = False,
    progress: bool = True,
    model_name: str = "",
    model_id: str | None = None,
    provenance: dict | None = None,
    chunk_tiles: int = 64,
    on_chunk: Callable[[int], None] | None = None,
    stem: str | None = None,
    mpp_estimate: MppEstimate | None = None,
    outliner: Outliner | None = None,
    normaliser: StainNormaliser | None = None,
) -> dict:
    """Detect (and classify) the nuclei of a slide and write the outputs listed in the module docstring.

    Returns the summary (also written as ``<stem>_summary.json``). Outputs that already exist complete, from
    the same slide, model and settings, are kept and their summary returned with ``"skipped": True``. With
    ``resume``, the shards of an interrupted run with the same settings are reused. ``on_chunk(done)`` is
    called after each chunk is saved, with the number of chunks done. ``model_id`` (see
    ``model_fingerprint``) saves hashing the weights again for every slide of a batch. ``provenance`` (e.g.
    the model's tag and file sha256, the command line) is written to the summary as given. ``stem`` names
    the outputs (default: the slide file's stem). What an earlier run left is refused unless ``resume``
    or ``overwrite`` (module docstring): an ``OutputExistsError`` naming the file. ``mpp_estimate``: the
    slide's ``estimate_mpp`` (``inference.mpp.open_for_run``), recorded and checked against ``slide.mpp``.
    ``outliner``: also outline and measure each nucleus (``Outliner.outline_tiles``); the tables then hold the
    measurements and the GeoJSON polygons. ``normaliser``: move the slide's colours to its target before the model
    sees them, by one transfer from the tissue colours of tiles spread over the slide (``StainNormaliser``), the
    same for every tile.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    stem = stem or slide.path.stem
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
        "outlines": None if outliner is None else outliner.fingerprint(),
        "normalise_stain": None if normaliser is None else normaliser.to_dict(),
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    done = None if overwrite else _completed_summary(paths, fingerprint, embeddings, slide.path)
    if done is not None:
        shutil.rmtree(partial, ignore_errors=True)
        return {**done, "skipped": True}
    _refuse_to_replace(slide.path, paths, partial, fingerprint, resume=resume, overwrite=overwrite)
    if outliner is not None:  # behind the outline head's own detector, one pass of the network gives both
        model = copy.copy(model)
        model.detector = outliner.sharing(model.detector)

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
        # one transfer for the whole slide, from the tissue colours of up to STAIN_SAMPLE_TILES of its tiles spread
        # over it, at the working resolution (a thumbnail's blur would move them); none without tissue
        source = None
        if normaliser is not None and tiles:
            spread = tiles[::max(1, len(tiles) // STAIN_SAMPLE_TILES)][:STAIN_SAMPLE_TILES]
            source = normaliser.statistics(np.concatenate([grid.read(slide, t).reshape(-1, 3) for t in spread]))
        recolour = None if source is None else functools.partial(normaliser.apply, source=source)

        manifest = {"settings": settings, "fingerprint": fingerprint, "chunks": len(chunks), "tiles": len(tiles)}
        if resume and (partial / "manifest.json").is_file():
            previous = json.loads((partial / "manifest.json").read_text())
            if previous.get("fingerprint") != fingerprint:
                raise InputError(slide.path, f"cannot resume: the partial run in {partial} used other settings or "
                                             "another model; pass --overwrite instead of --resume to start again")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            with atomic_path(partial / "manifest.json") as tmp:
                tmp.write_text(json.dumps(manifest, indent=1))

        todo = [k for k in range(len(chunks)) if not shard_path(partial, k).is_file()]
        _run_chunks(slide, model, grid, chunks, todo, partial, batch_size=batch_size, workers=workers,
                    embeddings=embeddings, progress=progress, on_chunk=on_chunk, stem=stem, timings=timings,
                    outliner=outliner, recolour=recolour)
    timings["assemble_outputs"] = -time.perf_counter()
    staged = output_paths(partial, stem)  # written beside the shards, renamed into place together at the end
    try:
        summary = _assemble(slide, model, grid, chunks, partial, staged, mask, picture, embeddings=embeddings,
                            mpp_estimate=mpp_estimate, outlines=outliner is not None)
    except BaseException as error:
        for path in staged.values():  # the shards stay for --resume; a part of the outputs would only take space
            path.unlink(missing_ok=True)
        if isinstance(error, DiskFullError):  # named by the output's own path, with the space the outputs need
            final = {str(staged[k]): paths[k] for k in staged}.get(error.filename, error.filename)
            raise DiskFullError(final, free_bytes(out_dir),
                                _output_bytes(partial, len(chunks), model.classes, embeddings, picture)) from None
        raise
    timings["assemble_outputs"] += time.perf_counter()
    summary.update({
        "slide": {"path": str(slide.path), "backend": slide.backend, "vendor": slide.vendor,
                  "dimensions": list(slide.dimensions), "levels": [list(d) for d in slide.level_dimensions],
                  "level_read": grid.level, "level_read_mpp": slide.mpp * slide.level_downsamples[grid.level],
                  "level_read_in_memory": in_memory},
        "mpp": slide.mpp, "mpp_source": slide.mpp_source,
        "mpp_estimate": None if mpp_estimate is None else mpp_estimate.summary(),
        "tissue": {"method": TISSUE_METHOD if tissue_mask else "none (--no-tissue-mask): the whole slide",
                   "area_mm2": mask.area_mm2, "threshold": mask.threshold, "mask_mpp": mask.mpp},
        "tiles": {"total": len(grid.xs) * len(grid.ys), "processed": len(tiles), "size": list(grid.tile_size),
                  "overlap": model.detector.config.tile_overlap, "chunks": len(chunks),
                  "chunks_reused": len(chunks) - len(todo)},
        "provenance": provenance or {},
        "model": {"name": model_name, "sha256": settings["model"], "mpp": model.mpp,
                  "score_threshold": model.detector.config.threshold_for(slide.mpp),  # the one this scan got
                  "classifier": model.classifier is not None,
                  "classifier_test_time_views": getattr(model.classifier, "test_time_views", None),
                  "classes": [{"name": c.name, "color": list(c.color)} for c in model.classes],
                  "detector": json.loads(model.detector.config.to_json())},
        "settings": {"batch_size": batch_size, "workers": workers, "device": settings["device"],
                     "runtime": settings["runtime"],
                     "tissue_mask": tissue_mask, "embeddings": embeddings, "resumed": len(todo) < len(chunks)},
        "stain_normalised": None if source is None else {
            "method": "Reinhard (CIELAB tissue mean and standard deviation), one transfer for the slide",
            "from": {"mean": source[0].round(4).tolist(), "std": source[1].round(4).tolist()},
            "to": normaliser.to_dict()},
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
    with atomic_path(staged["_summary.json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    _publish(staged, paths)
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _completed_summary(paths: dict[str, Path], fingerprint: str, embeddings: bool, slide_path: Path) -> dict | None:
    """The summary of a finished run of this slide with the same fingerprint whose outputs are all there, else
    None."""
    summary = _read_summary(paths["_summary.json"])
    wanted = [p for k, p in paths.items() if k != "_embeddings.npy" or embeddings]
    if (summary.get("fingerprint") == fingerprint and _other_input(summary, slide_path) is None
            and all(p.is_file() for p in wanted)):
        return summary
    return None


def _read_summary(path: Path) -> dict:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _other_input(summary: dict, slide_path: Path) -> str | None:
    """The input a summary was made from when that is another file that exists (two files of the same name and
    size in different folders have the same fingerprint; a moved slide is still the same input), else None."""
    recorded = summary.get("slide", {}).get("path")
    if recorded is None or not os.path.exists(recorded) or os.path.samefile(recorded, slide_path):
        return None
    return recorded


def _refuse_to_replace(slide_path: Path, paths: dict[str, Path], partial: Path, fingerprint: str, *, resume: bool,
                       overwrite: bool) -> None:
    """Raise an OutputExistsError when this run would replace what an earlier run left (module docstring)."""
    if resume and overwrite:
        raise InputError(slide_path, "resume continues an interrupted run, overwrite starts again: choose one")
    if overwrite:
        return
    manifest = _read_summary(partial / "manifest.json")
    resumable = manifest.get("fingerprint") == fingerprint
    if manifest and not resume:
        saved = f"{len(list(partial.glob('chunk_*.parquet')))} of {manifest.get('chunks')} chunks"
        if resumable:
            raise OutputExistsError(partial, f"holds {saved} saved by an interrupted run of this slide: pass --resume "
                                             "to continue it, or --overwrite to start again")
        raise OutputExistsError(partial, f"holds {saved} saved by an interrupted run with other settings or another "
                                         "model: pass --overwrite to discard them and start again")
    existing = [p for p in paths.values() if p.exists()]
    if existing and not (resume and resumable):  # an interrupted run's own outputs are rewritten when resumed
        summary = _read_summary(paths["_summary.json"])
        other = _other_input(summary, slide_path)
        whose = (f"the results of another input, {other}" if other else
                 "results with other settings or another model" if summary else "an incomplete earlier output")
        raise OutputExistsError(paths["_summary.json"] if summary else existing[0],
                                f"holds {whose}: pass --overwrite to replace them, or choose another --out")


def _publish(staged: dict[str, Path], paths: dict[str, Path]) -> None:
    """Rename the staged outputs to their places, with Ctrl-C held until they are all there: an earlier run's
    summary goes first, the new one comes last, so no set of outputs is ever seen with a summary not its own. An
    earlier run's outputs that this run does not write (embeddings) go too."""
    with deferred_interrupt():
        paths["_summary.json"].unlink(missing_ok=True)
        for key, path in paths.items():
            if staged[key].is_file():
                os.replace(staged[key], path)
            else:
                path.unlink(missing_ok=True)


def _output_bytes(partial: Path, chunks: int, classes: list, embeddings: bool, picture: np.ndarray) -> int:
    """About the bytes the outputs take: the shards' rows (seam duplicates included) at the measured size of a
    row in the three tables, each class's probabilities, the embeddings and the overview picture."""
    shards = [shard_path(partial, k) for k in range(chunks)]
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in shards)
    dim = embedding_dim(shards) if embeddings else 0
    return rows * (TABLE_BYTES_PER_NUCLEUS + TABLE_BYTES_PER_CLASS * len(classes) + 2 * dim) + picture.nbytes


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
                on_chunk: Callable[[int], None] | None, stem: str, timings: dict[str, float],
                outliner: Outliner | None = None, recolour: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Predict the chunks ``todo`` and save each as a shard; add seconds per stage to ``timings``. ``recolour``:
    applied to each tile as it is read (in the reading threads)."""
    from tqdm.auto import tqdm

    total = sum(len(c) for c in chunks)
    bar = tqdm(total=total, initial=total - sum(len(chunks[k]) for k in todo), unit="tile", desc=stem,
               disable=not progress, dynamic_ncols=True)
    nuclei_found = 0
    read_seconds = []  # appended to by the reading threads (list.append is atomic)

    def read(tile: Tile) -> np.ndarray:
        begin = time.perf_counter()
        pixels = grid.read(slide, tile)
        if recolour is not None:
            pixels = recolour(pixels)
        read_seconds.append(time.perf_counter() - begin)
        return pixels

    reader = _read_ahead(read, (t for k in todo for t in chunks[k]), workers, depth=max(2 * batch_size, 2 * workers))
    radius = model.detector.config.nms_radius_um / model.mpp
    clock = dict.fromkeys(("waiting_for_tiles", "model", "outlines", "ownership", "shard_writes"), 0.0)
    try:
        for done, k in enumerate(todo, start=len(chunks) - len(todo) + 1):
            parts = []
            for first in range(0, len(chunks[k]), batch_size):
                batch = chunks[k][first:first + batch_size]
                t0 = time.perf_counter()
                pixels = np.stack([next(reader) for _ in batch])
                t1 = time.perf_counter()
                found = model.predict_tiles(pixels, embeddings=embeddings, scan_mpp=slide.mpp)
                t2 = time.perf_counter()
                mine, seam = zip(*(grid.ownership(tile, nuclei.xy, radius) for tile, nuclei in zip(batch, found)))
                t3 = time.perf_counter()
                if outliner is not None:  # only the nuclei each tile owns; the others' points still trim them
                    owned, measured = zip(*outliner.outline_tiles(pixels, found, model.mpp, wanted=mine))
                else:
                    owned, measured = [n.subset(keep) for n, keep in zip(found, mine)], [None] * len(batch)
                t4 = time.perf_counter()
                for tile, nuclei, near_seam, keep, values in zip(batch, owned, seam, mine, measured):
                    parts.append((tile, grid.to_level0(tile, nuclei, slide.dimensions), near_seam[keep], values))
                    nuclei_found += len(nuclei)
                clock["waiting_for_tiles"] += t1 - t0
                clock["model"] += t2 - t1
                clock["ownership"] += t3 - t2 + time.perf_counter() - t4
                clock["outlines"] += t4 - t3
                bar.update(len(batch))
                bar.set_postfix(nuclei=nuclei_found, refresh=False)
            t0 = time.perf_counter()
            write_shard(shard_path(partial, k), parts, model.classes, embeddings)
            clock["shard_writes"] += time.perf_counter() - t0
            if on_chunk is not None:
                on_chunk(done)
    finally:
        reader.close()
        bar.close()
        timings.update(clock, reading_in_threads=sum(read_seconds))


def _assemble(slide: Slide, model: Pipeline, grid: Grid, chunks: list[list[Tile]], partial: Path,
              paths: dict[str, Path], mask: TissueMask, picture: np.ndarray, *, embeddings: bool,
              mpp_estimate: MppEstimate | None, outlines: bool = False) -> dict:
    """Stream the shards into the final tables, embeddings and pictures; return the counting part of the
    summary, with the plausibility check's warnings."""
    shards = [shard_path(partial, k) for k in range(len(chunks))]
    radius = model.detector.config.nms_radius_um / slide.mpp
    dropped, total = seam_duplicates(shards, radius)
    count = total - len(dropped)
    classes = model.classes
    per_class = {c.name: 0 for c in classes} if classes else {}
    scale = picture.shape[1] / slide.dimensions[0], picture.shape[0] / slide.dimensions[1]
    overview = Overview(picture, classes, slide.mpp / scale[0], scale,
                        dots=count <= max(mask.mask.sum(), 1) * DOTS_PER_PIXEL_MAX)
    dim = embedding_dim(shards) if embeddings else 0
    vectors = EmbeddingWriter(paths["_embeddings.npy"], count, dim) if embeddings else contextlib.nullcontext()
    scores = []  # the detection scores, for the plausibility check
    names = MEASUREMENTS if outlines else ()
    with NucleusTableWriter(paths[".csv"].with_suffix(""), classes, slide.mpp, names) as tables, vectors:
        offset = 0
        for path in shards:
            table = read_shard(path)
            n = table.num_rows
            keep = ~np.isin(np.arange(offset, offset + n), dropped)
            offset += n
            nuclei = shard_nuclei(table, classes).subset(keep)
            values = {name: v[keep] for name, v in shard_measurements(table).items()}
            if outlines:
                nuclei = clip_outlines(nuclei, slide.dimensions)
            ids = tables.write(nuclei, values)
            scores.append(nuclei.scores)
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
        "warnings": check_plausibility(np.concatenate(scores) if scores else np.zeros(0), slide.mpp, area,
                                       mpp_estimate),
    }


def software_versions() -> dict[str, str]:
    """Versions of the software a result depends on (recorded in every summary)."""
    import openslide

    return {"denuc": denuc.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pyarrow": pa.__version__, "openslide-python": openslide.__version__,
            "openslide": openslide.__library_version__, "platform": sys.platform}
