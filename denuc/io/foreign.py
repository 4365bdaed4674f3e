"""Nuclei found by other tools, read into ``Nuclei``: QuPath GeoJSON (StarDist in QuPath too), CellViT and CellViT++
``cells.json`` and their GeoJSON exports, HoVer-Net JSON, and denuc's own CSV.

``read_nuclei(path)`` tells the format from the file's content (a ``.csv`` is denuc's CSV); each nucleus becomes
a point at its centroid, with its outline when the file has one (``Nuclei.outlines``), its class name from the
tool's class names when the file has classes, and a score when the file has one. What each format holds, and the
pixel frame of its coordinates, as read in each tool's own writer:

- **QuPath GeoJSON** (qupath/qupath, ``qupath-core/.../io/PathObjectTypeAdapters.java``): a FeatureCollection or
  a bare list of features; ``Point``/``MultiPoint`` annotations, ``Polygon``/``MultiPolygon`` detections, cells
  whose ``geometry`` is the cell and whose ``nucleusGeometry`` (beside ``geometry``, not in ``properties``) the
  nucleus, which is the one read. Class: ``properties.classification`` name and colour. Read by
  ``denuc.io.geojson`` (QuPath measures from the image's corner: coordinates are shifted by half a pixel).
- **StarDist in QuPath** (qupath/qupath-extension-stardist, ``StarDist2D.java`` ``convertToObject``): polygon
  detections, or cells with ``nucleusGeometry`` when ``cellExpansion`` > 0, exported as QuPath GeoJSON; the
  measurement ``"Detection probability"`` (with ``includeProbability(true)``) is read as the score.
- **CellViT / CellViT++ ``cells.json``** (TIO-IKIM/CellViT ``cell_segmentation/inference/cell_detection.py``;
  TIO-IKIM/CellViT-Inference ``cellvit/inference/inference.py``, CellViT++'s inference package): an object with
  ``wsi_metadata``, ``type_map`` and a ``cells`` list, each cell with ``bbox`` ([[row, col], [row, col]]),
  ``centroid`` [x, y], ``contour`` [[x, y], ...], ``type`` and ``type_prob``. Centroids are image moments of the
  cell's mask and contours OpenCV's boundary pixels, so (0, 0) is the centre of the top-left pixel, as in denuc:
  read as they are. They are level-0 slide pixels: CellViT++ rescales them from the processed resolution to the
  slide's ``base_mpp`` (``_reallign_grid``), which becomes the pixel size when none is given. ``type_map`` is
  id -> name in CellViT++ and name -> id (with "Background": 0) in CellViT; both are read. (CellViT 1 adds the
  patch offset in level-0 pixels to patch-local coordinates: level-0 only when it processed level 0 itself.)
- **CellViT GeoJSON exports** (``cells.geojson``, ``cell_detection.geojson``; ``convert_geojson`` /
  ``_convert_json_geojson`` and ``template_geojson.py``): one annotation per class, a ``MultiPolygon`` of all its
  cells' contours or a ``MultiPoint`` of their centroids. Each polygon of an annotation's MultiPolygon is read as
  one nucleus (a MultiPolygon detection or cell stays one nucleus, as QuPath has it). CellViT writes its
  pixel-centre coordinates into the GeoJSON unchanged; read, like any GeoJSON, as QuPath reads them, they lie half
  a pixel up and left of ``cells.json``'s. Prefer ``cells.json``.
- **HoVer-Net JSON** (vqdang/hover_net ``infer/tile.py`` ``__save_json``, ``infer/wsi.py``;
  ``models/hovernet/post_proc.py``): ``{"mag": ..., "nuc": {"<id>": {"bbox", "centroid", "contour", "type_prob",
  "type"}}}``, ``centroid`` [x, y] (moments) and ``contour`` [[x, y], ...] (OpenCV) in the same pixel-centre
  frame as denuc: read as they are. Tile mode (``mag`` null) gives the image's pixels; WSI mode the pixels at
  magnification ``mag`` (40: level 0 of a 40x scan; a 20x scan's nuclei are then at twice its level-0
  coordinates). ``type`` 0 is HoVer-Net's "no label" and is read as unlabelled; other types are named by a
  ``type_info.json`` (``{"<id>": [name, [r, g, b]]}``, as in the repository's ``type_info.json``) when given, else
  "type <id>". ``type_prob`` (the share of the nucleus' pixels of its type) is read as the score.

The score of CellViT and HoVer-Net (``type_prob``) is read when every nucleus has one. Bad input raises
``InputError`` naming the file and, where it applies, the feature, cell or nucleus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from denuc.errors import InputError
from denuc.io.csv import nuclei_from_columns, read_csv
from denuc.io.geojson import SCORE, read_features
from denuc.nuclei import UNLABELLED, Nuclei, NucleusClass, default_colors

STARDIST_SCORE = "Detection probability"
"""The measurement StarDist in QuPath writes the detection probability to."""
CELLVIT_BACKGROUND = "background"
"""CellViT's name of type 0 in a name -> id ``type_map`` (any case): not a nucleus class."""
HOVERNET_NO_LABEL = 0
"""HoVer-Net's type of a nucleus without a class."""
FORMATS = ("a denuc CSV (.csv)", "a GeoJSON FeatureCollection or list of features (QuPath, StarDist, CellViT)",
           "a CellViT cells.json (an object with a 'cells' list)", "a HoVer-Net JSON (an object with a 'nuc' object)")


