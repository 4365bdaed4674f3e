"""Self-supervised pretraining (`denuc pretrain`, issue 32): the two views' geometry (a nucleus is found on the
same content in both), the tissue regions, the distillation pieces, a tiny run that writes encoder weights,
resumes exactly and feeds `train-classifier --weights`, the command's errors, and a 2-process DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_IMAGE
from PIL import Image
from safetensors.torch import load_file
from scipy import ndimage

from denuc.cli import main
from denuc.config import DetectorConfig, PretrainConfig
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.io.slides import open_slide, write_pyramidal_tiff
from denuc.models.detector import PointDetector
from denuc.models.encoders import create_encoder
from denuc.nuclei import Nuclei
from denuc.train.distill import target_entropy, teacher_momentum, teacher_temperature, update_center
from denuc.train.pretrain import cross_view_loss, network_state, pretrain
from denuc.train.regions import Region, source_regions
from denuc.train.views import view_pair

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = dict(encoder="timm:test_efficientnet", crop_size=64, batch_size=2, epochs=2, iters_per_epoch=2,
            warmup_iters=1, prototypes=32, head_hidden=64, head_bottleneck=32, threads=1)


def smooth_pattern(height: int, width: int) -> np.ndarray:
    """RGB uint8 whose colour changes slowly and differently in x and y: any two places differ, and
    resampling keeps values, so a colour says where it was read."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 100 * np.sin(x / 37.0), 128 + 100 * np.sin(y / 41.0), 128 + 100 * np.cos((x + y) / 53.0)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def colour_at(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear colours of ``image`` at pixel-centre points (n, 2)."""
    return np.stack([ndimage.map_coordinates(image[..., c].astype(np.float64), [xy[:, 1], xy[:, 0]], order=1)
                     for c in range(3)], -1)


