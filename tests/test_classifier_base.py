"""`train-classifier --base`: heads for new taxonomies added to an existing bundle (issue 30), its detector,
encoder and other heads kept bit for bit."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_classifier import CLASSES, TINY, exit_code, tiny_detector, write_fake_crchisto

from denuc.config import ClassifierTrainConfig, DatasetSpec
from denuc.errors import InputError
from denuc.inference.classify import Classifier
from denuc.inference.pipeline import Pipeline
from denuc.nuclei import NucleusClass
from denuc.train.classifier import train_classifier

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend

CRCHISTO = ["epithelial", "fibroblast", "inflammatory", "others"]  # the fake dataset's classes (4 + not a nucleus)
BASE_OFFSETS = {"a": {"outputs": "nucleus", "offsets": [0.0, 0.0, -0.5]}}


def write_base(path: Path, taxonomies: dict[str, list[NucleusClass]], half: bool) -> Path:
    """A tiny bundle as a shipped one (float16 when ``half``, offsets recorded); its untrained detector finds
    points everywhere: the "not a nucleus" examples."""
    torch.manual_seed(1)
    Pipeline(tiny_detector(), Classifier.create(TINY, taxonomies)).save(
        path, half=half, extra_metadata={"class_offsets": BASE_OFFSETS})
    return path


@pytest.fixture
def crchisto(tmp_path: Path) -> DatasetSpec:
    write_fake_crchisto(tmp_path / "crchisto")
    return DatasetSpec("crchisto", str(tmp_path / "crchisto"))


def base_config(spec: DatasetSpec, base: Path) -> ClassifierTrainConfig:
    return ClassifierTrainConfig(datasets=[spec], base=str(base), epochs=2, batch_size=2, warmup_iters=1, threads=1)


@pytest.mark.parametrize(("replaced", "half"), [(False, True), (True, False)])
def test_new_head_is_added_and_the_rest_of_the_base_is_kept_bit_for_bit(tmp_path: Path, crchisto, replaced: bool,
                                                                        half: bool) -> None:
    """A new taxonomy (float16 base, as shipped) or one of the base's replaced (float32 base): only that head
    changes; every other tensor keeps its values and dtype, and the base's default head stays the default."""
    heads = {"a": CLASSES["a"], "crchisto": CLASSES["b"]} if replaced else CLASSES
    base = write_base(tmp_path / "base.safetensors", heads, half)
    run = tmp_path / "run"
    train_classifier(base_config(crchisto, base), run, progress=False, epochs_this_run=1)
    bundle = train_classifier(base_config(crchisto, base), run, resume=True, progress=False)
    assert [row["epoch"] for row in json.loads((run / "log.json").read_text())] == [1, 2]

    before, after = load_file(str(base)), load_file(str(bundle))
    new = {k for k in after if k.startswith("classifier.heads.crchisto.")}
    assert new and set(after) - new == set(before) - new
    for key in set(before) - new:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    if replaced:  # the head of the same name is trained afresh
        assert not all(torch.equal(before[k], after[k]) for k in new)
    else:
        assert not new & set(before)
    assert after["classifier.heads.crchisto.1.weight"].shape == (len(CRCHISTO) + 1, sum((24, 32, 48, 64)))

    model = Pipeline.from_pretrained(bundle, taxonomy="crchisto")
    assert [c.name for c in model.classes] == CRCHISTO
    found = model.predict(np.asarray(Image.open(tmp_path / "crchisto" / "img2" / "img2.bmp")), mpp=0.55)
    assert len(found) and set(found.labels) <= set(CRCHISTO)
    assert Pipeline.from_pretrained(bundle).classifier.taxonomy == "a"  # the base's first head is still the default

    recipe = json.loads((run / "config.json").read_text())
    assert (recipe["base"], recipe["detector"], recipe["model"]) == (str(base), str(base), asdict(TINY))
    with safe_open(str(bundle), framework="pt") as f:  # the base's offsets are still those folded into its heads
        offsets = json.loads(f.metadata()["class_offsets"])
    assert offsets["a"] == BASE_OFFSETS["a"] and len(offsets["crchisto"]["offsets"]) == len(CRCHISTO) + 1


