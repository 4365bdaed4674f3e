"""The shipped models by name, and what any denuc weights file says about itself.

One table (``MODELS``) names every model shipped in ``denuc/weights`` by a tag in timm's ``arch.tag`` style,
``<kind>/<backbone>.<how it was trained>`` (e.g. ``detector/shufflenet_v2_x1_0.e80_randstainna_ft12``), and by
short aliases. Every name a user gives goes through ``resolve``; ``load`` returns a ``Detector`` or a
``Pipeline`` as the file's metadata says; ``describe`` reports a file's tag, sha256, kind and provenance.

What ``default`` means: the default *detector* (``detector/shufflenet_v2_x1_0.e80_randstainna_ft12``), in
``denuc detect``, ``denuc predict --detector-only``, ``Detector.from_pretrained`` and ``load``. A ``Pipeline``
(detector + classifier) asked for ``default`` gets the default *bundle*, ``default-bundle``: ``denuc predict``
and ``Pipeline.from_pretrained()`` classify nuclei with the bundle's detector: since 0.5.0 the ``default``
detector's weights, on 384 px tiles (the classifier's context; ``resolve(name, kind="bundle")``). Everywhere a
detector runs alone, ``default`` is the same weights on 256 px tiles.

Importing this module loads neither torch nor the models, so the command line and lower layers can name and
describe models cheaply. ``python -m denuc.hub`` lists the shipped models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from denuc import __version__
from denuc.errors import InputError

if TYPE_CHECKING:
    from denuc.inference.detect import Detector
    from denuc.inference.pipeline import Pipeline

DETECTOR_FORMAT, BUNDLE_FORMAT, OUTLINE_FORMAT = "denuc-detector-1", "denuc-bundle-1", "denuc-outline-2"
"""The ``format`` metadata of a detector file (``Detector.save``), a bundle (``Pipeline.save``) and an outline head
(``denuc.train.outlines.save_outline_head``)."""

PROVENANCE_KEYS = ("tag", "training_data", "licence", "denuc_version")
"""Metadata every shipped file carries (JSON-encoded strings, like all metadata but ``format``)."""

_RESEARCH_ONLY = "research use only (trained on CRCHisto, whose licence is research use only; BRCAM2C is BSD-3)"
_DETECTOR_DATA = ("BRCAM2C train split (80 images) + CRCHisto train split (70 images, resampled to 0.5 um/px): "
                  "every nucleus centre, classified or not")
_BRCAM2C_CRCHISTO_COLOURS = {"mean": [65.9643, 24.4158, -19.4045], "std": [13.4813, 7.0908, 8.7997]}


@dataclass(frozen=True)
class ShippedModel:
    """One model in ``denuc/weights``: its tag, kind ("detector", "bundle" or "outline"), file and short aliases."""

    tag: str
    kind: str
    file: str
    aliases: tuple[str, ...]
    training_data: str
    licence: str
    summary: str
    # the centre of the training images' tissue colours in CIELAB (benchmarks/training_colours.py), what
    # ``predict --normalise-stain`` moves slides to (``denuc.colour.StainNormaliser``); None: not recorded
    training_colours: dict | None = None

    @property
    def path(self) -> Path:
        return Path(str(resources.files("denuc") / "weights" / self.file))


MODELS = (
    ShippedModel(
        "detector/shufflenet_v2_x1_0.e80_randstainna_ft12", "detector", "detector_default.safetensors", ("default",),
        _DETECTOR_DATA, _RESEARCH_ONLY,
        "ShuffleNetV2 1.0x point detector, 80 epochs then 12 fine-tuned with RandStainNA colour augmentation; "
        "256 px tiles (DETECTOR_CARD.md)", _BRCAM2C_CRCHISTO_COLOURS),
    ShippedModel(
        "detector/shufflenet_v2_x0_5.e20_randstainna_ft12", "detector", "detector_fast.safetensors", ("fast",),
        _DETECTOR_DATA, _RESEARCH_ONLY,
        "ShuffleNetV2 0.5x, 20 epochs then 12 with RandStainNA: about three quarters of default's time for "
        "1-2 points less F1", _BRCAM2C_CRCHISTO_COLOURS),
    ShippedModel(
        "detector/shufflenet_v2_x1_0.e20_randstainna", "detector", "detector_stain_robust.safetensors",
        ("stain-robust",), _DETECTOR_DATA, _RESEARCH_ONLY,
        "ShuffleNetV2 1.0x, 20 epochs with RandStainNA from the start: the most tolerant of another lab's colours, "
        "1-4 points less F1 on ours", _BRCAM2C_CRCHISTO_COLOURS),
    ShippedModel(
        "bundle/shufflenet_v2_x1_0.det_default_cls_e160_consep_mlp", "bundle", "bundle_default.safetensors",
        ("default-bundle",),
        "classifier: BRCAM2C train split (80 images: lymphocyte, tumour, stromal) + CRCHisto train split (70 images: "
        "epithelial, fibroblast, inflammatory, others) at 0.5 um/px, with the 80-epoch detector's false "
        "positives as 'not a nucleus'; the consep head (an MLP) on the frozen encoder: CoNSeP train split (crops "
        "of 21 of its 27 train images, 40x: other, inflammatory, epithelial, spindle); detector: the `default` "
        "detector's (BRCAM2C + CRCHisto train splits, every nucleus centre)",
        "non-commercial research use only (CRCHisto: research use only; CoNSeP: Warwick TIA's research terms; "
        "BRCAM2C is BSD-3)",
        "the `default` detector (384 px tiles) + a ShuffleNetV2 1.0x classifier started from the 80-epoch "
        "detector's backbone, 160 epochs; heads brcam2c and crchisto, and consep (an MLP, frozen encoder, 20 "
        "epochs); the detector chosen for other labs' colours (CLASSIFIER_CARD.md)", _BRCAM2C_CRCHISTO_COLOURS),
)

_FOUR_DATASETS_DATA = ("`default` fine-tuned on the train splits of BRCAM2C (80 images), CRCHisto (70), CoNSeP "
                       "(21 of its 27 train images, 40x, rebuilt whole from the crops of our copy) and MoNuSeg (6 "
                       "images, 40x), each resampled to 0.33 um/px: every nucleus centre")
_FOUR_DATASETS_LICENCE = ("non-commercial research use only (CRCHisto: research use only; CoNSeP: Warwick TIA's "
                          "research terms; MoNuSeg: CC BY-NC-SA 4.0; BRCAM2C is BSD-3)")
MODELS += (
    ShippedModel(
        "detector/shufflenet_v2_x1_0.default_ft10_four_rebuilt_o2o_mpp033", "detector", "detector_precise.safetensors",
        ("precise",), _FOUR_DATASETS_DATA, _FOUR_DATASETS_LICENCE,
        "`default` fine-tuned at 0.33 um/px on four datasets (10 epochs, one-to-one anchor matching, best by "
        "validation at 7): crowded and small nuclei (40x colon, lymphocyte clusters); 1.4x default's time on whole "
        "slides, 4x on small images (DETECTOR_CARD.md)"),
)

_OUTLINE_DATA = ("CoNSeP train split (crops of 21 of its 27 train images, 40x) + MoNuSeg train split (40x): every "
                 "nucleus outline, read at 0.5 um/px; the frozen detector inside is `default` (BRCAM2C + CRCHisto "
                 "train splits)")
_OUTLINE_LICENCE = ("non-commercial research use only (CoNSeP: Warwick TIA's research terms; MoNuSeg: CC BY-NC-SA "
                    "4.0, both as the datasets' cards give them, not verified here; the `default` detector inside: "
                    "CRCHisto, research use only)")
MODELS += (
    ShippedModel(
        "outline/star32_default_maps.consep_monuseg_e30", "outline", "outline_default.safetensors",
        ("default-outlines",), _OUTLINE_DATA, _OUTLINE_LICENCE,
        "star-convex outline head (32 rays) read at detected points from the `default` detector's own maps (one "
        "pass gives points and outlines); 30 epochs, best by validation star IoU at 18; predict --outlines "
        "(docs/outlines.md)"),
    ShippedModel(
        "outline/star32_precise_maps.consep_rebuilt_monuseg_e30", "outline", "outline_precise.safetensors",
        ("precise-outlines",),
        "CoNSeP train split (21 of its 27 train images, 40x, rebuilt whole from the crops of our copy) + MoNuSeg "
        "train split (40x): every nucleus outline, read at 0.33 um/px; the frozen detector inside is `precise` "
        "(" + _FOUR_DATASETS_DATA + ")",
        _FOUR_DATASETS_LICENCE,
        "star-convex outline head (32 rays) read at detected points from the `precise` detector's own maps, at 0.33 "
        "um/px; 30 epochs, best by validation star IoU at 25; what predict --outlines uses behind `precise` "
        "(docs/outlines.md)"),
)

_DEFAULT_OF_KIND = {"detector": "default", "bundle": "default-bundle", "outline": "default-outlines"}
"""What the name "default" means when a kind of model is asked for (see the module docstring)."""


def shipped(name: str, kind: str | None = None) -> ShippedModel | None:
    """The shipped model called ``name`` (tag or alias), else None. With ``kind``, "default" is that kind's
    default (``default-bundle`` for "bundle")."""
    if kind is not None and name == "default":
        name = _DEFAULT_OF_KIND[kind]
    return next((m for m in MODELS if name == m.tag or name in m.aliases), None)


def names() -> list[str]:
    """Every name ``resolve`` knows: tags and aliases."""
    return [name for m in MODELS for name in (*m.aliases, m.tag)]


def resolve(name_or_path: str | os.PathLike, kind: str | None = None) -> Path:
    """The weights file of a shipped model's tag or alias, else ``name_or_path`` as a file that must exist.

    ``kind`` ("detector" or "bundle") is what the caller wants when the name is "default" (see ``shipped``)."""
    model = shipped(str(name_or_path), kind)
    if model is not None:
        return model.path
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(name_or_path, f"no such model file or shipped model name (shipped: {', '.join(names())})")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (without loading its tensors, or torch); InputError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise InputError(path, f"not a readable safetensors file: {error}") from None


def kind_of(metadata: dict[str, str], path: str | os.PathLike) -> str:
    """ "bundle", "detector" or "outline", from a file's metadata; InputError naming ``path`` for anything else."""
    found = metadata.get("format")
    if found == BUNDLE_FORMAT:
        return "bundle"
    if found == OUTLINE_FORMAT:
        return "outline"
    if found == "denuc-outline-1":
        raise InputError(path, "an outline head of denuc 0.5 or earlier, which ran a stem of its own; today's heads "
                               "read their detector's maps: train one with `denuc train-outlines`")
    if found in (DETECTOR_FORMAT, None) and "denuc_detector" in metadata:
        return "detector"
    raise InputError(path, f"not a denuc detector or bundle (format {found!r}; those are {DETECTOR_FORMAT!r}, "
                           f"{BUNDLE_FORMAT!r})")


