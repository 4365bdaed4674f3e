"""Streamed nucleus tables of a whole slide: CSV, Parquet and QuPath GeoJSON with the same content.

Rows arrive in blocks (``NucleusTableWriter.write``) and go straight to disk, so memory is bounded by the
block, not the slide. The files get their names only when ``close`` is reached without error (see
``denuc.io.atomic``). Columns, in this order:

- ``id``: 0, 1, 2, ... in file order; the row of the embeddings array of the same nucleus.
- ``x``, ``y``: level-0 pixels, denuc's convention (centre of the top-left pixel at (0, 0); see denuc.nuclei).
- ``x_um``, ``y_um``: micrometres from the top-left *corner* of the slide: ``(x + 0.5) * mpp``.
- ``label``: class name, or "unlabelled" (detection only); the name denuc's CSV reader expects.
- ``score``: detection score; then ``prob_<class>`` per class when a classifier ran;
- then one column per measurement the writer was given (``measurements``, e.g. ``denuc.outlines.MEASUREMENTS``;
  NaN where a nucleus has none).

The GeoJSON holds the same nuclei in the layout of ``denuc.io.geojson.write_geojson`` (QuPath coordinates,
half a pixel more than denuc's; measurements ``score``, ``prob: <class>`` and the extra ones), so ``read_points`` reads
either file back to the same nuclei. The feature ``id`` is a UUID whose last 12 hex digits are the row id. A
nucleus with an outline (``Nuclei.outlines``: nuclei another tool segmented) is a closed Polygon instead of a
Point, as QuPath draws a detection; read back, its point is then the polygon's centroid.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from denuc.io.atomic import atomic_path, naming_full_disk
from denuc.io.csv import PROB_PREFIX, _quote
from denuc.io.geojson import PROB_PREFIX as GEOJSON_PROB_PREFIX
from denuc.io.geojson import QUPATH_OFFSET, SCORE, check_outlines, geometry_json, measurement_texts
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass


def column_names(classes: list[NucleusClass], measurements: Sequence[str] = ()) -> list[str]:
    """The columns of the CSV and Parquet tables for a taxonomy (no prob_ columns when it is empty) and the names
    of extra measurements."""
    return ["id", "x", "y", "x_um", "y_um", "label", "score"] + [PROB_PREFIX + c.name for c in classes] + list(
        measurements)


class NucleusTableWriter:
    """Writes blocks of nuclei (level-0 pixels, with scores) to ``<stem>.csv``, ``.parquet`` and ``.geojson``.

    Use as a context manager; the three files appear together when the block exits without error.
    ``measurements``: the names of extra per-nucleus numbers every block brings (``write``'s ``measurements``).
    """

    def __init__(self, stem: Path, classes: list[NucleusClass], mpp: float, measurements: Sequence[str] = ()
                 ) -> None:
        self.paths = {ext: stem.with_name(stem.name + ext) for ext in (".csv", ".parquet", ".geojson")}
        self.classes, self.mpp, self.measurements = list(classes), mpp, list(measurements)
        self.count = 0
        names = column_names(self.classes, self.measurements)
        if len(set(names)) != len(names):
            raise ValueError(f"measurement names {self.measurements} repeat a column of {column_names(self.classes)}")
        self.schema = pa.schema(
            [("id", pa.int64())] + [(n, pa.float64()) for n in names[1:5]] + [("label", pa.string())]
            + [(n, pa.float64()) for n in names[6:]]
        )
        self._stack = contextlib.ExitStack()
        self._csv_row = "%d,%r,%r,%r,%r,%s,%r" + ",%r" * (len(self.classes) + len(self.measurements)) + "\n"
        colors = {c.name: tuple(int(v) for v in c.color) for c in self.classes}
        self._classification = {
            name: ',"classification":' + json.dumps({"name": name, "color": list(color)}, separators=(",", ":"))
            for name, color in colors.items()
        }
        self._classification[UNLABELLED] = ""  # QuPath's "Unclassified", as write_geojson writes it
        measurements = ",".join(
            [f"{json.dumps(name).replace('%', '%%')}:%r"
             for name in [SCORE] + [GEOJSON_PROB_PREFIX + c.name for c in self.classes]]
            + [f"{json.dumps(name).replace('%', '%%')}:%s" for name in self.measurements]  # JSON texts: NaN as null
        )
        self._feature = (
            '%s{"type":"Feature","id":"' + str(uuid.uuid4())[:24] + '%012x",'
            '"geometry":{"type":"Point","coordinates":[%r,%r]},'
            '"properties":{"objectType":"detection"%s,"measurements":{' + measurements + "}}}"
        )
        self._outlined_feature = self._feature.replace('{"type":"Point","coordinates":[%r,%r]}', "%s")

    def __enter__(self) -> "NucleusTableWriter":
        tmp = {ext: self._stack.enter_context(atomic_path(path)) for ext, path in self.paths.items()}
        self._csv = self._stack.enter_context(open(tmp[".csv"], "w", newline="", encoding="utf-8"))
        self._csv.write(",".join(_quote(n) for n in column_names(self.classes, self.measurements)) + "\n")
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

    def write(self, nuclei: Nuclei, measurements: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Append nuclei (level-0 pixels, scores set; probs set when there are classes) and their ``measurements``
        (name -> one number per nucleus, the names the writer was given); return their ids."""
        measurements = measurements or {}
        if sorted(measurements) != sorted(self.measurements):
            raise ValueError(f"measurements {sorted(measurements)} differ from the table's {sorted(self.measurements)}")
        n = len(nuclei)
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        if n == 0:
            return ids
        check_outlines(self.paths[".geojson"], nuclei)
        texts = measurement_texts(nuclei, {name: measurements[name] for name in self.measurements})
        xy = nuclei.xy
        um = (xy + 0.5) * self.mpp
        labels = nuclei.labels.tolist()
        probs = nuclei.probs.T.tolist() if self.classes else []
        extra = [np.asarray(measurements[name], dtype=np.float64).tolist() for name in self.measurements]
        columns = [ids.tolist(), xy[:, 0].tolist(), xy[:, 1].tolist(), um[:, 0].tolist(), um[:, 1].tolist()]
        quoted = {label: _quote(label) for label in set(labels)}
        with naming_full_disk(self.paths[".csv"]):
            self._csv.writelines(self._csv_row % row for row in zip(
                *columns, [quoted[label] for label in labels], nuclei.scores.tolist(), *probs, *extra))
        arrays = [pa.array(ids)] + [pa.array(c, pa.float64()) for c in columns[1:]] + [pa.array(labels, pa.string())]
        arrays += [pa.array(nuclei.scores, pa.float64())] + [pa.array(p, pa.float64()) for p in probs + extra]
        with naming_full_disk(self.paths[".parquet"]):
            self._parquet.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        qupath = xy + QUPATH_OFFSET
        separators = [",\n"] * n
        if self.count == 0:
            separators[0] = "\n"
        if nuclei.outlines is None:
            template, geometry = self._feature, [qupath[:, 0].tolist(), qupath[:, 1].tolist()]
        else:
            template, geometry = self._outlined_feature, [list(map(geometry_json, qupath.tolist(), nuclei.outlines))]
        with naming_full_disk(self.paths[".geojson"]):
            self._geojson.writelines(template % row for row in zip(
                separators, ids.tolist(), *geometry, [self._classification[label] for label in labels],
                nuclei.scores.tolist(), *probs, *texts.values()))
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