def test_a_head_of_another_kind_beside_the_base_ones(tmp_path: Path, crchisto) -> None:
    """`--base --head mlp`: the new taxonomy gets an MLP head, the bundle's linear heads stay linear and bit for bit;
    the bundle records the exception and loads with both kinds."""
    base = write_base(tmp_path / "base.safetensors", CLASSES, half=True)
    cfg = ClassifierTrainConfig(datasets=[crchisto], base=str(base), base_head="mlp", epochs=1, batch_size=2,
                                warmup_iters=1, threads=1)
    bundle = train_classifier(cfg, tmp_path / "run", progress=False)
    before, after = load_file(str(base)), load_file(str(bundle))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["classifier.heads.crchisto.3.weight"].shape == (len(CRCHISTO) + 1, TINY.mlp_hidden)
    model = Pipeline.from_pretrained(bundle, taxonomy="crchisto")
    assert model.classifier.config.taxonomy_heads == {"crchisto": "mlp"} and model.classifier.config.head == "linear"
    assert [len(model.classifier.heads[name]) for name in ("a", "crchisto")] == [2, 4]  # linear, then MLP
    with pytest.raises(ValueError, match="without a base"):
        ClassifierTrainConfig(datasets=[crchisto], base_head="mlp")


def test_base_refuses_what_would_contradict_it(tmp_path: Path, crchisto, capsys) -> None:
    base = write_base(tmp_path / "base.safetensors", CLASSES, half=False)
    common = ["train-classifier", "--base", str(base), "--dataset", f"crchisto={crchisto.root}", "--quiet",
              "--run-dir", str(tmp_path / "run")]
    for extra, message in ((["--mode", "lora"], "--base: trains heads on the bundle's frozen encoder"),
                           (["--encoder", TINY.encoder], "drop --encoder"),
                           (["--weights", str(base), "--detector", str(base)], "drop --weights, --detector"),
                           (["--layers", "0,1"], "drop --layers")):
        assert exit_code([*common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    tiny_detector().save(tmp_path / "detector.safetensors")
    assert exit_code([*common[:2], str(tmp_path / "detector.safetensors"), *common[3:]]) == 2
    assert "detector-only model has no classifier to add heads to" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="mode must be 'frozen'"):
        ClassifierTrainConfig(datasets=[crchisto], base=str(base), mode="full")
    with pytest.raises(InputError, match="no such model file"):
        train_classifier(base_config(crchisto, tmp_path / "missing.safetensors"), tmp_path / "run", progress=False)


def test_base_through_the_command_line_and_predict(tmp_path: Path, crchisto, capsys, monkeypatch) -> None:
    """A relative --base path is recorded absolute (a resumed run finds it from anywhere); `predict --taxonomy`
    selects the new head."""
    write_base(tmp_path / "base.safetensors", CLASSES, half=True)
    monkeypatch.chdir(tmp_path)
    args = ["train-classifier", "--base", "base.safetensors", "--dataset", f"crchisto={crchisto.root}",
            "--epochs", "1", "--offsets", "none", "--threads", "1", "--quiet", "--run-dir", "run"]
    assert exit_code(args) == 0 and exit_code([*args, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["base"] == str(tmp_path / "base.safetensors")
    capsys.readouterr()
    image = tmp_path / "crchisto" / "img2" / "img2.bmp"
    assert exit_code(["predict", str(image), "--mpp", "0.55", "--model", "run/model.safetensors", "--taxonomy",
                      "crchisto", "--runtime", "torch", "--no-tissue-mask", "--quiet", "--out", "out"]) == 0
    summary = json.loads((tmp_path / "out" / "img2_summary.json").read_text())
    assert [c["name"] for c in summary["model"]["classes"]] == CRCHISTO