def read_nuclei(
    path: str | os.PathLike,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
    type_info: str | os.PathLike | None = None,
) -> Nuclei:
    """Nuclei in any of the formats of the module docstring, told apart by content.

    ``classes``, when given, is the taxonomy every label must belong to; ``image_size`` (width, height), when
    given, the image every centroid must lie in; ``type_info`` a HoVer-Net ``type_info.json`` naming its types.
    Raises InputError naming the file when it is none of these formats, or where it is malformed.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path, classes=classes, mpp=mpp, image_size=image_size)
    data = _load_json(path)
    if isinstance(data, dict) and isinstance(data.get("nuc"), dict):
        return read_hovernet(path, type_info, classes=classes, mpp=mpp, image_size=image_size, data=data)
    if type_info is not None:
        raise InputError(path, "a type_info file names HoVer-Net's types, and this is not a HoVer-Net JSON")
    if isinstance(data, dict) and isinstance(data.get("cells"), list):
        return read_cellvit(path, classes=classes, mpp=mpp, image_size=image_size, data=data)
    if isinstance(data, list) or (isinstance(data, dict) and data.get("type") in ("FeatureCollection", "Feature")):
        features = data if isinstance(data, list) else data.get("features") if data["type"] != "Feature" else [data]
        if not isinstance(features, list):
            raise InputError(path, "a FeatureCollection's features must be a list")
        features, numbers = _split_annotations(features)
        return read_features(path, features, classes=classes, mpp=mpp, image_size=image_size, numbers=numbers)
    raise InputError(path, "not a nucleus file of a known format; expected " + "; ".join(FORMATS))


def _load_json(path: Path) -> object:
    if path.suffix.lower() == ".snappy":
        raise InputError(path, "snappy-compressed (CellViT's --compression): decompress it first, e.g. with "
                               "python-snappy: snappy.decompress(data)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, not a nucleus file") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text file; expected " + "; ".join(FORMATS)) from None
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON ({error.msg}); expected " + "; ".join(FORMATS),
                         f"line {error.lineno} column {error.colno}") from None


# ---------------------------------------------------------------------------------------------------- GeoJSON


def _split_annotations(features: list) -> tuple[list, list[int]]:
    """The features as QuPath GeoJSON nuclei, and the number in the file of each: an annotation's MultiPolygon
    (CellViT's one per class) split into one Polygon feature per nucleus, StarDist's detection probability renamed
    to the score measurement."""
    out, numbers = [], []
    for number, feature in enumerate(features):
        if not isinstance(feature, dict):  # read_features says what is wrong with it
            out.append(feature)
            numbers.append(number)
            continue
        properties = feature.get("properties")
        if isinstance(properties, dict) and properties.get("measurements"):
            measurements = _stardist_score_renamed(properties["measurements"])
            if measurements is not properties["measurements"]:
                feature = {**feature, "properties": {**properties, "measurements": measurements}}
        geometry = feature.get("geometry")
        object_type = properties.get("objectType", "annotation") if isinstance(properties, dict) else "annotation"
        if (object_type == "annotation" and "nucleusGeometry" not in feature and isinstance(geometry, dict)
                and geometry.get("type") == "MultiPolygon" and isinstance(geometry.get("coordinates"), list)):
            parts = [{**feature, "geometry": {"type": "Polygon", "coordinates": rings}}
                     for rings in geometry["coordinates"]]
        else:
            parts = [feature]
        out += parts
        numbers += [number] * len(parts)
    return out, numbers


def _stardist_score_renamed(measurements: object) -> object:
    """QuPath measurements (an object, or QuPath < 0.4's list of {"name", "value"}) with StarDist's detection
    probability named as the score, unless there is one; else the same object."""
    if isinstance(measurements, dict) and STARDIST_SCORE in measurements and SCORE not in measurements:
        return {SCORE if k == STARDIST_SCORE else k: v for k, v in measurements.items()}
    if isinstance(measurements, list) and all(isinstance(m, dict) for m in measurements):
        names = {m.get("name") for m in measurements}
        if STARDIST_SCORE in names and SCORE not in names:
            return [{**m, "name": SCORE} if m.get("name") == STARDIST_SCORE else m for m in measurements]
    return measurements


# ----------------------------------------------------------------------------------------- CellViT, HoVer-Net


@dataclass
class Types:
    """How a tool's type ids become class names: ``names`` (UNLABELLED for a type that is no class) and their
    ``colors``; ``source`` names where they come from, and then a type it lacks is an error; without a source, a
    type it lacks is named "type <id>"."""

    names: dict[int, str]
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    source: str | None = None

    def name(self, kind: int) -> str:
        if kind in self.names:
            return self.names[kind]
        if self.source is not None:
            raise KeyError(f"type {kind} is not named in {self.source} (its types: {sorted(self.names)})")
        return f"type {kind}"

    def taxonomy(self, found: Iterable[int]) -> list[NucleusClass]:
        """The classes, in type order: all the source names, else those of the types ``found``."""
        kinds = sorted(self.names if self.source is not None else set(found))
        names = list(dict.fromkeys(n for n in map(self.name, kinds) if n != UNLABELLED))
        colors = {self.names[k]: c for k, c in self.colors.items() if k in self.names}
        palette = default_colors(len(names))
        return [NucleusClass(name, colors.get(name, palette[j])) for j, name in enumerate(names)]


def read_cellvit(
    path: str | os.PathLike,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
    data: Mapping | None = None,
) -> Nuclei:
    """Nuclei of a CellViT or CellViT++ ``cells.json`` (see the module docstring); ``data``: its parsed content,
    when the caller has it already. The pixel size is ``mpp``, else the file's ``wsi_metadata.base_mpp``."""
    path = Path(path)
    data = _load_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise InputError(path, "not a CellViT cells.json: expected an object with a 'cells' list")
    metadata = data.get("wsi_metadata")
    if mpp is None and isinstance(metadata, dict) and _is_number(metadata.get("base_mpp")):
        mpp = float(metadata["base_mpp"])
    type_map = data.get("type_map")
    if type_map is None:
        return _instances(path, data["cells"], lambda i: f"cell {i}", Types({}), classes, mpp, image_size)
    names = {k: UNLABELLED if name.lower() == CELLVIT_BACKGROUND else name
             for k, name in _cellvit_type_names(path, type_map).items()}
    types = Types(names, source="the file's type_map")
    return _instances(path, data["cells"], lambda i: f"cell {i}", types, classes, mpp, image_size)


def _cellvit_type_names(path: Path, type_map: object) -> dict[int, str]:
    """Type id -> class name from CellViT++'s id -> name or CellViT's name -> id ``type_map``."""
    if isinstance(type_map, dict):
        if all(isinstance(v, str) for v in type_map.values()):  # CellViT++: {"0": "Neoplastic", ...}
            try:
                return {int(k): v for k, v in type_map.items()}
            except ValueError:
                pass
        elif all(type(v) is int for v in type_map.values()):  # CellViT: {"Background": 0, "Neoplastic": 1, ...}
            return {v: k for k, v in type_map.items()}
    raise InputError(path, f"type_map must map type ids to class names (or names to ids), got {type_map!r}")


def read_hovernet(
    path: str | os.PathLike,
    type_info: str | os.PathLike | None = None,
    classes: Iterable[NucleusClass | str] | None = None,
    mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
    data: Mapping | None = None,
) -> Nuclei:
    """Nuclei of a HoVer-Net JSON (see the module docstring), types named by ``type_info`` (a type_info.json)
    when given, else "type <id>"; ``data``: the file's parsed content, when the caller has it already."""
    path = Path(path)
    data = _load_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("nuc"), dict):
        raise InputError(path, "not a HoVer-Net JSON: expected an object with a 'nuc' object")
    if type_info is None:
        types = Types({HOVERNET_NO_LABEL: UNLABELLED}, source=None)
    else:
        names, colors = read_type_info(type_info)
        types = Types({**names, HOVERNET_NO_LABEL: UNLABELLED}, colors, source=str(type_info))
    ids = list(data["nuc"])
    return _instances(path, list(data["nuc"].values()), lambda i: f"nucleus {ids[i]!r}", types, classes, mpp,
                      image_size)


def read_type_info(path: str | os.PathLike) -> tuple[dict[int, str], dict[int, tuple[int, int, int]]]:
    """Names and colours of HoVer-Net's types from a type_info.json: ``{"<id>": [name, [r, g, b]], ...}``."""
    data = _load_json(Path(path))
    if not isinstance(data, dict) or not data:
        raise InputError(path, 'a type_info.json must be an object {"<type id>": [name, [r, g, b]], ...}')
    names, colors = {}, {}
    for key, value in data.items():
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], list) and len(value[1]) == 3 and all(type(c) is int for c in value[1])):
            raise InputError(path, f"type {key!r}: expected [name, [r, g, b]], got {value!r}")
        try:
            type_id = int(key)
        except ValueError:
            raise InputError(path, f"type id {key!r} is not a whole number") from None
        names[type_id], colors[type_id] = value[0], (value[1][0], value[1][1], value[1][2])
    return names, colors


