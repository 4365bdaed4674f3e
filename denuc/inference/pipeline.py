"""The full model users run: a detector, optionally followed by a classifier of the detected nuclei.

``Pipeline`` is what ``denuc predict`` and the whole-slide engine use. It works on tiles at the model's
working pixel size (``predict_tiles``) so that slide readers can stream tiles to it, and on whole images of
any pixel size (``predict``). With no classifier every nucleus is "unlabelled" (detection only).

A model *bundle* is one safetensors file: the detector's tensors under ``detector.``, the classifier's under
``classifier.`` (see ``denuc.inference.classify``), and both configs plus the taxonomies in its metadata. A bare
detector file (``Detector.save``) loads as a detection-only model. Shipped models are named in ``denuc.hub``; a
``Pipeline``'s "default" is the default bundle ("default-bundle").
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.torch import save_file

from denuc import hub
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.detect import BUNDLE_DETECTOR, Detector, choose_runtime, read_tensors
from denuc.inference.tiling import predict_image
from denuc.io.atomic import atomic_path
from denuc.io.images import resample_tiles, scale_to
from denuc.nuclei import Nuclei, NucleusClass

_CLASSIFIER = "classifier."


class Pipeline:
    """Detector + optional classifier, tiled as the detector is. A classifier working at another pixel size than
    the detector (e.g. a finer detector with a bundle's classifier: ``with_detector``) gets each tile resampled to
    its own pixel size."""

    def __init__(self, detector: Detector, classifier: Classifier | None = None) -> None:
        self.detector = detector
        self.classifier = None if classifier is None else classifier.eval().to(detector.device)
        # drop the detections the classifier calls "not a nucleus" (an inference setting, not saved in bundles;
        # off: keep them, labelled with their most probable class, for images unlike the training data, where the
        # rejection costs more recall: CLASSIFIER_CARD.md)
        self.reject = True

    @property
    def mpp(self) -> float:
        return self.detector.config.mpp

    @property
    def classes(self) -> list[NucleusClass]:
        return [] if self.classifier is None else list(self.classifier.classes)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike = "default-bundle", device: str = "cpu",
                        taxonomy: str | None = None, runtime: str = "torch") -> "Pipeline":
        """A shipped model name (``denuc.hub``) or a model file; detector-only files (a bare detector) are
        accepted too and give a detection-only pipeline.

        "default" here means the default bundle ("default-bundle": the ``default`` detector's weights on 384 px
        tiles, and its classifier); for the default detector alone, ``Pipeline(Detector.from_pretrained("default"))``.
        ``taxonomy`` picks the classifier head of a bundle with several (default: the first saved);
        ``runtime`` is where the networks run: "torch", or "onnx" (CPU) for the detector and a convolutional
        classifier encoder (see ``denuc.inference.runtime``), or "auto": ONNX Runtime on a CPU, else PyTorch.
        """
        runtime = choose_runtime(runtime, device)
        path = hub.resolve(path_or_name, kind="bundle")
        metadata = hub.read_metadata(path)
        if hub.kind_of(metadata, path) != "bundle":
            if taxonomy is not None:
                raise InputError(path, f"a detector-only model has no taxonomy {taxonomy!r}")
            return cls(Detector.from_pretrained(path, device=device, runtime=runtime))
        state = read_tensors(path)
        detector = Detector.from_state({k[len(BUNDLE_DETECTOR):]: v for k, v in state.items()
                                        if k.startswith(BUNDLE_DETECTOR)}, metadata, path, device, runtime)
        classifier = Classifier.from_state({k[len(_CLASSIFIER):]: v for k, v in state.items()
                                            if k.startswith(_CLASSIFIER)}, metadata, path)
        if taxonomy is not None:
            classifier.use_taxonomy(taxonomy)
        if runtime == "onnx" and classifier.encoder.patch_size is None:
            from denuc.inference.runtime import OnnxEncoder  # imported only when asked for: onnx loads slowly

            classifier.encoder_runtime = OnnxEncoder(classifier.encoder)
        try:
            return cls(detector, classifier)
        except ValueError as error:
            raise InputError(path, str(error)) from None

    def with_detector(self, detector: Detector) -> "Pipeline":
        """This pipeline's classifier after another detector (e.g. ``precise`` with the default bundle). Its tiles
        are enlarged so that, resampled to the classifier's pixel size, they give the classifier as much context
        as this pipeline's own tiles do (the size it was validated with). Returns a new pipeline."""
        own = self.detector.config
        side = own.tile_size * own.mpp / detector.config.mpp
        overlap = own.tile_overlap * own.mpp / detector.config.mpp
        detector.with_settings(tile_size=int(np.ceil(side / 32) * 32), tile_overlap=int(np.ceil(overlap / 32) * 32))
        return Pipeline(detector, self.classifier)

    def with_test_time_views(self, views: int) -> "Pipeline":
        """Test-time augmentation (1, 2, 4 or 8 views of each tile): the detector fuses the points of all views,
        the classifier averages their class probabilities. 8 measured +2.2 points of validation mean class F1
        end to end for about 8x the time (DETECTOR_CARD.md, CLASSIFIER_CARD.md). Returns self."""
        self.detector.with_settings(test_time_views=views)
        if self.classifier is not None:
            self.classifier.test_time_views = views
        return self

    def save(self, path: str | os.PathLike, half: bool = False, extra_metadata: dict | None = None,
             tag: str | None = None) -> None:
        """Write the bundle (a classifier is required; a detector alone is saved by ``Detector.save``).

        ``half`` stores floating-point tensors as float16 (half the size; they are cast back on loading). The
        metadata holds both configs, the taxonomies, ``extra_metadata`` as JSON, this denuc's version and ``tag``.
        """
        if self.classifier is None:
            raise ValueError("a bundle needs a classifier; save a detector-only model with Detector.save")
        tensors = {BUNDLE_DETECTOR + k: v for k, v in self.detector.model.state_dict().items()}
        tensors |= {_CLASSIFIER + k: v for k, v in self.classifier.state_tensors().items()}
        tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
                   for k, v in tensors.items()}
        metadata = {"format": hub.BUNDLE_FORMAT, "denuc_detector": self.detector.config.to_json(),
                    **self.classifier.metadata()}
        metadata.update({k: json.dumps(v) for k, v in (extra_metadata or {}).items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=hub.stamp(metadata, tag))

    def predict_tiles(self, tiles: np.ndarray, embeddings: bool = False, scan_mpp: float | None = None
                      ) -> list[Nuclei]:
        """Nuclei of each RGB uint8 tile of a (B, H, W, 3) batch at ``self.mpp``, in tile pixels, cut from an image
        scanned at ``scan_mpp`` um/px (it sets the detector's score threshold; None: unknown).

        H and W must be multiples of 32. Point NMS is applied within each tile; ownership between overlapping
        tiles is the caller's business (see ``denuc.inference.tiling.iter_tiles``). With a classifier, detections
        it calls "not a nucleus" are dropped (unless ``self.reject`` is off); the others get the most probable class
        and ``probs``, the class probabilities given that the point is a nucleus (renormalised without "not a
        nucleus").
        """
        found = self.detector.detect_tiles(tiles, scan_mpp)
        if self.classifier is None:
            return found
        results = []
        for nuclei, (probs, features) in zip(found, self.classify_tiles(tiles, [n.xy for n in found])):
            labels, class_probs, rejected = self.name_classes(probs)
            rejected &= self.reject
            kept = nuclei.subset(~rejected)
            kept.probs = class_probs[~rejected]
            kept.labels = labels[~rejected]
            kept.classes = self.classes
            if embeddings:
                kept.embeddings = features[~rejected].astype(np.float16)
            results.append(kept)
        return results

    def classify_tiles(self, tiles: np.ndarray, points: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The classifier's (probabilities, features) at ``points`` (tile pixels) of tiles at ``self.mpp``; tiles
        are resampled to the classifier's pixel size first when it differs (padded with white to multiples of 32,
        the encoders' largest stride)."""
        factor = scale_to(self.mpp, self.classifier.config.mpp)
        if factor == 1.0:
            return self.classifier.classify_tiles(tiles, points)
        work, fxy = resample_tiles(tiles, factor, 32)
        return self.classifier.classify_tiles(work, [(p + 0.5) * fxy - 0.5 for p in points])

    def name_classes(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """From the classifier's (n, classes + 1) probabilities (the last column "not a nucleus"): each point's most
        probable class name, its class probabilities given that it is a nucleus (renormalised without "not a
        nucleus"), and whether the classifier calls it "not a nucleus" (more probable than every class), which
        ``predict_tiles`` drops and ``denuc classify`` (nuclei another tool found) may keep."""
        classes = self.classes
        class_probs = probs[:, :len(classes)]
        class_probs = class_probs / np.maximum(class_probs.sum(1, keepdims=True), 1e-12)
        labels = np.array([classes[i].name for i in class_probs.argmax(1)], dtype=object)
        return labels, class_probs, probs.argmax(1) == len(classes)

    def predict(self, image: np.ndarray | str | os.PathLike, mpp: float | None = None, batch_size: int = 8,
                embeddings: bool = False) -> Nuclei:
        """Nuclei of a whole RGB image (array or file) whose pixel size is ``mpp`` um/px, in its own pixels."""
        return predict_image(image, mpp, self.detector.config,
                             lambda tiles: self.predict_tiles(tiles, embeddings, scan_mpp=mpp), batch_size)

