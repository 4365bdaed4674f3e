"""Cohorts of slides, one Dask task per slide: failures isolated, dead workers' slides retried, one table.

``run_cohort(jobs, model, out_dir, cluster=...)`` runs ``predict_slide`` on every ``Job`` (a slide file, its
pixel size when given, the name of its outputs):

- ``cluster``: None runs the slides one after another in this process; ``"local:N"`` starts N worker processes
  on this machine (``local_cluster``); ``"tcp://HOST:PORT"`` joins a running Dask scheduler (one that
  ``dask-jobqueue`` started on SLURM, or ``dask scheduler`` / ``dask worker`` by hand: docs/cohorts.md).
- Each worker process loads the model once (``_loaded``, a per-process cache) and opens, processes and writes
  its slide itself: only the job's description goes to the worker and only the slide's row comes back.
- A slide that fails (an InputError: unreadable file, unknown pixel size; or any other error) gets a ``failed``
  row with the message, and the others go on. A worker that dies mid-slide (killed, out of memory) loses at
  most its current chunk of tiles: the slide is submitted again, up to ``retries`` times, and resumes from
  the chunks saved under ``.S.partial/``; after that it is marked failed.
- Every attempt resumes (``predict_slide(resume=True)``) and a slide whose outputs are complete with the same
  model and settings is skipped: re-running the same cohort does only what is missing. With
  ``SlideSettings(overwrite=True)`` the first attempt starts each slide again instead (earlier outputs and
  chunks are replaced); its retries still resume.
- ``cohort.parquet`` and ``cohort.csv`` in the output folder, one row per finished slide (``table_columns``),
  are rewritten atomically as slides finish.

Dask (``pip install denuc[cluster]``) is imported only when ``cluster`` is given.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import math
import os
import re
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from denuc.config import MPP_AUTO
from denuc.errors import InputError, describe_os_error
from denuc.io.atomic import atomic_path

if TYPE_CHECKING:
    from distributed import Client
    from distributed.deploy import Cluster

    from denuc.inference.pipeline import Pipeline

MANIFEST_COLUMNS = ("path", "mpp", "out_name")
"""A manifest's columns, named in its header row: ``path`` (required; relative to the manifest's folder),
``mpp`` (um/px, overriding the slide's metadata; ``auto``: estimated from the slide's pixels; may be empty) and
``out_name`` (stem of the outputs; may be empty: the file's stem)."""
TABLE = "cohort"
"""The cohort table's file stem: ``cohort.parquet`` and ``cohort.csv`` in the output folder."""
_CLUSTER = re.compile(r"local:[1-9][0-9]*|tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}")


@dataclass(frozen=True)
class Job:
    """One slide of a cohort: its file; its pixel size in um/px when given (None: the file's metadata; ``MPP_AUTO``:
    estimated from its pixels) and where that value came from (None: "--mpp"); the stem of its outputs (None: the
    file's stem)."""

    path: Path
    mpp: float | str | None = None
    mpp_source: str | None = None
    out_name: str | None = None

    @property
    def name(self) -> str:
        return self.out_name or self.path.stem


@dataclass(frozen=True)
class ModelSpec:
    """The model every worker loads: a shipped name or a weights file, as a full pipeline (a bundle) or as
    its detector alone, on which device and runtime, with how many test-time views."""

    name: str
    detector_only: bool = False
    device: str = "cpu"
    runtime: str = "auto"
    tta: int = 1

    def load(self) -> Pipeline:
        from denuc.inference.detect import Detector
        from denuc.inference.pipeline import Pipeline

        if self.detector_only:
            model = Pipeline(Detector.from_pretrained(self.name, device=self.device, runtime=self.runtime))
        else:
            model = Pipeline.from_pretrained(self.name, device=self.device, runtime=self.runtime)
        return model.with_test_time_views(self.tta)


@dataclass(frozen=True)
class SlideSettings:
    """The ``predict_slide`` settings every slide of a cohort gets."""

    tissue_mask: bool = True
    batch_size: int = 8
    workers: int = 2  # tile-reading threads
    embeddings: bool = False
    chunk_tiles: int = 64
    overwrite: bool = False  # the first attempt replaces earlier outputs and saved chunks; a retry resumes


# --- the jobs -------------------------------------------------------------------------------------------------


def expand_globs(inputs: list[Path]) -> list[Path]:
    """The paths as given, except that one that does not exist and holds a wildcard (``*``, ``?``, ``[``) is
    replaced by what it matches, sorted (``**`` spans folders): a quoted pattern is not limited by the shell's
    maximum command length. A pattern that matches nothing is an InputError."""
    found = []
    for path in inputs:
        if path.exists() or not glob.has_magic(str(path)):
            found.append(path)
            continue
        matches = sorted(glob.glob(str(path.expanduser()), recursive=True))
        if not matches:
            raise InputError(path, "matches no files")
        found.extend(map(Path, matches))
    return found


def read_manifest(path: str | os.PathLike) -> list[Job]:
    """The jobs a manifest CSV lists (``MANIFEST_COLUMNS``; a header row, then one slide per row; blank rows
    are skipped). A malformed row is an InputError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets save a byte-order mark
    except FileNotFoundError:
        raise InputError(path, "manifest not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read the manifest: {error}") from None
    rows = csv.reader(text.splitlines())
    header = [cell.strip() for cell in next(rows, [])]
    expected = "a header row naming the columns: path, and optionally mpp and out_name"
    unknown = [name for name in header if name not in MANIFEST_COLUMNS]
    if "path" not in header or unknown or len(set(header)) != len(header):
        raise InputError(path, f"expected {expected}, got {header}", where="line 1")
    jobs, line_of = [], {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"line {line}"
        if len(row) != len(header):
            raise InputError(path, f"{len(row)} fields where the header has {len(header)} ({','.join(header)})",
                             where=where)
        cells = {name: cell.strip() for name, cell in zip(header, row)}
        if not cells["path"]:
            raise InputError(path, "empty path", where=where)
        slide = Path(cells["path"]).expanduser()
        mpp = None
        if cells.get("mpp") == MPP_AUTO:
            mpp = MPP_AUTO
        elif cells.get("mpp"):
            try:
                mpp = float(cells["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise InputError(path, f"mpp must be a positive number of um/px, got {cells['mpp']!r} (or "
                                       f"{MPP_AUTO}: estimated from the slide)", where=where)
        out_name = cells.get("out_name") or None
        if out_name is not None and (out_name.startswith(".") or any(c in out_name for c in "/\\")):
            raise InputError(path, f"out_name is a file stem: no '/', '\\' or leading '.', got {out_name!r}",
                             where=where)
        job = Job(slide if slide.is_absolute() else path.parent / slide, mpp,
                  f"manifest {path.name} {where}" if mpp and mpp != MPP_AUTO else None, out_name)
        if job.name in line_of:
            raise InputError(path, f"output name {job.name!r} is also line {line_of[job.name]}'s: their outputs "
                                   "would overwrite each other; give one of them an out_name", where=where)
        line_of[job.name] = line
        jobs.append(job)
    if not jobs:
        raise InputError(path, "the manifest lists no slides")
    return jobs


# --- the cluster ----------------------------------------------------------------------------------------------


def parse_cluster(text: str) -> str:
    """``local:N`` (N >= 1) or ``tcp://HOST:PORT``, as given; ValueError saying what is expected otherwise."""
    if _CLUSTER.fullmatch(text) is None:
        raise ValueError(f"expected local:N (N worker processes on this machine, N >= 1) or tcp://HOST:PORT "
                         f"(a running Dask scheduler), got {text!r}")
    return text


def local_cluster(n_workers: int, device: str = "cpu", **kwargs) -> Cluster:
    """N worker processes on this machine, one thread each (a worker holds one model and works on one slide
    at a time). On a CPU each gets its share of the cores for torch's and ONNX Runtime's threads
    (OMP_NUM_THREADS). With ``device`` "cuda" and dask-cuda installed: ``LocalCUDACluster``, which gives each
    worker one GPU (CUDA_VISIBLE_DEVICES, so each sees it as cuda:0). The scheduler retries no task itself
    (``allowed_failures=0``): a dead worker's slide comes straight back to ``run_cohort``, which counts the
    attempts. ``kwargs`` go to the cluster (e.g. ``dashboard_address``, ``memory_limit``)."""
    scheduler = {"allowed_failures": 0}
    if device.startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            warnings.warn(f"--device {device} on local:{n_workers} without dask-cuda: every worker uses the same "
                          "GPU; install dask-cuda (one GPU per worker) or start the workers with "
                          "CUDA_VISIBLE_DEVICES set (docs/cohorts.md)", stacklevel=2)
        else:
            return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, scheduler_kwargs=scheduler, **kwargs)
    from distributed import LocalCluster

    threads = max(1, len(os.sched_getaffinity(0)) // n_workers) if hasattr(os, "sched_getaffinity") else 1
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, scheduler_kwargs=scheduler,
                        env={"OMP_NUM_THREADS": str(threads)}, **kwargs)


