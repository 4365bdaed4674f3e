"""Nucleus points as CSV: a header row, then one nucleus per row.

Columns, found by their header name in any order: ``x`` and ``y`` (required; denuc's pixel-centre convention,
see ``denuc.nuclei``), ``label`` (class name; empty or ``unlabelled`` for an unknown class), ``score`` and one
``prob_<class>`` column per class. Other columns are ignored. The writer writes ``x,y,label``, then ``score``
when there are scores, then the ``prob_<class>`` columns in the order of the classes.

This module also holds ``nuclei_from_columns``: the checks every point reader of denuc shares (finite
coordinates inside the image, known classes, finite scores), which name the file and the line or feature of
the first bad point.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from denuc.errors import InputError
from denuc.io.atomic import atomic_path
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass, default_colors

PROB_PREFIX = "prob_"
FIXED_COLUMNS = ("x", "y", "label", "score")
Color = tuple[int, int, int]
Locate = Callable[[int], str]
"""Where point i came from in its file, for error messages: "line 12", "feature 3"."""


def normalise_label(raw: object) -> str:
    """The class name a raw label stands for: missing, empty or "unlabelled" (any case) mean UNLABELLED."""
    name = "" if raw is None else str(raw).strip()
    return UNLABELLED if name.lower() in ("", UNLABELLED) else name


def as_classes(classes: Iterable[NucleusClass | str]) -> list[NucleusClass]:
    """A taxonomy from NucleusClass objects or bare names (bare names get the default colours)."""
    classes = list(classes)
    palette = default_colors(len(classes))
    return [c if isinstance(c, NucleusClass) else NucleusClass(str(c), palette[i]) for i, c in enumerate(classes)]


def nuclei_from_columns(
    source: str | os.PathLike,
    xy: np.ndarray,
    labels: Sequence[str],
    locate: Locate,
    *,
    scores: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    prob_names: Sequence[str] = (),
    classes: Iterable[NucleusClass | str] | None = None,
    colors: Mapping[str, Color] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> Nuclei:
    """Check the points a reader parsed from ``source`` and assemble them into Nuclei.

    ``labels`` are already normalised (see ``normalise_label``); ``probs`` has one column per name in
    ``prob_names``. With ``classes`` given, every label and probability column must be one of them; without,
    the taxonomy is the probability columns or else the labels in order of appearance, coloured from
    ``colors`` where it names them. Raises InputError naming ``source`` and ``locate(i)`` of the first bad point.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels, dtype=object).reshape(-1)

    def first_bad(mask: np.ndarray, problem: Callable[[int], str]) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise InputError(source, problem(i), where=locate(i))

    first_bad(~np.isfinite(xy).all(axis=1), lambda i: f"coordinate {_pair(xy[i])} is not a finite number")
    if image_size is not None:
        w, h = image_size
        outside = (xy[:, 0] < -0.5) | (xy[:, 0] > w - 0.5) | (xy[:, 1] < -0.5) | (xy[:, 1] > h - 0.5)
        first_bad(outside, lambda i: f"point {_pair(xy[i])} lies outside the {w}x{h} image "
                                     f"(x must be in [-0.5, {w - 0.5}], y in [-0.5, {h - 0.5}])")
    if scores is not None:
        first_bad(~np.isfinite(scores), lambda i: f"score {scores[i]} is not a finite number")
    if probs is not None:
        first_bad(~np.isfinite(probs).all(axis=1), lambda i: "a class probability is not a finite number")

    taxonomy = _taxonomy(source, labels, prob_names, classes, colors or {})
    known = {c.name for c in taxonomy} | {UNLABELLED}
    first_bad(
        np.fromiter((label not in known for label in labels), dtype=bool, count=len(labels)),
        lambda i: f"unknown class {labels[i]!r}; known classes: {sorted(known)}",
    )
    if probs is not None:
        probs = probs[:, [list(prob_names).index(c.name) for c in taxonomy]]
    nuclei = Nuclei(xy, labels, scores, probs, taxonomy, mpp, image_size)
    return nuclei.validate(str(source))


def _pair(point: np.ndarray) -> str:
    # Full precision: a point just past the image edge must not print as the edge itself.
    return f"({float(point[0])!r}, {float(point[1])!r})"


def _taxonomy(
    source: str | os.PathLike,
    labels: np.ndarray,
    prob_names: Sequence[str],
    classes: Iterable[NucleusClass | str] | None,
    colors: Mapping[str, Color],
) -> list[NucleusClass]:
    if classes is not None:
        taxonomy = as_classes(classes)
        names = [c.name for c in taxonomy]
        if prob_names and sorted(prob_names) != sorted(names):
            raise InputError(source, f"the class probabilities are for {list(prob_names)}, not the classes {names}")
        return taxonomy
    # Probabilities fix the taxonomy (their columns are its classes); otherwise the labels found make it.
    names = list(prob_names) or [name for name in dict.fromkeys(labels.tolist()) if name != UNLABELLED]
    palette = default_colors(len(names))
    return [NucleusClass(name, tuple(colors.get(name, palette[i]))) for i, name in enumerate(names)]


