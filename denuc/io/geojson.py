"""Nucleus points as GeoJSON, the format QuPath imports and exports objects in.

Reading accepts a FeatureCollection, a bare list of features (QuPath's default export) or a single Feature.
Each feature gives one nucleus per point: ``Point`` and ``MultiPoint`` geometries are taken as they are,
``Polygon`` and ``MultiPolygon`` are reduced to their area-weighted centroid (holes subtracted). For a QuPath
cell, the ``nucleusGeometry`` is used rather than the cell outline. The class is
``properties.classification`` (``{"name": ..., "color": [r, g, b]}``, QuPath's older ``colorRGB``, a
``names`` list of a derived class, or a bare string); the score and class probabilities are the measurements
named ``score`` and ``prob: <class>`` (a dict, as QuPath >= 0.4 writes, or the older list of
``{"name", "value"}``).

Writing gives a FeatureCollection with one detection per nucleus, which QuPath opens with File > Import objects
from file: a ``Polygon`` of its outline when the nuclei have outlines (``Nuclei.outlines``), else a ``Point``;
optional extra measurements (e.g. ``denuc.outlines.measure``'s) join score and probabilities. Reading keeps a
polygon's outer ring as the nucleus's outline (of a MultiPolygon, its largest polygon's; holes are not kept);
the nucleus's point is then the centroid, so a written detector point does not come back exactly.

Coordinates: QuPath puts the top-left *corner* of the image at (0, 0), so the centre of the top-left pixel is
(0.5, 0.5); denuc puts that centre at (0, 0). Reading subtracts 0.5 and writing adds it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from denuc.errors import InputError
from denuc.io.atomic import atomic_path
from denuc.io.csv import Color, Locate, check_writable, normalise_label, nuclei_from_columns
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass, default_colors

QUPATH_OFFSET = 0.5
"""QuPath coordinate minus denuc coordinate (QuPath measures from the image corner, denuc from a pixel centre)."""
SCORE = "score"
PROB_PREFIX = "prob: "
POINT_TEMPLATE = '{"type":"Point","coordinates":[%r,%r]}'
"""The %-template of a Point geometry, filled with x and y in QuPath coordinates."""


class _BadFeature(ValueError):
    """A problem with one feature; the reader adds the file and the feature number."""


def read_geojson(
    path: str | os.PathLike,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> Nuclei:
    """Read nucleus points from a GeoJSON file (see the module docstring for what is read).

    ``classes``, when given, is the taxonomy every label must belong to; ``image_size`` (width, height), when
    given, is the image every point must lie in. Raises InputError naming the file and feature (numbered
    from 0, in file order) of a bad one.
    """
    path = Path(path)
    return read_features(path, _load_features(path), classes, mpp, image_size)


def read_features(
    source: str | os.PathLike,
    features: list,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
    numbers: Sequence[int] | None = None,
) -> Nuclei:
    """``read_geojson`` of parsed GeoJSON ``features`` from the file ``source``; ``numbers``: the number of each
    feature in that file, which messages give (default: its position in ``features``)."""
    path = Path(source)
    xy, labels, feature_of_point, measurements, outlines = [], [], [], [], []
    colors: dict[str, Color | None] = {}
    degenerate = []
    for index, feature in zip(range(len(features)) if numbers is None else numbers, features):
        try:
            points, classification, values = _read_feature(feature)
            outline = _outline(feature)
            if _degenerate_outline(feature):
                degenerate.append(index)
            label = _class_name(classification)
            if colors.get(label) is None:  # the first colour given for a class is its colour
                colors[label] = _color(classification)
        except _BadFeature as error:
            raise InputError(path, str(error), f"feature {index}") from None
        for point in points:
            xy.append(point)
            labels.append(label)
            feature_of_point.append(index)
            measurements.append(values)
            outlines.append(outline)

    if degenerate:
        shown = ", ".join(map(str, degenerate[:5])) + (", ..." if len(degenerate) > 5 else "")
        warnings.warn(f"{path}: {len(degenerate)} polygon(s) with fewer than 3 distinct vertices or no area, placed "
                      f"at the mean of their vertices (features {shown})", stacklevel=2)

    def locate(i: int) -> str:
        return f"feature {feature_of_point[i]}"

    scores, probs, prob_names = _scores_and_probs(path, measurements, locate)
    nuclei = nuclei_from_columns(
        path,
        np.asarray(xy, dtype=np.float64).reshape(-1, 2) - QUPATH_OFFSET,
        labels,
        locate,
        scores=scores,
        probs=probs,
        prob_names=prob_names,
        classes=classes,
        colors={label: color for label, color in colors.items() if color is not None},
        mpp=mpp,
        image_size=image_size,
    )
    if any(outline is not None for outline in outlines):
        nuclei = replace(nuclei, outlines=[None if o is None else o - QUPATH_OFFSET for o in outlines])
    return nuclei


def _load_features(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file") from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON: {error.msg}", f"line {error.lineno} column {error.colno}") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
        return data["features"]
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    raise InputError(path, "expected a GeoJSON FeatureCollection, a Feature or a list of features")


def _read_feature(feature: object) -> tuple[list[tuple[float, float]], object, dict[str, float]]:
    """The points of one feature (QuPath coordinates), its raw classification and its measurements."""
    if type(feature) is not dict or feature.get("type", "Feature") != "Feature":
        raise _BadFeature("not a GeoJSON Feature object")
    properties = feature.get("properties") or {}
    if type(properties) is not dict:
        raise _BadFeature("properties must be an object")
    # A QuPath cell's geometry is the whole cell; its nucleus, when there is one, locates the nucleus better.
    geometry = feature.get("nucleusGeometry") or feature.get("geometry")
    return _points(geometry), properties.get("classification"), _measurements(properties.get("measurements"))


def _degenerate_outline(feature: dict) -> bool:
    """Whether a (valid) feature's polygon outline encloses no area: fewer than 3 distinct vertices, or all on
    a line. Its centre is then only the mean of its vertices, which a reader should be told."""
    geometry = feature.get("nucleusGeometry") or feature.get("geometry")
    if geometry.get("type") not in ("Polygon", "MultiPolygon"):
        return False
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    outer = [np.array([_position(p) for p in rings[0]]) for rings in polygons]
    return all(len(np.unique(ring, axis=0)) < 3 or _ring_moments(ring - ring[0])[0] == 0 for ring in outer)


def _outline(feature: dict) -> np.ndarray | None:
    """The outline (QuPath coordinates, not closed) of a valid feature: a Polygon's outer ring, a MultiPolygon's
    largest one; None for a Point or MultiPoint."""
    geometry = feature.get("nucleusGeometry") or feature.get("geometry")
    if geometry["type"] not in ("Polygon", "MultiPolygon"):
        return None
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    rings = [np.array([position[:2] for position in rings[0]], dtype=np.float64) for rings in polygons]
    ring = rings[0] if len(rings) == 1 else max(rings, key=lambda r: _ring_moments(r - r[0])[0])
    return ring[:-1] if len(ring) > 1 and (ring[0] == ring[-1]).all() else ring


def _points(geometry: object) -> list[tuple[float, float]]:
    if not isinstance(geometry, dict):
        raise _BadFeature("has no geometry")
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if not isinstance(coordinates, list):
        raise _BadFeature(f"{kind} geometry has no coordinates list")
    if kind == "Point":
        return [_position(coordinates)]
    if kind == "MultiPoint":
        return [_position(p) for p in coordinates]
    if kind == "Polygon":
        return [polygon_centroid([coordinates])]
    if kind == "MultiPolygon":
        return [polygon_centroid(coordinates)]
    raise _BadFeature(f"unsupported geometry type {kind!r}; expected Point, MultiPoint, Polygon or MultiPolygon")


def _position(position: object) -> tuple[float, float]:
    if type(position) is not list or len(position) < 2 or not (_is_number(position[0]) and _is_number(position[1])):
        raise _BadFeature(f"a position must be a list of two numbers [x, y], got {position!r}")
    return float(position[0]), float(position[1])


def _is_number(value: object) -> bool:
    # type(), not isinstance(): True and False are ints to isinstance, and this runs millions of times.
    return type(value) in (float, int)


def polygon_centroid(polygons: list) -> tuple[float, float]:
    """Area-weighted centroid of GeoJSON polygons (each a list of rings: the outer ring, then its holes).

    A shape of zero area (all vertices on a line) falls back to the mean of its outer vertices.
    """
    if not polygons:
        raise _BadFeature("a polygon geometry needs at least one polygon")
    parsed = [[_ring(ring) for ring in _rings(rings)] for rings in polygons]
    # Work relative to a vertex: whole-slide coordinates are ~1e5 px and the shoelace terms would lose digits.
    origin = parsed[0][0][0]
    area, moment = 0.0, np.zeros(2)
    for rings in parsed:
        for k, ring in enumerate(rings):
            ring_area, ring_moment = _ring_moments(ring - origin)
            sign = 1.0 if k == 0 else -1.0  # rings after the first are holes, whatever their orientation
            area += sign * ring_area
            moment += sign * ring_moment
    if area <= 0:
        centre = np.concatenate([rings[0] for rings in parsed]).mean(axis=0)
    else:
        centre = origin + moment / area
    return float(centre[0]), float(centre[1])


def _rings(rings: object) -> list:
    if not isinstance(rings, list) or not rings:
        raise _BadFeature("a polygon must be a non-empty list of rings")
    return rings


def _ring(ring: object) -> np.ndarray:
    if not isinstance(ring, list) or not ring:
        raise _BadFeature("a polygon ring must be a non-empty list of positions")
    return np.array([_position(p) for p in ring])


def _ring_moments(ring: np.ndarray) -> tuple[float, np.ndarray]:
    """Unsigned area of a ring and area times centroid (shoelace formula; closed or open rings alike)."""
    x, y = ring[:, 0], ring[:, 1]
    x_next, y_next = np.roll(x, -1), np.roll(y, -1)
    cross = x * y_next - x_next * y
    signed_area = cross.sum() / 2
    if signed_area == 0:
        return 0.0, np.zeros(2)
    centroid = np.array([((x + x_next) * cross).sum(), ((y + y_next) * cross).sum()]) / (6 * signed_area)
    return abs(signed_area), abs(signed_area) * centroid


def _class_name(classification: object) -> str:
    """The class name in QuPath's classification, in any of the forms QuPath has written."""
    if classification is None:
        return UNLABELLED
    if type(classification) is str:
        return normalise_label(classification)
    if type(classification) is not dict:
        raise _BadFeature(f"classification must be an object or a string, got {classification!r}")
    name = classification.get("name")
    if type(name) is str:
        return normalise_label(name)
    names = classification.get("names")  # a derived class such as ["Tumor", "Positive"]
    if type(names) is list and names:
        return normalise_label(": ".join(map(str, names)))
    raise _BadFeature(f"classification has no name: {classification!r}")