@contextlib.contextmanager
def dask_client(cluster: str, device: str = "cpu") -> Iterator[Client]:
    """A client of ``local_cluster`` (``local:N``; closed on exit) or of the scheduler at ``tcp://HOST:PORT``."""
    try:
        from distributed import Client
    except ImportError:
        raise InputError("--cluster", "needs Dask distributed: pip install 'denuc[cluster]'") from None

    if parse_cluster(cluster).startswith("local:"):
        with local_cluster(int(cluster.split(":")[1]), device) as local, Client(local) as client:
            yield client
    else:
        with Client(cluster) as client:
            yield client


# --- one slide, in a worker -----------------------------------------------------------------------------------

_MODELS: dict[ModelSpec, tuple[Pipeline, str]] = {}
_MODELS_LOCK = threading.Lock()


def _loaded(spec: ModelSpec) -> tuple[Pipeline, str]:
    """The model and its fingerprint, loaded once per process (one model at a time: a worker given another
    model drops the first, so a GPU holds one)."""
    from denuc.inference.slide import model_fingerprint

    with _MODELS_LOCK:
        if spec not in _MODELS:
            _MODELS.clear()
            model = spec.load()
            _MODELS[spec] = (model, model_fingerprint(model))
        return _MODELS[spec]


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not in a Dask worker: the slides run in this process
        return ""


