"""Streamed nucleus tables of a whole slide: CSV, Parquet and QuPath GeoJSON with the same content.

Rows arrive in blocks (``NucleusTableWriter.write``) and go straight to disk, so memory is bounded by the
block, not the slide. The files get their names only when ``close`` is reached without error (see
``denuc.io.atomic``). Columns, in this order:

- ``id``: 0, 1, 2, ... in file order; the row of the embeddings array of the same nucleus.
- ``x``, ``y``: level-0 pixels, denuc's convention (centre of the top-left pixel at (0, 0); see denuc.nuclei).
- ``x_um``, ``y_um``: micrometres from the top-left *corner* of the slide: ``(x + 0.5) * mpp``.
- ``label``: class name, or "unlabelled" (detection only); the name denuc's CSV reader expects.
- ``score``: detection score; then ``prob_<class>`` per class when a classifier ran.

The GeoJSON holds the same nuclei in the layout of ``denuc.io.geojson.write_geojson`` (QuPath coordinates,
half a pixel more than denuc's; measurements ``score`` and ``prob: <class>``), so ``read_points`` reads
either file back to the same nuclei. The feature ``id`` is a UUID whose last 12 hex digits are the row id.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from denuc.io.atomic import atomic_path, naming_full_disk
from denuc.io.csv import PROB_PREFIX, _quote
from denuc.io.geojson import PROB_PREFIX as GEOJSON_PROB_PREFIX
from denuc.io.geojson import QUPATH_OFFSET, SCORE
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass


def column_names(classes: list[NucleusClass]) -> list[str]:
    """The columns of the CSV and Parquet tables for a taxonomy (no prob_ columns when it is empty)."""
    return ["id", "x", "y", "x_um", "y_um", "label", "score"] + [PROB_PREFIX + c.name for c in classes]


class NucleusTableWriter:
    """Writes blocks of nuclei (level-0 pixels, with scores) to ``<stem>.csv``, ``.parquet`` and ``.geojson``.

    Use as a context manager; the three files appear together when the block exits without error.
    """

    def __init__(self, stem: Path, classes: list[NucleusClass], mpp: float) -> None:
        self.paths = {ext: stem.with_name(stem.name + ext) for ext in (".csv", ".parquet", ".geojson")}
        self.classes, self.mpp = list(classes), mpp
        self.count = 0
        names = column_names(self.classes)
        self.schema = pa.schema(
            [("id", pa.int64())] + [(n, pa.float64()) for n in names[1:5]] + [("label", pa.string())]
            + [(n, pa.float64()) for n in names[6:]]
        )
        self._stack = contextlib.ExitStack()
        self._csv_row = "%d,%r,%r,%r,%r,%s,%r" + ",%r" * len(self.classes) + "\n"
        colors = {c.name: tuple(int(v) for v in c.color) for c in self.classes}
        self._classification = {
            name: ',"classification":' + json.dumps({"name": name, "color": list(color)}, separators=(",", ":"))
            for name, color in colors.items()
        }
        self._classification[UNLABELLED] = ""  # QuPath's "Unclassified", as write_geojson writes it
        measurements = ",".join(
            f"{json.dumps(name).replace('%', '%%')}:%r"
            for name in [SCORE] + [GEOJSON_PROB_PREFIX + c.name for c in self.classes]
        )
        self._feature = (
            '%s{"type":"Feature","id":"' + str(uuid.uuid4())[:24] + '%012x",'
            '"geometry":{"type":"Point","coordinates":[%r,%r]},'
            '"properties":{"objectType":"detection"%s,"measurements":{' + measurements + "}}}"
        )

    def __enter__(self) -> "NucleusTableWriter":
        tmp = {ext: self._stack.enter_context(atomic_path(path)) for ext, path in self.paths.items()}
        self._csv = self._stack.enter_context(open(tmp[".csv"], "w", newline="", encoding="utf-8"))
        self._csv.write(",".join(_quote(n) for n in column_names(self.classes)) + "\n")
        self._parquet = self._stack.enter_context(pq.ParquetWriter(tmp[".parquet"], self.schema))
        self._geojson = self._stack.enter_context(open(tmp[".geojson"], "w", encoding="utf-8"))
        self._geojson.write('{"type":"FeatureCollection","features":[')
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:  # each file finished and closed here, so that a full disk names the one it hit
                with naming_full_disk(self.paths[".geojson"]):
                    self._geojson.write("\n]}\n")
                for ext, file in zip(self.paths, (self._csv, self._parquet, self._geojson)):
                    with naming_full_disk(self.paths[ext]):
                        file.close()
        except BaseException as error:
            self._stack.__exit__(type(error), error, error.__traceback__)
            raise
        self._stack.__exit__(exc_type, exc, tb)

    def write(self, nuclei: Nuclei) -> np.ndarray:
        """Append nuclei (level-0 pixels, scores set; probs set when there are classes); return their ids."""
        n = len(nuclei)
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        if n == 0:
            return ids
        xy = nuclei.xy
        um = (xy + 0.5) * self.mpp
        labels = nuclei.labels.tolist()
        probs = nuclei.probs.T.tolist() if self.classes else []
        columns = [ids.tolist(), xy[:, 0].tolist(), xy[:, 1].tolist(), um[:, 0].tolist(), um[:, 1].tolist()]
        quoted = {label: _quote(label) for label in set(labels)}
        with naming_full_disk(self.paths[".csv"]):
            self._csv.writelines(self._csv_row % row for row in zip(
                *columns, [quoted[label] for label in labels], nuclei.scores.tolist(), *probs))
        arrays = [pa.array(ids)] + [pa.array(c, pa.float64()) for c in columns[1:]] + [pa.array(labels, pa.string())]
        arrays += [pa.array(nuclei.scores, pa.float64())] + [pa.array(p, pa.float64()) for p in probs]
        with naming_full_disk(self.paths[".parquet"]):
            self._parquet.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        qupath = xy + QUPATH_OFFSET
        separators = [",\n"] * n
        if self.count == 0:
            separators[0] = "\n"
        with naming_full_disk(self.paths[".geojson"]):
            self._geojson.writelines(self._feature % row for row in zip(
                separators, ids.tolist(), qupath[:, 0].tolist(), qupath[:, 1].tolist(),
                [self._classification[label] for label in labels], nuclei.scores.tolist(), *probs))
        self.count += n
        return ids


class EmbeddingWriter:
    """Per-nucleus embeddings as one float16 ``.npy`` array (n, d): row i belongs to the nucleus with id i.

    The number of rows must be known up front (the .npy header holds the shape); blocks of rows arrive in id order
    and are appended to the file, so the array never sits in memory whole. (Not a memory map: a full disk would
    end the process with SIGBUS instead of an error naming the file.)
    """

    def __init__(self, path: Path, count: int, dim: int) -> None:
        self.path, self.shape = path, (count, dim)
        self.rows = 0

    def __enter__(self) -> "EmbeddingWriter":
        with contextlib.ExitStack() as stack:
            self._file = stack.enter_context(open(stack.enter_context(atomic_path(self.path)), "wb"))
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(self._file, header)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)
            return
        with self._stack:  # the file gets its name only when it holds every row its header announces
            if self.rows != self.shape[0]:
                raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} announced")

    def write(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        if len(ids):
            if ids[0] != self.rows or embeddings.shape != (len(ids), self.shape[1]):
                raise ValueError(f"{self.path}: expected rows from id {self.rows} of {self.shape[1]} values, got "
                                 f"{embeddings.shape} from id {ids[0]}")
            self._file.write(np.ascontiguousarray(embeddings, dtype=np.float16).tobytes())
            self.rows += len(ids)