def _color(classification: object) -> Color | None:
    if type(classification) is not dict:
        return None
    color = classification.get("color")
    if type(color) is list and len(color) >= 3 and all(_is_number(c) for c in color[:3]):
        return int(color[0]), int(color[1]), int(color[2])
    packed = classification.get("colorRGB")  # QuPath < 0.4: a packed (A)RGB integer
    if _is_number(packed):
        packed = int(packed)
        return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255
    return None


def _measurements(value: object) -> dict[str, float]:
    """The score and class probabilities among a feature's measurements; other measurements are ignored."""
    if value is None:
        return {}
    if type(value) is list:  # QuPath < 0.4 wrote [{"name": ..., "value": ...}, ...]
        if not all(type(m) is dict and "name" in m and "value" in m for m in value):
            raise _BadFeature("measurements list entries must be objects with a name and a value")
        value = {m["name"]: m["value"] for m in value}
    if type(value) is not dict:
        raise _BadFeature("measurements must be an object of name: number")
    wanted = {}
    for name, v in value.items():
        if name == SCORE or name.startswith(PROB_PREFIX):
            if v is None:  # QuPath's NaN, spelt as JSON null by some writers: caught as non-finite later
                v = math.nan
            elif not _is_number(v):
                raise _BadFeature(f"measurement {name!r} must be a number, got {v!r}")
            wanted[name] = v
    return wanted