def process_slide(job: Job, model: ModelSpec, out_dir: str, settings: SlideSettings, provenance: dict,
                  attempt: int, on_chunk: Callable[[Job, int, int], None] | None = None) -> dict:
    """Predict one slide where this runs (a Dask task, or in-process) and return its cohort row. Interrupted
    work resumes from its saved chunks (unless ``settings.overwrite`` in attempt 0); an error (the slide's, not
    the worker's death) gives a failed row."""
    from denuc.hub import resolve
    from denuc.inference.mpp import estimating_detector, open_for_run
    from denuc.inference.slide import predict_slide

    started = time.perf_counter()
    row = {**_row(job, model, provenance, attempt + 1), "worker": _worker_address()}
    options = {**asdict(settings), "overwrite": settings.overwrite and attempt == 0}
    try:
        pipeline, model_id = _loaded(model)
        started = time.perf_counter()  # the slide's time, not the worker's first model load
        own_file = resolve(model.name, kind="detector") if model.detector_only else None  # a bundle's: none
        with warnings.catch_warnings(record=True) as caught:  # opening warns too (a contradicted pixel size)
            warnings.simplefilter("always")
            with open_for_run(job.path, job.mpp, lambda: estimating_detector(pipeline.detector, own_file),
                              job.mpp_source) as (slide, estimate):
                summary = predict_slide(
                    slide, pipeline, out_dir, stem=job.out_name, resume=not options["overwrite"], progress=False,
                    model_name=model.name, model_id=model_id, provenance=provenance, mpp_estimate=estimate,
                    **options, on_chunk=None if on_chunk is None else lambda done: on_chunk(job, attempt, done))
    except (InputError, OSError) as error:  # OSError: an unreadable file, a full disk
        message = str(error) if isinstance(error, InputError) else describe_os_error(error)
        return {**row, "status": "failed", "error": message, "seconds": time.perf_counter() - started}
    except Exception as error:  # one slide's bug or corrupt tile must not stop a cohort: the traceback is logged
        traceback.print_exc()
        return {**row, "status": "failed", "error": f"{job.path}: {type(error).__name__}: {error}",
                "seconds": time.perf_counter() - started}
    return {**row, **_counts(summary), "status": "skipped" if summary.get("skipped") else "done",
            "warnings": "; ".join(str(w.message) for w in caught), "seconds": time.perf_counter() - started}