def stamp(metadata: dict[str, str], tag: str | None = None) -> dict[str, str]:
    """``metadata`` as a saved file's: this denuc's version, and ``tag`` (or none: a tag copied from the model a
    file was made from would name another model)."""
    metadata = {k: v for k, v in metadata.items() if k != "tag"} | {"denuc_version": json.dumps(__version__)}
    if tag is not None:
        metadata["tag"] = json.dumps(tag)
    return metadata


def describe(name_or_path: str | os.PathLike) -> dict:
    """What a model is: ``tag`` (None for a file without one), ``file``, ``sha256`` (of the file's bytes),
    ``kind``, ``denuc_version`` (that made it), ``training_data``, ``licence``, ``aliases``, ``summary``,
    ``training_colours`` (a file's metadata, else the shipped model's; None when not recorded) and, for
    a bundle, ``taxonomies`` (class names by head) and ``head_kinds`` ("linear" or "mlp" by head). For benchmark
    and slide records."""
    path = resolve(name_or_path)
    metadata = read_metadata(path)
    model = next((m for m in MODELS if m.path.resolve() == path.resolve()), None)
    text = {}
    for key in PROVENANCE_KEYS:
        try:
            text[key] = json.loads(metadata[key]) if key in metadata else getattr(model, key, None)
        except ValueError:
            raise InputError(path, f"metadata {key!r} is not JSON: {metadata[key]!r}") from None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    described = {**text, "file": str(path), "sha256": digest.hexdigest(), "kind": kind_of(metadata, path),
                 "aliases": list(model.aliases) if model else [], "summary": model.summary if model else None,
                 "training_colours": (json.loads(metadata["training_colours"]) if "training_colours" in metadata
                                      else model.training_colours if model else None)}
    if described["kind"] == "bundle" and "taxonomies" in metadata:
        described["taxonomies"] = {name: [c["name"] for c in classes]
                                   for name, classes in json.loads(metadata["taxonomies"]).items()}
        classifier = json.loads(metadata.get("denuc_classifier", "{}"))
        kinds, kind = classifier.get("taxonomy_heads", {}), classifier.get("head", "linear")
        described["head_kinds"] = {name: kinds.get(name, kind) for name in described["taxonomies"]}
    return described


