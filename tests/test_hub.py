"""The model hub: one table of shipped models, names resolved in one place, files described by their metadata;
`default` the same detector in `denuc detect` and `denuc predict --detector-only`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import denuc
from denuc import hub
from denuc.cli import main
from denuc.config import DetectorConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.io import read_points
from denuc.models.detector import PointDetector

SAMPLE = Path(__file__).resolve().parents[1] / "denuc" / "data" / "sample_brcam2c.png"


def test_table_names_each_shipped_file_once_by_tag_and_aliases() -> None:
    tags = [m.tag for m in hub.MODELS]
    aliases = [a for m in hub.MODELS for a in m.aliases]
    assert len(set(tags)) == len(tags) and len(set(aliases)) == len(aliases) and not set(tags) & set(aliases)
    assert {"default", "fast", "stain-robust", "default-bundle"} <= set(aliases)
    assert len({m.file for m in hub.MODELS}) == len(hub.MODELS)
    shipped_files = {p.name for p in (SAMPLE.parents[1] / "weights").glob("*.safetensors")}
    assert {m.file for m in hub.MODELS} == shipped_files
    for model in hub.MODELS:
        assert re.fullmatch(r"(detector|bundle|outline)/[a-z0-9_]+\.[a-z0-9_]+", model.tag), model.tag
        assert model.tag.split("/")[0] == model.kind and model.path.is_file()
        assert "research use only" in model.licence and model.training_data and model.summary


def test_resolve_by_alias_tag_kind_and_path(tmp_path: Path) -> None:
    default = hub.shipped("default")
    assert default.kind == "detector" and default.file == "detector_default.safetensors"
    assert hub.resolve("default") == hub.resolve(default.tag) == hub.resolve("default", kind="detector")
    assert hub.resolve("default", kind="bundle") == hub.resolve("default-bundle") == hub.shipped("default-bundle").path
    assert hub.resolve(default.path) == default.path  # a file is itself
    with pytest.raises(InputError, match="no such model file") as error:
        hub.resolve(tmp_path / "missing.safetensors")
    assert all(name in str(error.value) for name in hub.names())  # the message lists what exists


def test_every_shipped_file_carries_its_provenance() -> None:
    for model in hub.MODELS:
        metadata = hub.read_metadata(model.path)
        found = {key: json.loads(metadata[key]) for key in hub.PROVENANCE_KEYS}
        assert found["tag"] == model.tag and found["training_data"] == model.training_data
        assert found["licence"] == model.licence
        assert re.fullmatch(r"\d+\.\d+\.\d+", found["denuc_version"])


def test_describe_a_shipped_model_and_a_user_file(tmp_path: Path) -> None:
    described = hub.describe("fast")
    path = hub.shipped("fast").path
    assert described["tag"] == "detector/shufflenet_v2_x0_5.e20_randstainna_ft12"
    assert described["file"] == str(path) and described["kind"] == "detector"
    assert described["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert described["training_data"].startswith("BRCAM2C") and described["aliases"] == ["fast"]
    bundle = hub.describe("default-bundle")
    assert bundle["kind"] == "bundle" and bundle["taxonomies"]["brcam2c"] == ["lymphocyte", "tumour", "stromal"]
    assert bundle["head_kinds"] == {"brcam2c": "linear", "crchisto": "linear", "consep": "mlp"}

    Detector(PointDetector(DetectorConfig())).save(tmp_path / "mine.safetensors")
    mine = hub.describe(tmp_path / "mine.safetensors")
    assert mine["tag"] is None and mine["training_data"] is None and mine["kind"] == "detector"
    assert mine["denuc_version"] == denuc.__version__


def test_saving_stamps_version_and_only_a_given_tag(tmp_path: Path) -> None:
    detector = Detector(PointDetector(DetectorConfig()))
    detector.save(tmp_path / "tagged.safetensors", tag="detector/shufflenet_v2_x0_5.mine")
    assert hub.describe(tmp_path / "tagged.safetensors")["tag"] == "detector/shufflenet_v2_x0_5.mine"
    # a tag copied along with the metadata of the model a file was made from would name another model
    detector.save(tmp_path / "copied.safetensors", extra_metadata={"tag": "detector/x.old", "denuc_version": "0.0.1"})
    copied = hub.describe(tmp_path / "copied.safetensors")
    assert copied["tag"] is None and copied["denuc_version"] == denuc.__version__


def test_load_chooses_by_metadata_not_by_name(tmp_path: Path) -> None:
    assert isinstance(hub.load("fast"), Detector)
    bundle = hub.load("default-bundle", taxonomy="crchisto")
    assert isinstance(bundle, Pipeline) and [c.name for c in bundle.classes][0] == "epithelial"
    Detector(PointDetector(DetectorConfig())).save(tmp_path / "bundle_looking_name.safetensors")
    assert isinstance(hub.load(tmp_path / "bundle_looking_name.safetensors"), Detector)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not a denuc detector or bundle"):
        hub.load(tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        hub.load(tmp_path / "text.safetensors")


def test_pipeline_default_is_the_bundle_and_a_bundle_loads_as_its_detector() -> None:
    pipeline = Pipeline.from_pretrained()
    assert pipeline.classifier is not None and Pipeline.from_pretrained("default").classifier is not None
    detector = Detector.from_pretrained("default-bundle")  # the bundle's own detector, with the bundle's tiles
    assert (detector.config.tile_size, detector.config.tile_overlap) == (384, 64)
    for (name, expected), found in zip(pipeline.detector.model.state_dict().items(),
                                       detector.model.state_dict().values()):
        assert torch.equal(expected, found), name
    assert Detector.from_pretrained("default").config.tile_size == 256


def test_hub_imports_without_torch_and_lists_the_models() -> None:
    code = "import sys, denuc.hub; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    listed = subprocess.run([sys.executable, "-m", "denuc.hub"], check=True, capture_output=True, text=True).stdout
    assert all(model.tag in listed for model in hub.MODELS)


def test_models_command_lists_tags_and_heads(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(model.tag in out for model in hub.MODELS) and "head crchisto (linear): epithelial" in out
    assert "head consep (mlp): other" in out
    assert main(["models", "default"]) == 0
    assert json.loads(capsys.readouterr().out)["tag"] == hub.shipped("default").tag


def test_detect_and_predict_detector_only_find_the_same_points(tmp_path: Path) -> None:
    """`default` is one detector: `denuc detect` and `denuc predict --detector-only` give the same points, and
    the slide summary records which weights and which command made them."""
    assert main(["detect", "--sample", "--out", str(tmp_path / "detect")]) == 0
    command = ["predict", "--sample", "--detector-only", "--quiet", "--out", str(tmp_path / "predict")]
    assert main(command) == 0
    detected = read_points(tmp_path / "detect" / "sample_brcam2c.csv")
    predicted = read_points(tmp_path / "predict" / "sample_brcam2c.csv")
    assert len(detected) == len(predicted) > 100
    order = [np.lexsort(n.xy.T[::-1]) for n in (detected, predicted)]
    np.testing.assert_allclose(detected.xy[order[0]], predicted.xy[order[1]], atol=1e-3, rtol=0)
    summary = json.loads((tmp_path / "predict" / "sample_brcam2c_summary.json").read_text())
    described = hub.describe("default")
    assert summary["provenance"]["model"]["tag"] == described["tag"]
    assert summary["provenance"]["model"]["sha256"] == described["sha256"]
    assert summary["provenance"]["command"] == ["denuc", *command]


def test_detect_keeps_dotted_names_and_refuses_two_inputs_of_one_name(tmp_path: Path, capsys) -> None:
    dotted = tmp_path / "in" / "TCGA-A1_0_0_1000_1000_0.9824.png"
    dotted.parent.mkdir()
    shutil.copy(SAMPLE, dotted)
    assert main(["detect", str(dotted), "--mpp", "0.5", "--runtime", "torch", "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{dotted.stem}{s}" for s in (".csv", ".geojson", "_overview.png")]
    assert f"{dotted.stem}.csv" in capsys.readouterr().out

    other = tmp_path / "other" / dotted.name
    other.parent.mkdir()
    shutil.copy(SAMPLE, other)
    assert main(["detect", str(dotted), str(other), "--mpp", "0.5", "--out", str(tmp_path / "twice")]) == 2
    assert "same file name" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()  # refused before any work