def _scores_and_probs(
    path: Path, measurements: list[dict[str, float]], locate: Locate
) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Scores and probabilities, which every feature must have alike: a missing one would be a silent gap."""
    first = measurements[0] if measurements else {}
    names = list(first)
    for i, values in enumerate(measurements):
        if values.keys() != first.keys():
            raise InputError(
                path, f"measurements {sorted(values)} differ from the first feature's {sorted(first)}", locate(i)
            )
    columns = np.array([[values[name] for name in names] for values in measurements], dtype=np.float64)
    columns = columns.reshape(len(measurements), len(names))
    prob_names = [name for name in names if name != SCORE]
    scores = columns[:, names.index(SCORE)] if SCORE in names else None
    probs = columns[:, [names.index(name) for name in prob_names]] if prob_names else None
    return scores, probs, [name[len(PROB_PREFIX):] for name in prob_names]


def write_geojson(path: str | os.PathLike, nuclei: Nuclei, measurements: Mapping[str, np.ndarray] | None = None
                  ) -> None:
    """Write ``nuclei`` as a QuPath-ready GeoJSON FeatureCollection of detections, atomically.

    Each feature has a UUID ``id``, ``properties.objectType`` "detection", a ``classification`` with the class
    name and colour (left out for unlabelled nuclei) and ``measurements`` ``score`` and ``prob: <class>``, then
    those of ``measurements`` (name -> one number per nucleus, e.g. ``denuc.outlines.measure``'s). Its geometry is
    the nucleus's outline when ``nuclei.outlines`` has one (``geometry_json``), else its Point.
    """
    check_writable(path, nuclei)
    check_outlines(path, nuclei)
    extra = measurement_texts(nuclei, measurements)
    classification = {name: _classification_json(name, color) for name, color in _label_colors(nuclei).items()}
    classification[UNLABELLED] = ""
    measurement_names = ([SCORE] if nuclei.scores is not None else []) + (
        [PROB_PREFIX + name for name in nuclei.class_names] if nuclei.probs is not None else []
    )
    measurement_json = ",".join([f"{json.dumps(name).replace('%', '%%')}:%r" for name in measurement_names]
                                + [f"{json.dumps(name).replace('%', '%%')}:%s" for name in extra])
    xy = nuclei.xy + QUPATH_OFFSET
    if nuclei.outlines is None:
        geometry, geometry_columns = POINT_TEMPLATE, [xy[:, 0].tolist(), xy[:, 1].tolist()]
    else:
        geometry, geometry_columns = "%s", [list(map(geometry_json, xy.tolist(), nuclei.outlines))]
    # One %-template per feature: much faster than json.dump of a million dicts, and one feature per line.
    # A random UUID per file, its last 12 hex digits replaced by the feature index: unique ids, cheaply.
    template = (
        '%s{"type":"Feature","id":"' + str(uuid.uuid4())[:24] + '%012x",'
        '"geometry":' + geometry + ','
        '"properties":{"objectType":"detection"%s'
        + (',"measurements":{' + measurement_json + "}" if measurement_json else "")
        + "}}"
    )
    columns: list[list] = [
        range(len(nuclei)),
        *geometry_columns,
        [classification[label] for label in nuclei.labels.tolist()],
    ]
    if nuclei.scores is not None:
        columns.append(nuclei.scores.tolist())
    if nuclei.probs is not None:
        columns += nuclei.probs.T.tolist()
    columns += extra.values()
    separators = [",\n"] * len(nuclei)
    if separators:
        separators[0] = "\n"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[')
        f.writelines(template % values for values in zip(separators, *columns))
        f.write("\n]}\n")


def geometry_json(point: Sequence[float], outline: np.ndarray | None) -> str:
    """A nucleus's GeoJSON geometry, ``point`` in QuPath coordinates and ``outline`` in denuc's: the outline as a
    Polygon, its ring closed (the first vertex repeated at the end, as GeoJSON requires) and in the outline's own
    order (counter-clockwise, GeoJSON's advice for outer rings, is not imposed: QuPath and the readers here take
    either); its point as a Point when it has no outline or one of fewer than 3 vertices (no valid ring)."""
    if outline is None or len(outline) < 3:
        return POINT_TEMPLATE % (point[0], point[1])
    ring = (outline + QUPATH_OFFSET).tolist()
    ring.append(ring[0])
    return '{"type":"Polygon","coordinates":[[' + ",".join("[%r,%r]" % (x, y) for x, y in ring) + "]]}"


def check_outlines(path: str | os.PathLike, nuclei: Nuclei) -> None:
    """Raise InputError naming ``path`` and the nucleus whose outline has a vertex JSON cannot hold (NaN, inf)."""
    for i, outline in enumerate(nuclei.outlines if nuclei.outlines is not None else ()):
        if outline is not None and not np.isfinite(outline).all():
            raise InputError(path, f"the outline of nucleus {i} has a non-finite vertex")


def measurement_texts(nuclei: Nuclei, measurements: Mapping[str, np.ndarray] | None) -> dict[str, list[str]]:
    """``measurements`` (name -> one number per nucleus) as JSON numbers, NaN and infinities (which JSON lacks)
    as null; QuPath shows those as missing. Raises ValueError for a column of the wrong length, or a name that
    would read back as the score or a class probability."""
    texts = {}
    for name, values in (measurements or {}).items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(nuclei),):
            raise ValueError(f"measurement {name!r} has shape {values.shape}, not one value for each of "
                             f"{len(nuclei)} nuclei")
        if name == SCORE or name.startswith(PROB_PREFIX):
            raise ValueError(f"measurement name {name!r} is reserved for the detection score and class probabilities")
        texts[name] = [repr(v) if math.isfinite(v) else "null" for v in values.tolist()]
    return texts


def _label_colors(nuclei: Nuclei) -> dict[str, Color]:
    """Colour of every class name in use: the taxonomy's, or a default for a label it lacks."""
    colors = {c.name: c.color for c in nuclei.classes}
    extra = [label for label in dict.fromkeys(nuclei.labels.tolist()) if label not in colors and label != UNLABELLED]
    colors.update(zip(extra, default_colors(len(colors) + len(extra))[len(colors):]))
    return colors


def _classification_json(name: str, color: Color) -> str:
    r, g, b = (int(v) for v in color)
    # Spliced into the %-template as an argument, so it needs no % escaping.
    return ',"classification":' + json.dumps({"name": name, "color": [r, g, b]}, separators=(",", ":"))
