"""The ONNX Runtime detector and classifier encoder give PyTorch's outputs, within float32 rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from denuc.config import DetectorConfig
from denuc.inference.detect import Detector, choose_runtime, make_detector
from denuc.models.detector import PointDetector

# Stated tolerance: ONNX Runtime folds batch norms into the convolutions and reorders float32 sums, so outputs
# differ from PyTorch's by rounding only: probabilities by at most 1e-4, point positions by at most 1e-3 px.
SCORE_ATOL, POINT_ATOL = 1e-4, 1e-3


def random_detector(head_stride: int, separable: bool = False, seed: int = 0) -> PointDetector:
    torch.manual_seed(seed)
    model = PointDetector(DetectorConfig(head_stride=head_stride, head_separable=separable,
                                         score_threshold=0.5)).eval()
    # random init leaves the offset head at zero, BN statistics at identity and scores near 0.5: perturb them
    # so the test covers non-trivial offsets, scores and folded batch norms
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        model.head.offsets.weight.normal_(0, 0.05)
        model.head.logits.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module", params=[(8, False), (4, False), (8, True)],
                ids=["stride8", "stride4", "stride8-separable"])
def onnx(request) -> Detector:
    # one export per head for the module: it takes seconds
    return make_detector(random_detector(*request.param), runtime="onnx")


def reference_for(onnx: Detector) -> Detector:
    return Detector(random_detector(onnx.config.head_stride, onnx.config.head_separable))


@pytest.mark.parametrize("shape", [(2, 256, 256), (1, 96, 160)])
def test_onnx_matches_torch(onnx: Detector, shape: tuple[int, int, int]) -> None:
    tiles = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = reference_for(onnx)
    scores, points = (t.numpy() for t in reference.forward(tiles))
    onnx_scores, onnx_points = (t.numpy() for t in onnx.forward(tiles))
    assert onnx_scores.shape == scores.shape and onnx_points.shape == points.shape
    np.testing.assert_allclose(onnx_scores, scores, atol=SCORE_ATOL, rtol=0)
    np.testing.assert_allclose(onnx_points, points, atol=POINT_ATOL, rtol=0)
    assert np.ptp(scores) > 0.01 and np.abs(points - np.round(points)).max() > 0.01  # a non-trivial check


def test_onnx_detections_match_torch(onnx: Detector) -> None:
    tiles = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    reference = reference_for(onnx)
    scores = np.sort(reference.forward(tiles)[0].numpy().ravel())
    # a threshold in a gap wider than the tolerance near the median, so no point may fall either side of it;
    # NMS off: with random weights many neighbours' scores differ by less than the tolerance, and the NMS
    # code is shared anyway
    gaps = np.flatnonzero(np.diff(scores) > 4 * SCORE_ATOL)
    k = gaps[np.argmin(np.abs(gaps - len(scores) // 2))]
    settings = dict(score_threshold=float(scores[k] + scores[k + 1]) / 2, nms_radius_um=0.0)
    onnx = onnx.with_settings(**settings)
    for expected, found in zip(reference.with_settings(**settings).detect_tiles(tiles), onnx.detect_tiles(tiles)):
        assert len(found) == len(expected) > 0
        np.testing.assert_allclose(found.xy, expected.xy, atol=POINT_ATOL, rtol=0)
        np.testing.assert_allclose(found.scores, expected.scores, atol=SCORE_ATOL, rtol=0)


def test_onnx_detector_runs_the_graph_it_is_given() -> None:
    import io

    from denuc.inference.runtime import OnnxBackend, export_onnx

    other = random_detector(8, seed=1)
    buffer = io.BytesIO()
    export_onnx(other, buffer)
    model = random_detector(8, seed=0)
    detector = Detector(model, backend=OnnxBackend(model, graph=buffer.getvalue()))
    assert detector.runtime == "onnx"
    tiles = np.random.default_rng(2).integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    scores = detector.forward(tiles)[0].numpy()
    np.testing.assert_allclose(scores, Detector(other).forward(tiles)[0].numpy(), atol=SCORE_ATOL, rtol=0)
    assert np.abs(scores - Detector(random_detector(8, seed=0)).forward(tiles)[0].numpy()).max() > 0.01


def test_runtime_module_does_not_import_the_detector() -> None:
    """The detector holds its backend (composition): ``runtime`` needs nothing from ``detect``, so no cycle."""
    import ast
    import inspect

    import denuc.inference.runtime as onnx_runtime

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(onnx_runtime)))
                if isinstance(node, ast.ImportFrom)}
    assert "denuc.inference.detect" not in imported and "denuc.inference.pipeline" not in imported


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="runtime"):
        make_detector(random_detector(8), runtime="tensorrt")


def test_auto_runtime_is_onnx_on_a_cpu_and_torch_elsewhere() -> None:
    assert choose_runtime("auto", "cpu") == "onnx" and choose_runtime("auto", torch.device("cpu")) == "onnx"
    assert choose_runtime("auto", "cuda") == choose_runtime("auto", "mps") == "torch"
    assert choose_runtime("torch", "cpu") == "torch" and choose_runtime("onnx", "cpu") == "onnx"
    assert make_detector(random_detector(8), runtime="auto").runtime == "onnx"


def test_predict_cli_with_onnx_runtime_gives_the_torch_nuclei(tmp_path) -> None:
    """`denuc predict` (ONNX Runtime on a CPU by default) with the shipped bundle: PyTorch's classified nuclei."""
    from denuc.cli import main
    from denuc.io import read_points
    from denuc.metrics.evaluate import evaluate

    found = {}
    for runtime, option in (("torch", ["--runtime", "torch"]), ("onnx", [])):
        assert main(["predict", "--sample", "--quiet", *option, "--out", str(tmp_path / runtime)]) == 0
        found[runtime] = read_points(tmp_path / runtime / "sample_brcam2c.csv")
        summary = json.loads((tmp_path / runtime / "sample_brcam2c_summary.json").read_text())
        assert summary["settings"]["runtime"] == runtime
    found["onnx"].mpp = found["torch"].mpp = 0.5
    report = evaluate([("sample", found["onnx"], found["torch"])], radius_um=0.1)
    assert len(found["torch"]) > 100
    # rounding may flip a point whose score sits on the threshold, nothing more
    assert report.detection.fp <= 1 and report.detection.fn <= 1, report.detection
    assert report.mean_f1 >= 0.99, report


