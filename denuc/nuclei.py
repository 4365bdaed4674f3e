"""The one in-memory model of nucleus points that every reader, writer, model and scorer shares.

Coordinate convention (used everywhere in denuc): ``x`` is the column and ``y`` the row, in pixels of the
image as displayed (an EXIF orientation is applied on reading; see ``denuc.io.images.read_image``),
with the centre of the top-left pixel at (0, 0). An image of width W therefore spans
x in [-0.5, W - 0.5]. Resampling an image by a factor ``s`` maps x to ``(x + 0.5) * s - 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from denuc.errors import InputError

UNLABELLED = "unlabelled"
"""Label of a nucleus whose class is unknown: it counts for detection, never for a class."""

NOT_A_NUCLEUS = "not a nucleus"
"""Class a classifier uses to reject false detections; never present in ground truth."""


@dataclass(frozen=True)
class NucleusClass:
    """A class of the taxonomy: its name and its display colour (RGB, 0-255)."""

    name: str
    color: tuple[int, int, int] = (255, 0, 0)


@dataclass
class Nuclei:
    """Nucleus points of one image.

    Attributes:
        xy: (n, 2) float64 array of (x, y) pixel coordinates (see the module docstring).
        labels: (n,) array of class names; ``UNLABELLED`` where the class is unknown.
        scores: optional (n,) detection scores in [0, 1].
        probs: optional (n, len(classes)) class probabilities, columns in the order of ``classes``.
        classes: the taxonomy (names and colours). Labels must be one of these names or ``UNLABELLED``.
        mpp: pixel size in micrometres per pixel, or None when unknown.
        image_size: (width, height) of the image in pixels, or None when unknown.
        embeddings: optional (n, d) float16 feature vectors the classifier saw at each point.
        outlines: optional (n,) object array of nucleus outlines: each a (k, 2) float64 array of (x, y) polygon
            vertices in the same pixel frame as ``xy`` (not closed: the last vertex is not a copy of the first),
            or None for a nucleus without one.
    """

    xy: np.ndarray
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    probs: np.ndarray | None = None
    classes: list[NucleusClass] = field(default_factory=list)
    mpp: float | None = None
    image_size: tuple[int, int] | None = None
    embeddings: np.ndarray | None = None
    outlines: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        n = len(self.xy)
        if self.labels is None:
            self.labels = np.full(n, UNLABELLED, dtype=object)
        else:
            self.labels = np.asarray(self.labels, dtype=object).reshape(-1)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if self.probs is not None:
            self.probs = _rows(np.asarray(self.probs, dtype=np.float64), n)
        if self.embeddings is not None:
            self.embeddings = _rows(np.asarray(self.embeddings), n)
        if self.outlines is not None:
            self.outlines = _outlines(self.outlines)
        for name, arr in (("labels", self.labels), ("scores", self.scores), ("probs", self.probs),
                          ("embeddings", self.embeddings), ("outlines", self.outlines)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"Nuclei: {name} has {len(arr)} entries for {n} points")

    def __len__(self) -> int:
        return len(self.xy)

    def __repr__(self) -> str:
        # a summary, not the arrays: a slide holds millions of nuclei
        parts = [f"{len(self)} nuclei"]
        if self.classes:
            names, counts = np.unique(self.labels.astype(str), return_counts=True)
            parts.append("classes {" + ", ".join(f"{n}: {c}" for n, c in zip(names.tolist(), counts.tolist())) + "}")
        if self.scores is not None and len(self):
            parts.append(f"scores {self.scores.min():.2f}-{self.scores.max():.2f}")
        parts += [f"mpp={self.mpp}", f"image_size={self.image_size}"]
        if self.embeddings is not None:
            parts.append(f"embeddings {self.embeddings.shape[1]}-d")
        if self.outlines is not None:
            parts.append("outlines")
        return f"Nuclei({', '.join(parts)})"

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def subset(self, index: np.ndarray | Sequence[int]) -> "Nuclei":
        """The nuclei selected by a boolean mask or an index array (metadata kept)."""
        index = np.asarray(index)
        return replace(
            self,
            xy=self.xy[index],
            labels=self.labels[index],
            scores=None if self.scores is None else self.scores[index],
            probs=None if self.probs is None else self.probs[index],
            embeddings=None if self.embeddings is None else self.embeddings[index],
            outlines=None if self.outlines is None else self.outlines[index],
        )

    def scaled(self, factor: float) -> "Nuclei":
        """The same nuclei in an image resampled by ``factor`` (pixel size divided by ``factor``)."""
        size = None
        if self.image_size is not None:
            size = (int(round(self.image_size[0] * factor)), int(round(self.image_size[1] * factor)))
        return replace(
            self,
            xy=(self.xy + 0.5) * factor - 0.5,
            outlines=None if self.outlines is None else _outlines(
                [None if o is None else (o + 0.5) * factor - 0.5 for o in self.outlines]),
            mpp=None if self.mpp is None else self.mpp / factor,
            image_size=size,
        )

    def validate(self, source: str = "<nuclei>") -> "Nuclei":
        """Raise InputError naming ``source`` and the first bad point; return self when all is well."""
        bad = ~np.isfinite(self.xy).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(source, f"point {i} has a non-finite coordinate {tuple(self.xy[i])}")
        if self.image_size is not None and len(self):
            w, h = self.image_size
            out = (
                (self.xy[:, 0] < -0.5) | (self.xy[:, 0] > w - 0.5) | (self.xy[:, 1] < -0.5) | (self.xy[:, 1] > h - 0.5)
            )
            if out.any():
                i = int(np.argmax(out))
                raise InputError(
                    source, f"point {i} at {tuple(self.xy[i])} lies outside the {w}x{h} image"
                )
        if self.classes:
            known = set(self.class_names) | {UNLABELLED}
            unknown = sorted({str(v) for v in self.labels} - known)
            if unknown:
                raise InputError(
                    source, f"unknown class name(s) {unknown}; known classes: {sorted(known)}"
                )
        if self.scores is not None and not np.isfinite(self.scores).all():
            raise InputError(source, "scores contain NaN or infinite values")
        if self.mpp is not None and not (np.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(source, f"pixel size must be a positive number of um/px, got {self.mpp}")
        return self


def _rows(array: np.ndarray, n: int) -> np.ndarray:
    """``array`` as n rows; with no points a 2-D (0, k) array keeps its k (reshape(0, -1) cannot infer it)."""
    if n == 0 and array.ndim == 2:
        return array
    return array.reshape(n, -1)


def _outlines(outlines: Sequence[np.ndarray | None] | np.ndarray) -> np.ndarray:
    """``outlines`` as an (n,) object array of (k, 2) float64 vertex arrays or None."""
    out = np.empty(len(outlines), dtype=object)
    for i, o in enumerate(outlines):
        out[i] = None if o is None else np.asarray(o, dtype=np.float64).reshape(-1, 2)
    return out


def concat(parts: Sequence[Nuclei], template: Nuclei | None = None) -> Nuclei:
    """One Nuclei holding the points of ``parts`` in order; metadata from ``template`` (or the first part)."""
    template = template if template is not None else (parts[0] if parts else Nuclei(xy=np.zeros((0, 2))))
    if not parts:
        return template.subset(np.zeros(len(template), dtype=bool))

    def join(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    return replace(template, xy=np.concatenate([p.xy for p in parts]), labels=join("labels"), scores=join("scores"),
                   probs=join("probs"), embeddings=join("embeddings"), outlines=join("outlines"))


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours for ``n`` classes (a fixed, colour-blind-friendly palette, then repeats)."""
    palette = [
        (0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167),
        (230, 159, 0), (86, 180, 233), (240, 228, 66), (0, 0, 0),
    ]
    return [palette[i % len(palette)] for i in range(n)]