def load(name_or_path: str | os.PathLike, device: str = "cpu", runtime: str = "torch",
         **kwargs) -> "Detector | Pipeline":
    """The model a name or file holds: a ``Detector`` for a detector file, a ``Pipeline`` (detector +
    classifier) for a bundle, as its metadata says. ``kwargs`` go to ``Pipeline.from_pretrained`` (e.g.
    ``taxonomy``)."""
    path = resolve(name_or_path)
    if kind_of(read_metadata(path), path) == "bundle":
        from denuc.inference.pipeline import Pipeline

        return Pipeline.from_pretrained(path, device=device, runtime=runtime, **kwargs)
    from denuc.inference.detect import Detector

    if kwargs:
        raise InputError(path, f"a detector file takes no {sorted(kwargs)} (those are a bundle's)")
    return Detector.from_pretrained(path, device=device, runtime=runtime)


def format_table() -> str:
    """The shipped models, one block each: tag, aliases, kind, summary, a bundle's heads, licence."""
    lines = []
    for model in MODELS:
        described = describe(model.tag)
        lines.append(f"{model.tag}  (alias: {', '.join(model.aliases)}; {model.kind}, {model.file}, "
                     f"denuc {described['denuc_version']})")
        lines.append(f"    {model.summary}")
        for head, classes in described.get("taxonomies", {}).items():
            lines.append(f"    head {head} ({described['head_kinds'][head]}): {', '.join(classes)}")
        lines.append(f"    licence: {model.licence}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table())