def read_csv(
    path: str | os.PathLike,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> Nuclei:
    """Read nucleus points from a CSV file (see the module docstring for the columns).

    ``classes``, when given, is the taxonomy every label must belong to; ``image_size`` (width, height), when
    given, is the image every point must lie in. Raises InputError naming the file and line of a bad row.
    """
    path = Path(path)
    header, header_line, rows, lines = _read_rows(path)
    column = _header_columns(path, header, header_line)
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if (lengths != len(header)).any():
        i = int(np.argmax(lengths != len(header)))
        raise InputError(path, f"expected {len(header)} fields as in the header, got {lengths[i]}", f"line {lines[i]}")

    def numbers(name: str) -> np.ndarray:
        return _numbers(path, [row[column[name]] for row in rows], lines, name)

    prob_names = [name[len(PROB_PREFIX):] for name in column if name.startswith(PROB_PREFIX)]
    return nuclei_from_columns(
        path,
        np.column_stack([numbers("x"), numbers("y")]),
        _labels([row[column["label"]] for row in rows] if "label" in column else [""] * len(rows)),
        lambda i: f"line {lines[i]}",
        scores=numbers("score") if "score" in column else None,
        probs=np.column_stack([numbers(PROB_PREFIX + name) for name in prob_names]) if prob_names else None,
        prob_names=prob_names,
        classes=classes,
        mpp=mpp,
        image_size=image_size,
    )


def _read_rows(path: Path) -> tuple[list[str], int, list[list[str]], list[int]]:
    """The header, its line number, the non-blank data rows and their line numbers."""
    rows, lines = [], []
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)  # strict: a stray quote is an error, not data
            try:
                for row in reader:
                    if row:
                        rows.append(row)
                        lines.append(reader.line_num)
            except csv.Error as error:
                raise InputError(path, f"malformed CSV: {error}", f"line {reader.line_num}") from None
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file") from None
    if not rows:
        raise InputError(path, "empty file: expected a header row naming at least the columns x and y")
    return rows[0], lines[0], rows[1:], lines[1:]


def _header_columns(path: Path, header: list[str], line: int) -> dict[str, int]:
    """Column index by name."""
    names = [_column_name(raw) for raw in header]
    if "x" not in names or "y" not in names:
        raise InputError(
            path, f"missing header row: the first row must name the columns, at least x and y; got {header}",
            f"line {line}",
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(path, f"duplicate column names {duplicates}", f"line {line}")
    return {name: i for i, name in enumerate(names)}


def _column_name(raw: str) -> str:
    """Fixed column names and the prob_ prefix are case-insensitive; class names keep their case."""
    name = raw.strip()
    if name.lower().startswith(PROB_PREFIX):
        return PROB_PREFIX + name[len(PROB_PREFIX):]
    return name.lower() if name.lower() in FIXED_COLUMNS else name


def _numbers(path: Path, values: list[str], lines: list[int], name: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.float64)
    except ValueError:
        # Only on failure: find the first bad value, with the same conversion, to name its line.
        for value, line in zip(values, lines):
            try:
                np.float64(value)
            except ValueError:
                raise InputError(path, f"column {name}: {value!r} is not a number", f"line {line}") from None
        raise


def _labels(raw: list[str]) -> list[str]:
    # Normalise each distinct label once: files have millions of rows but a handful of classes.
    names = {value: normalise_label(value) for value in set(raw)}
    return [names[value] for value in raw]


def check_writable(path: str | os.PathLike, nuclei: Nuclei) -> None:
    """Raise InputError unless ``nuclei`` can be written and read back: finite, probabilities named by classes."""
    nuclei.validate(str(path))
    if nuclei.probs is not None:
        if nuclei.probs.shape[1] != len(nuclei.classes):
            raise InputError(
                path, f"{nuclei.probs.shape[1]} probability columns for {len(nuclei.classes)} classes"
            )
        if not np.isfinite(nuclei.probs).all():
            raise InputError(path, "class probabilities contain NaN or infinite values")


def write_csv(path: str | os.PathLike, nuclei: Nuclei) -> None:
    """Write ``nuclei`` as CSV (x, y, label, then score and prob_<class> when present), atomically."""
    check_writable(path, nuclei)
    header = ["x", "y", "label"]
    row = "%r,%r,%s"  # %r of a Python float is the shortest text that reads back to the same float
    columns: list[list] = [nuclei.xy[:, 0].tolist(), nuclei.xy[:, 1].tolist(), _quoted_labels(nuclei.labels)]
    if nuclei.scores is not None:
        header.append("score")
        row += ",%r"
        columns.append(nuclei.scores.tolist())
    if nuclei.probs is not None:
        header += [PROB_PREFIX + name for name in nuclei.class_names]
        row += ",%r" * len(nuclei.classes)
        columns += nuclei.probs.T.tolist()
    row += "\n"
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(map(_quote, header)) + "\n")
        f.writelines(row % values for values in zip(*columns))


def _quoted_labels(labels: np.ndarray) -> list[str]:
    quoted = {label: _quote(str(label)) for label in set(labels.tolist())}
    return [quoted[label] for label in labels.tolist()]


def _quote(text: str) -> str:
    """CSV-quote a field when it holds a separator, a quote or a line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