def he_like(rng: np.random.Generator, size: int = 192) -> np.ndarray:
    """A pink field with dark purple discs the size of nuclei at 0.5 um/px."""
    image = np.empty((size, size, 3), np.float64)
    image[:] = (232, 182, 205)
    y, x = np.mgrid[0:size, 0:size]
    for cx, cy, r in zip(rng.uniform(0, size, 40), rng.uniform(0, size, 40), rng.uniform(4, 7, 40)):
        image[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = (95, 60, 140)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("source", ["png", "pyramid"])
@pytest.mark.parametrize("augment", [False, True])
def test_a_nucleus_lands_on_the_same_content_in_both_views(tmp_path: Path, source: str, augment: bool) -> None:
    """Whatever the second view's pixel size (finer, coarser, read from a pyramid's coarser level), flips and
    turns, the point a nucleus maps to shows in each view the colour of its place in the source."""
    pattern = smooth_pattern(700, 900)
    path = tmp_path / ("source.png" if source == "png" else "source.tif")
    if source == "png":
        Image.fromarray(pattern).save(path)
    else:
        write_pyramidal_tiff(path, pattern, mpp=0.25)
    slide = open_slide(path, mpp=0.25)
    assert source == "png" or len(slide.level_downsamples) > 1
    rng = np.random.default_rng(0)
    nuclei = rng.uniform(0, [900, 700], (400, 2))
    region = Region(str(path), 0.25, 0, 0, 900, 700)
    for other in ((0.2, 0.3), (0.9, 1.1), (0.5, 0.5)):  # a finer, a coarser (level 1 of the pyramid), the same
        cfg = PretrainConfig(crop_size=96, other_mpp=other, max_nuclei=500, color_jitter=0.0, stain_vector_jitter=0.0)
        pair = view_pair(slide, region, nuclei, cfg, rng, augment=augment)
        assert len(pair.points_a) == len(pair.points_b) == len(pair.shared) > 5
        # away from the borders, where the bilinear read below would reach outside the view
        inner = ((pair.points_a > 2) & (pair.points_a < 93) & (pair.points_b > 2) & (pair.points_b < 93)).all(1)
        truth = colour_at(pattern, nuclei[pair.shared[inner]])
        for image, points in ((pair.image_a, pair.points_a[inner]), (pair.image_b, pair.points_b[inner])):
            error = np.abs(colour_at(image, points) - truth).mean()
            assert error < 2.0
            assert np.abs(colour_at(image, points + 2.0) - truth).mean() > 3 * error  # the check can fail


def test_slides_are_cut_into_tissue_regions_and_small_images_taken_whole(tmp_path: Path) -> None:
    canvas = np.full((1400, 3000, 3), 245, np.uint8)  # glass, with tissue on the left 1,200 px only
    canvas[:, :1200] = he_like(np.random.default_rng(1), 1400)[:, :1200]
    write_pyramidal_tiff(tmp_path / "slide.tif", canvas, mpp=0.5)
    cfg = PretrainConfig(region_um=256.0)  # 512 px regions
    regions = source_regions(str(tmp_path / "slide.tif"), None, cfg)
    # regions start at 0, 498, 995, ... across (the fewest 512 px windows covering 3,000 px) and 0, 444, 888
    # down; the one at 995 is 205/512 tissue, those beyond are glass
    assert {(r.x, r.y) for r in regions} == {(x, y) for x in (0, 498) for y in (0, 444, 888)}
    assert all(r.width == r.height == 512 and r.mpp == 0.5 for r in regions)
    capped = source_regions(str(tmp_path / "slide.tif"), None, PretrainConfig(region_um=256.0, regions_per_source=2))
    assert len(capped) == 2 and set(capped) <= set(regions)
    Image.fromarray(canvas[:300, :400]).save(tmp_path / "small.png")
    assert source_regions(str(tmp_path / "small.png"), 0.5, cfg) == [Region(str(tmp_path / "small.png"), 0.5, 0,
                                                                             0, 400, 300)]


def test_distillation_pieces() -> None:
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996) and teacher_momentum(100, 100, 0.996) == 1.0
    assert teacher_temperature(0, 10, 0.04, 0.07) == 0.04 and teacher_temperature(5, 10, 0.04, 0.07) == \
        pytest.approx(0.055) and teacher_temperature(10, 10, 0.04, 0.07) == 0.07
    center = torch.zeros(1, 3)
    update_center(center, torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 0.9)
    assert torch.allclose(center, torch.tensor([[0.2, 0.2, 0.2]]))
    update_center(center, torch.zeros(0, 3), 0.9)  # no nucleus in the batch: unchanged
    assert torch.allclose(center, torch.tensor([[0.2, 0.2, 0.2]]))
    # rows are view a's then view b's: a student that gives for each view the teacher's scores for the other
    # view learns nothing more; one that copies the teacher's scores for its own view is wrong
    cfg = PretrainConfig()
    teacher = torch.randn(8, 16)
    swapped = torch.cat([teacher[4:], teacher[:4]]) / cfg.teacher_temp * cfg.student_temp
    own = teacher / cfg.teacher_temp * cfg.student_temp
    zero = torch.zeros(1, 16)
    assert cross_view_loss(swapped, teacher, zero, cfg, cfg.teacher_temp) < \
        cross_view_loss(own, teacher, zero, cfg, cfg.teacher_temp) - 0.5
    assert cross_view_loss(torch.zeros(0, 16, requires_grad=True), torch.zeros(0, 16), zero, cfg, 0.07) == 0
    # the targets' entropy is the loss's floor, reached by the student that gives the other view's targets
    floor = target_entropy(teacher, zero, cfg.teacher_temp)
    assert cross_view_loss(swapped, teacher, zero, cfg, cfg.teacher_temp) == pytest.approx(floor.item(), abs=1e-5)
    assert target_entropy(torch.ones(4, 16), zero, 0.04) == pytest.approx(np.log(16))  # uniform: ln K