def _row(job: Job, model: ModelSpec, provenance: dict, attempts: int) -> dict:
    """What a slide's row says before it is processed."""
    return {"slide": str(job.path), "name": job.name, "attempts": attempts,
            "mpp": None if job.mpp == MPP_AUTO else job.mpp, "mpp_source": job.mpp_source, "model": model.name,
            "model_tag": provenance.get("model", {}).get("tag")}


def _counts(summary: dict) -> dict:
    """A summary's figures for the cohort table: nuclei and densities, overall and per class."""
    density = summary["density_per_mm2"]
    estimate = summary.get("mpp_estimate") or {}  # a summary written before the estimate was recorded has none
    row = {"nuclei": summary["nuclei"], "density_per_mm2": density["all"],
           "tissue_mm2": summary["tissue"]["area_mm2"], "mpp": summary["mpp"], "mpp_source": summary["mpp_source"],
           "mpp_estimate": estimate.get("mpp"), "mpp_confidence": estimate.get("confidence")}
    for name, count in summary["counts"].items():
        row[f"nuclei_{name}"] = count
        row[f"density_{name}_per_mm2"] = density[name]
    return row


# --- the cohort -----------------------------------------------------------------------------------------------


def run_cohort(
    jobs: list[Job],
    model: ModelSpec | str,
    out_dir: str | os.PathLike,
    *,
    cluster: str | None = None,
    retries: int = 2,
    settings: SlideSettings = SlideSettings(),
    provenance: dict | None = None,
    progress: bool = True,
    on_chunk: Callable[[Job, int, int], None] | None = None,
) -> list[dict]:
    """Predict every job's slide into ``out_dir`` (see the module docstring) and return the cohort table's
    rows, in the jobs' order. ``cluster``: None (in this process), ``"local:N"`` or ``"tcp://HOST:PORT"``.
    ``retries``: how many times a slide whose worker died is submitted again. ``provenance`` goes to each
    summary (default: the model's tag, file and sha256). ``on_chunk(job, attempt, chunks_done)`` runs in the
    worker after each saved chunk (attempt 0 is the first; tests use it to kill a worker mid-slide)."""
    from tqdm.auto import tqdm

    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    model = ModelSpec(model) if isinstance(model, str) else model
    model = replace(model, name=_portable(model.name))
    if provenance is None:
        provenance = {"model": _described(model)}
    # absolute, as workers may run in another folder; links are kept (their names name the outputs)
    out_dir = Path(os.path.abspath(out_dir))
    jobs = [replace(job, path=Path(os.path.abspath(job.path))) for job in jobs]
    rows: dict[int, dict] = {}
    bar = tqdm(total=len(jobs), unit="slide", desc="slides", disable=not progress, dynamic_ncols=True)

    def finish(index: int, row: dict) -> None:
        rows[index] = row
        write_table(out_dir, [rows[i] for i in sorted(rows)])
        bar.update(1)
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows.values()), refresh=False)

    todo, first_of = [], {}
    for index, job in enumerate(jobs):
        if job.name in first_of:  # as the sequential command does: the later slide is refused
            finish(index, {**_row(job, model, provenance, 0), "status": "failed",
                           "error": f"{job.path}: same output name as {first_of[job.name]}: its outputs in "
                                    f"{out_dir} would overwrite each other; give it another out_name"})
        else:
            first_of[job.name] = job.path
            todo.append(index)
    task = (model, str(out_dir), settings, provenance)
    try:
        if cluster is None:
            for index in todo:
                finish(index, process_slide(jobs[index], *task, 0, on_chunk))
        else:
            with dask_client(cluster, model.device) as client:
                _run_on_dask(client, jobs, todo, task, retries, on_chunk, finish, bar)
    finally:
        bar.close()
    return [rows[i] for i in range(len(jobs))]