def _instances(path: Path, cells: list, locate: Callable[[int], str], types: Types,
               classes: Iterable[NucleusClass | str] | None, mpp: float | None,
               image_size: tuple[int, int] | None) -> Nuclei:
    """Nuclei of HoVer-Net's and CellViT's instance dictionaries: centroid, contour, type and type_prob."""
    xy, outlines, kinds, scores = [], [], [], []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict):
            raise InputError(path, f"expected an object with a centroid, got {cell!r}", locate(i))
        xy.append(_pair(path, cell.get("centroid"), "centroid", locate(i)))
        contour = cell.get("contour")
        outlines.append(None if contour is None else _contour(path, contour, locate(i)))
        kind = cell.get("type")
        if kind is not None and type(kind) is not int:
            raise InputError(path, f"type must be a whole number, got {kind!r}", locate(i))
        kinds.append(kind)
        scores.append(cell.get("type_prob"))
    labels = []
    for i, kind in enumerate(kinds):
        try:
            labels.append(UNLABELLED if kind is None else types.name(kind))
        except KeyError as error:
            raise InputError(path, error.args[0], locate(i)) from None
    have_scores = bool(scores) and all(_is_number(s) for s in scores)
    nuclei = nuclei_from_columns(
        path, np.asarray(xy, dtype=np.float64).reshape(-1, 2), labels, locate,
        scores=np.asarray(scores, dtype=np.float64) if have_scores else None,
        classes=types.taxonomy(k for k in kinds if k is not None) if classes is None else classes,
        mpp=mpp, image_size=image_size)
    return replace(nuclei, outlines=outlines)


def _pair(path: Path, value: object, what: str, where: str) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise InputError(path, f"{what} must be a list of two numbers [x, y], got {value!r}", where)
    return float(value[0]), float(value[1])


def _contour(path: Path, contour: object, where: str) -> np.ndarray:
    if not (isinstance(contour, list) and contour and all(isinstance(p, list) and len(p) == 2 for p in contour)):
        raise InputError(path, "contour must be a non-empty list of [x, y] points", where)
    try:
        outline = np.array(contour, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, "contour must be a list of [x, y] numbers", where) from None
    if len(outline) > 1 and (outline[0] == outline[-1]).all():  # denuc's outlines are not closed
        outline = outline[:-1]
    return outline


def _is_number(value: object) -> bool:
    return type(value) in (int, float)