def test_a_torchvision_encoders_weights_are_the_whole_networks(tmp_path: Path) -> None:
    """A torchvision encoder holds the layers up to its last level; the file is the whole network's state dict,
    so create_encoder (and train-classifier --weights) loads it strictly and gives the same features."""
    from safetensors.torch import save_file

    layers = ["maxpool", "stage2", "stage3", "stage4"]
    torch.manual_seed(3)
    encoder = create_encoder("torchvision:shufflenet_v2_x0_5", layers=layers).eval()
    save_file(network_state(encoder, {}), str(tmp_path / "w.safetensors"))
    loaded = create_encoder("torchvision:shufflenet_v2_x0_5", weights=tmp_path / "w.safetensors", layers=layers).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(encoder(images), loaded(images)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny pretraining on the bundled sample and a folder of synthetic images, run whole and run as one
    epoch then resumed; a tiny detector for the classifier's training."""
    root = tmp_path_factory.mktemp("pretrain")
    folder = root / "synthetic"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(he_like(rng)).save(folder / name)
    images = [str(SAMPLE_IMAGE), str(folder / "a.png"), str(folder / "b.png")]
    cfg = PretrainConfig(images=images, images_mpp=0.5, **TINY)
    pretrain(cfg, root / "whole", progress=False)
    pretrain(cfg, root / "resumed", progress=False, epochs_this_run=1)
    once = json.loads((root / "resumed" / "log.json").read_text())
    pretrain(cfg, root / "resumed", resume=True, progress=False)
    torch.manual_seed(0)
    Detector(PointDetector(DetectorConfig(score_threshold=0.5, tile_size=64, tile_overlap=32))).save(
        root / "detector.safetensors")
    return {"root": root, "folder": folder, "cfg": cfg, "once": once}


def test_a_tiny_run_writes_encoder_weights_and_resumes_exactly(runs) -> None:
    whole, resumed = runs["root"] / "whole", runs["root"] / "resumed"
    assert len(runs["once"]) == 1
    log = json.loads((whole / "log.json").read_text())
    assert [row["epoch"] for row in log] == [1, 2] and all(row["nuclei_per_pair"] > 0 for row in log)
    for row, level in ((row, level) for row in log for level in ("image", "nucleus")):  # floor <= loss, <= ln K
        assert 0 < row[f"{level}_target_entropy"] <= row[f"{level}_loss"] + 1e-5
        assert row[f"{level}_target_entropy"] <= np.log(runs["cfg"].prototypes) + 1e-5
    assert json.loads((resumed / "log.json").read_text())[1]["loss"] == pytest.approx(log[1]["loss"])
    weights, again = load_file(whole / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    torch.manual_seed(runs["cfg"].seed)  # the initialisation the run started from
    start = create_encoder("timm:test_efficientnet", num_classes=0).model.state_dict()
    assert start.keys() == weights.keys()
    assert any(not torch.equal(start[k], weights[k]) for k in weights if weights[k].is_floating_point())


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_classifier_takes_the_pretrained_weights(runs, tmp_path: Path, points_folder, capsys) -> None:
    weights = runs["root"] / "whole" / "encoder.safetensors"
    rng = np.random.default_rng(0)
    gt = Nuclei(xy=rng.uniform(8, 88, (12, 2)), labels=np.array(["tumour", "immune"] * 6, dtype=object), mpp=0.5)
    root = points_folder(tmp_path / "mine", {"train": [("a", he_like(rng, 96), gt)]},
                         {"mpp": 0.5, "classes": ["tumour", "immune"]})
    with pytest.warns(UserWarning, match="no validation images"):
        code, out, err = run_cli(["train-classifier", "--dataset", f"points={root}", "--run-dir", tmp_path / "cls",
                                  "--encoder", "timm:test_efficientnet", "--weights", weights, "--mode", "frozen",
                                  "--epochs", "1", "--detector", runs["root"] / "detector.safetensors",
                                  "--threads", "1", "--quiet"], capsys)
    assert code == 0, err
    encoder = Pipeline.from_pretrained(tmp_path / "cls" / "model.safetensors").classifier.encoder
    loaded = load_file(weights)
    assert all(torch.equal(v, loaded[k]) for k, v in encoder.model.state_dict().items())


def test_pretrain_command_errors_name_the_problem_without_a_traceback(runs, tmp_path: Path, capsys) -> None:
    png = runs["folder"] / "a.png"
    cases = [(["--run-dir", tmp_path / "r"], "nothing to learn from"),
             (["--images", png, "--run-dir", tmp_path / "r"], "states no pixel size: pass --mpp"),
             (["--images", tmp_path / "missing.svs", "--run-dir", tmp_path / "r"], "file not found"),
             (["--images", png, "--mpp", "0.5", "--run-dir", runs["root"] / "whole"], "holds a trained run"),
             (["--images", png, "--mpp", "0.5", "--encoder", "timm:no_such_net", "--run-dir", tmp_path / "r"],
              "timm:no_such_net"),
             (["--images", png, "--mpp", "0.5", "--other-mpp", "1.0", "0.5", "--run-dir", tmp_path / "r"],
              "other_mpp")]
    for argv, message in cases:
        code, _, err = run_cli(["pretrain", *argv], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_two_processes_train_one_step_under_torchrun(tmp_path: Path) -> None:
    """DDP on the CPU (gloo), as a lab runs it on GPUs: both processes train, only the first writes."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "denuc.cli",
         "pretrain", "--images", SAMPLE_IMAGE, "--mpp", "0.5", "--encoder", "timm:test_efficientnet",
         "--run-dir", tmp_path / "ddp", "--epochs", "1", "--iters-per-epoch", "1", "--batch-size", "1",
         "--crop-size", "64", "--prototypes", "32", "--warmup-iters", "1", "--threads", "1", "--quiet",
         "--teacher-temp", "0.05", "--warmup-teacher-temp", "0.03", "--center-momentum", "0.8"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("encoder weights:") == 1
    assert len(json.loads((tmp_path / "ddp" / "log.json").read_text())) == 1
    assert (tmp_path / "ddp" / "encoder.safetensors").is_file()
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (config["teacher_temp"], config["warmup_teacher_temp"], config["center_momentum"]) == (0.05, 0.03, 0.8)
    assert time.perf_counter() - started < 120