def _run_on_dask(client: Client, jobs: list[Job], todo: list[int], task: tuple, retries: int,
                 on_chunk: Callable | None, finish: Callable[[int, dict], None], bar) -> None:
    """One task per slide; a task whose worker died (KilledWorker) is submitted again up to ``retries`` times."""
    from distributed import KilledWorker, as_completed

    model, _, _, provenance = task
    link = client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else None
    if link and not bar.disable:
        bar.write(f"Dask dashboard: {link}")
    run = uuid.uuid4().hex[:8]  # keys must be unique on a scheduler other clients share

    def submit(index: int, attempt: int):
        return client.submit(process_slide, jobs[index], *task, attempt, on_chunk, pure=False,
                             key=f"denuc-slide-{run}-{index}-{attempt}")

    attempt_of = {submit(index, 0): (index, 0) for index in todo}
    finished = as_completed(list(attempt_of))
    for future in finished:
        index, attempt = attempt_of.pop(future)
        if future.status == "finished":
            row = future.result()
        else:
            error = future.exception()
            if isinstance(error, KilledWorker) and attempt < retries:
                if not bar.disable:
                    bar.write(f"{jobs[index].path}: its worker died (attempt {attempt + 1} of {retries + 1}); "
                              "retrying from its saved chunks")
                again = submit(index, attempt + 1)
                attempt_of[again] = (index, attempt + 1)
                finished.add(again)
                continue
            died = isinstance(error, KilledWorker)
            message = (f"{attempt + 1} attempt(s), each ended by its worker's death (killed, or out of memory); "
                       "its saved chunks are kept for a later run" if died else f"{type(error).__name__}: {error}")
            row = {**_row(jobs[index], model, provenance, attempt + 1), "status": "failed",
                   "error": f"{jobs[index].path}: {message}"}
        future.release()
        finish(index, row)


def _portable(name: str) -> str:
    """A shipped model's name as it is; a weights file as an absolute path (workers may run elsewhere)."""
    from denuc.hub import shipped

    return name if shipped(name) is not None else os.path.abspath(name)


def _described(model: ModelSpec) -> dict:
    from denuc.hub import describe, resolve

    described = describe(resolve(model.name, kind=None if model.detector_only else "bundle"))
    return {k: described[k] for k in ("tag", "file", "sha256", "kind", "denuc_version")}


# --- the table ------------------------------------------------------------------------------------------------

_COLUMNS = {"slide": str, "name": str, "status": str, "attempts": int, "nuclei": int, "density_per_mm2": float,
            "tissue_mm2": float, "mpp": float, "mpp_source": str, "mpp_estimate": float, "mpp_confidence": float,
            "model": str, "model_tag": str, "seconds": float,
            "worker": str, "error": str, "warnings": str}


def table_columns(rows: list[dict]) -> dict[str, type]:
    """The table's columns and their types: ``_COLUMNS``, with ``nuclei_<class>`` after ``nuclei`` and
    ``density_<class>_per_mm2`` after ``density_per_mm2`` for each class the rows count."""
    classes = list(dict.fromkeys(key for row in rows for key in row if key.startswith("nuclei_")))
    columns = {}
    for name, kind in _COLUMNS.items():
        columns[name] = kind
        if name == "nuclei":
            columns.update(dict.fromkeys(classes, int))
        elif name == "density_per_mm2":
            columns.update({f"density_{c.removeprefix('nuclei_')}_per_mm2": float for c in classes})
    return columns


def write_table(out_dir: str | os.PathLike, rows: list[dict]) -> None:
    """``cohort.parquet`` and ``cohort.csv`` in ``out_dir``, each written atomically (missing values: null,
    an empty CSV cell)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = table_columns(rows)
    types = {str: pa.string(), int: pa.int64(), float: pa.float64()}
    table = pa.table({name: pa.array([row.get(name) for row in rows], types[kind]) for name, kind in columns.items()})
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{TABLE}.parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out_dir / f"{TABLE}.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(["" if row.get(name) is None else row[name] for name in columns] for row in rows)