# The classifier encoder's feature maps: the same rounding, on features of order 1 (after normalisation)
FEATURE_ATOL = 1e-4


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (70, 90)], ids=["square", "wide", "padded"])
def test_onnx_encoder_matches_torch(size: tuple[int, int]) -> None:
    from denuc.inference.runtime import OnnxEncoder
    from denuc.models.encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("timm:test_efficientnet", num_classes=0).eval()
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, *size)).astype(np.float32))
    with torch.inference_mode():
        expected = encoder(images)
    found = OnnxEncoder(encoder)(images)
    assert [f.shape for f in found] == [e.shape for e in expected]
    for f, e in zip(found, expected):
        np.testing.assert_allclose(f.numpy(), e.numpy(), atol=FEATURE_ATOL, rtol=0)


def test_onnx_pipeline_classifies_like_torch(tmp_path) -> None:
    from denuc.config import ClassifierConfig
    from denuc.inference.classify import Classifier
    from denuc.inference.pipeline import Pipeline
    from denuc.nuclei import NucleusClass

    torch.manual_seed(0)
    classifier = Classifier.create(ClassifierConfig(encoder="timm:test_efficientnet"),
                                   {"t": [NucleusClass("a"), NucleusClass("b")]})
    Pipeline(Detector(random_detector(8)), classifier).save(tmp_path / "bundle.safetensors")
    torch_model = Pipeline.from_pretrained(tmp_path / "bundle.safetensors")
    onnx_model = Pipeline.from_pretrained(tmp_path / "bundle.safetensors", runtime="onnx")
    assert torch_model.classifier.encoder_runtime is None and onnx_model.classifier.encoder_runtime is not None
    tiles = np.random.default_rng(4).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    points = [np.array([[10.0, 20.5], [100.2, 64.0]]), np.array([[0.0, 127.0]])]
    for (p_onnx, f_onnx), (p_torch, f_torch) in zip(onnx_model.classifier.classify_tiles(tiles, points),
                                                    torch_model.classifier.classify_tiles(tiles, points)):
        np.testing.assert_allclose(f_onnx, f_torch, atol=FEATURE_ATOL, rtol=0)
        np.testing.assert_allclose(p_onnx, p_torch, atol=SCORE_ATOL, rtol=0)
        assert np.ptp(f_torch) > 0.1  # features, not a constant


def test_transformer_encoders_stay_in_torch() -> None:
    from denuc.inference.runtime import OnnxEncoder
    from denuc.models.encoders import create_encoder

    with pytest.raises(ValueError, match="transformer encoders run in PyTorch"):
        OnnxEncoder(create_encoder("uni", depth=1, embed_dim=64, num_heads=2))


def test_exported_graphs_are_cached_by_weights(onnx_cache, monkeypatch) -> None:
    import denuc.inference.runtime as onnx_runtime

    model = random_detector(8, seed=5)
    tiles = np.random.default_rng(6).integers(0, 256, (1, 96, 96, 3), dtype=np.uint8)
    before = set(onnx_cache.glob("*.onnx"))
    expected = make_detector(model, runtime="onnx").forward(tiles)[0].numpy()
    (graph,) = set(onnx_cache.glob("*.onnx")) - before

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_runtime, "export_onnx", no_export)
    np.testing.assert_array_equal(make_detector(model, runtime="onnx").forward(tiles)[0].numpy(), expected)
    with pytest.raises(AssertionError, match="exported again"):  # other weights: another graph
        make_detector(random_detector(8, seed=6), runtime="onnx")
    monkeypatch.undo()
    graph.write_bytes(b"not a graph")  # a damaged cache file is exported again and replaced
    np.testing.assert_array_equal(make_detector(model, runtime="onnx").forward(tiles)[0].numpy(), expected)
    assert graph.read_bytes() != b"not a graph"
