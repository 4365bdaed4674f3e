"""The outline head (denuc.models.outline), its training (denuc.train.outlines), its inference
(denuc.inference.outline) and its commands (`denuc predict --outlines`, `denuc train-outlines`).

Geometry is checked against masks drawn here; the shipped head on the bundled sample image at its annotated points;
training on a small CoNSeP-format copy built here (ellipses on a pink background).
"""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SAMPLE_POINTS
from PIL import Image
from safetensors.torch import save_file
from skimage.draw import ellipse
from skimage.draw import polygon as skimage_polygon
from skimage.measure import points_in_poly

import denuc.inference.outline as outline_inference
from denuc import hub
from denuc.cli import main
from denuc.config import DatasetSpec, DetectorConfig, OutlineConfig, OutlineTrainConfig
from denuc.errors import InputError
from denuc.inference.detect import Detector
from denuc.inference.outline import Outliner
from denuc.io import read_points
from denuc.models.outline import OutlineHead, dihedral_ray_order, polygons, trim_to_neighbours
from denuc.nuclei import Nuclei
from denuc.outlines import MEASUREMENTS, clip_outlines, measure, rasterise
from denuc.train.outlines import save_outline_head, star_iou, star_radii, train_outline_head

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend


def filled(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) mask of the pixels ``skimage.draw.polygon`` gives an (x, y) outline."""
    mask = np.zeros(shape, dtype=bool)
    rows, cols = skimage_polygon(outline[:, 1], outline[:, 0], shape)
    mask[rows, cols] = True
    return mask


# --- geometry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rays", [32, 16])
def test_dihedral_ray_order_matches_the_radii_of_the_transformed_mask(rays: int) -> None:
    """An irregular nucleus in a non-square image, its radii measured from an off-grid centre (so that no sample
    falls on a rounding tie, where a flip would round the other way): every flip and transpose of mask and centre
    gives exactly the original radii permuted by ``dihedral_ray_order``."""
    height, width = 60, 80
    angles = np.linspace(0, 2 * np.pi, 9, endpoint=False)
    reach = np.array([14, 8, 11, 5, 12, 7, 13, 9, 6.0])
    inst_map = np.zeros((height, width), np.int32)
    inst_map[filled(np.c_[36 + 1.3 * reach * np.cos(angles), 30 + reach * np.sin(angles)], (height, width))] = 1
    inst_map[filled(np.c_[[60, 75, 70], [5, 10, 25]], (height, width))] = 2  # a neighbour the rays stop at
    centre = np.array([[36.25, 30.3]])
    radii, whole = star_radii(inst_map, np.array([1]), centre, rays, 30)
    assert whole.all() and len(np.unique(radii)) > rays // 2  # asymmetric: a wrong permutation shows

    for transpose, flip_x, flip_y in itertools.product([False, True], repeat=3):
        mask, xy = inst_map, centre.copy()
        if transpose:
            mask, xy = mask.T, xy[:, ::-1]
        if flip_x:
            mask, xy = mask[:, ::-1], np.c_[mask.shape[1] - 1 - xy[:, 0], xy[:, 1]]
        if flip_y:
            mask, xy = mask[::-1], np.c_[xy[:, 0], mask.shape[0] - 1 - xy[:, 1]]
        moved, moved_whole = star_radii(np.ascontiguousarray(mask), np.array([1]), xy, rays, 30)
        order = dihedral_ray_order(rays, transpose, flip_x, flip_y)
        np.testing.assert_array_equal(moved, radii[:, order], err_msg=str((transpose, flip_x, flip_y)))
        assert moved_whole.all()


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return ((cols - centre[0]) ** 2 + (rows - centre[1]) ** 2 <= radius ** 2).astype(np.int32)


@pytest.mark.parametrize("radius, centre", [(10.0, (40.3, 30.6)), (7.5, (50.0, 20.0)), (12.0, (39.5, 29.5)),
                                            (4.2, (45.7, 33.1))])
def test_star_radii_of_a_disc_and_its_polygon(radius: float, centre: tuple[float, float]) -> None:
    """The radii of a pixel disc are its radius: on average within half a pixel; each ray within a pixel (a sample
    is read at the pixel it rounds to, up to half a pixel's diagonal away, and the crossing is placed halfway
    between samples 0.5 px apart). Its polygon covers nearly the disc's own pixels."""
    shape = (64, 96)
    inst_map = disc(shape, centre, radius)
    radii, whole = star_radii(inst_map, np.array([1]), np.array([centre]), 32, 40)
    assert whole.all()
    assert abs(radii.mean() - radius) < 0.5, radii
    assert np.abs(radii - radius).max() < 1.0, radii
    nuclei = Nuclei(np.array([centre]), outlines=polygons(np.array([centre]), radii), image_size=shape[::-1])
    drawn = rasterise(nuclei) > 0
    truth = inst_map > 0
    assert (drawn & truth).sum() / (drawn | truth).sum() > 0.9


def test_star_radii_say_whether_a_nucleus_is_whole() -> None:
    shape = (64, 96)
    cut = disc(shape, (3.0, 30.0), 10)  # runs past the left edge
    assert not star_radii(cut, np.array([1]), np.array([[3.0, 30.0]]), 32, 40)[1][0]
    ring = disc(shape, (48.0, 32.0), 12) - disc(shape, (48.0, 32.0), 4)  # its centre is not inside it
    assert not star_radii(ring, np.array([1]), np.array([[48.0, 32.0]]), 32, 40)[1][0]
    large = disc(shape, (48.0, 32.0), 20)  # wider than max_radius
    assert not star_radii(large, np.array([1]), np.array([[48.0, 32.0]]), 32, 15)[1][0]
    assert star_radii(large, np.array([1]), np.array([[48.0, 32.0]]), 32, 25)[1][0]


@pytest.mark.parametrize("seed", range(5))
def test_trim_to_neighbours_leaves_no_pixel_in_two_outlines(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 120
    xy = np.r_[rng.uniform(0, size, (60, 2)), [[500.0, 500.0]]]  # and one far from all others
    radii = rng.uniform(2, 14, (len(xy), 32))
    trimmed = trim_to_neighbours(xy, radii)
    assert (trimmed <= radii).all() and (trimmed > 0).all()
    np.testing.assert_array_equal(trimmed[-1], radii[-1])  # no neighbour within reach: untouched

    def owners(r: np.ndarray) -> np.ndarray:
        return sum(filled(v, (size, size)).astype(int) for v in polygons(xy, r))

    assert (owners(radii) > 1).sum() > 100  # the untrimmed outlines do overlap: the test can fail
    assert (owners(trimmed) > 1).sum() == 0


def test_trim_to_neighbours_of_one_nucleus_is_its_radii() -> None:
    radii = np.full((1, 32), 5.0)
    np.testing.assert_array_equal(trim_to_neighbours(np.zeros((1, 2)), radii), radii)


# --- inference -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))


def test_radii_barely_depend_on_the_tiling(sample: np.ndarray, monkeypatch) -> None:
    """Image sides not multiples of 4, points everywhere: at random, and on and beside tile borders (128, 256,
    384) and the image's edges. The maps come from a deep network whose receptive field is wider than the tiles'
    margin, so tiles of 256 px (a quarter of the real size) move radii by up to a tenth of a pixel (measured 0.107)."""
    outliner = Outliner.from_pretrained("default-outlines")
    work = np.ascontiguousarray(sample[:398, :402])
    height, width = work.shape[:2]
    rng = np.random.default_rng(0)
    spots = np.array([-0.4, 0.0, 63.9, 127.49, 127.5, 127.51, 128.0, 255.5, 256.3, 383.9, 396.9, 401.4])
    borders = np.stack(np.meshgrid(spots, spots), -1).reshape(-1, 2)
    borders = borders[(borders[:, 0] < width - 0.5) & (borders[:, 1] < height - 0.5)]
    xy = np.r_[rng.uniform(-0.5, [width - 0.5, height - 0.5], (300, 2)), borders]
    whole = outliner.radii(work, xy)
    assert outline_inference.TILE >= max(width, height)  # one tile
    monkeypatch.setattr(outline_inference, "TILE", 256)
    tiled = outliner.radii(work, xy)
    assert whole.shape == (len(xy), 32) and (whole > 0).all()
    assert np.abs(tiled - whole).max() < 0.25 and star_iou(tiled, whole).min() > 0.95


def test_tiles_at_a_finer_pixel_size_get_the_outlines_of_their_nuclei(sample: np.ndarray) -> None:
    """A detector working at 0.33 um/px hands the head tiles at that pixel size: they are resampled to the head's,
    and the outlines and measurements come back in tile pixels and um, as for tiles at the head's own size."""
    outliner = Outliner.from_pretrained("default-outlines")
    truth = read_points(SAMPLE_POINTS)
    tile = np.ascontiguousarray(sample[:256, :256])
    inside = truth.subset((truth.xy < 240).all(1) & (truth.xy > 16).all(1))
    ((own, own_values),) = outliner.outline_tiles(tile[None], [inside])
    ((same, _),) = outliner.outline_tiles(tile[None], [inside], SAMPLE_MPP)
    for a, b in zip(own.outlines, same.outlines):  # the head's own pixel size given explicitly: nothing changes
        np.testing.assert_array_equal(a, b)
    fine = np.asarray(Image.fromarray(tile).resize((384, 384), Image.Resampling.BICUBIC))
    scaled = inside.scaled(1.5)
    ((finer, finer_values),) = outliner.outline_tiles(fine[None], [scaled], SAMPLE_MPP / 1.5)
    assert len(finer) == len(inside) > 50
    for point, outline in zip(finer.xy, finer.outlines):
        assert points_in_poly(point[None], outline)[0]
    ratio = finer_values["area_um2"] / own_values["area_um2"]
    assert abs(np.nanmedian(ratio) - 1) < 0.1 and np.nanmean(np.abs(ratio - 1) < 0.25) > 0.8


def test_nuclei_a_tile_does_not_want_still_trim_its_outlines(sample: np.ndarray) -> None:
    """``outline_tiles(wanted=...)`` (a slide's tile outlines only the nuclei it owns): the wanted nuclei get
    exactly the outlines they get among all, trimmed by the others' points; their measurements change only where an
    outline crossed a left-out neighbour's by a fraction of a pixel, which it now keeps."""
    outliner = Outliner.from_pretrained("default-outlines")
    truth = read_points(SAMPLE_POINTS)
    tile = np.ascontiguousarray(sample[:256, :256])
    inside = truth.subset(((truth.xy >= 0) & (truth.xy < 255)).all(1))
    wanted = np.random.default_rng(0).random(len(inside)) < 0.5
    ((every, every_values),) = outliner.outline_tiles(tile[None], [inside])
    ((some, some_values),) = outliner.outline_tiles(tile[None], [inside], wanted=[wanted])
    assert len(some) == wanted.sum() > 30
    np.testing.assert_array_equal(some.xy, inside.xy[wanted])
    untrimmed = trim_to_neighbours(some.xy, np.ones((len(some), 32)) * 100) != trim_to_neighbours(
        inside.xy, np.ones((len(inside), 32)) * 100)[wanted]
    assert untrimmed.any()  # the left-out nuclei do trim some wanted ones
    for own, among_all in zip(some.outlines, [o for o, keep in zip(every.outlines, wanted) if keep]):
        np.testing.assert_array_equal(own, among_all)
    gained = some_values["area_um2"] - every_values["area_um2"][wanted]
    assert (gained >= 0).all() and (gained == 0).mean() > 0.8
    for name in MEASUREMENTS:
        same = np.isclose(some_values[name], every_values[name][wanted], equal_nan=True)
        assert same[gained == 0].all(), name


def test_save_and_load_give_the_same_head(sample: np.ndarray, tmp_path: Path) -> None:
    """Head and its detector (another architecture than the shipped one) travel in one file."""
    torch.manual_seed(1)
    config = OutlineConfig(rays=16, fine_convs=1, lattices=((3, 2.0), (3, 4.0), (1, 8.0)), hidden=32)
    head = OutlineHead(config, DetectorConfig(backbone="shufflenet_v2_x0_5", neck_channels=32))
    path = tmp_path / "head.safetensors"
    save_outline_head(head, path, {"epoch": 3})
    loaded = Outliner.from_pretrained(path)
    assert loaded.config == config and loaded.model.detector.config == head.detector.config
    xy = np.random.default_rng(0).uniform(0, 200, (50, 2))
    work = sample[:200, :200]
    np.testing.assert_array_equal(loaded.radii(work, xy), Outliner(head).radii(work, xy))
    assert loaded.fingerprint() == Outliner(head).fingerprint()
    described = hub.describe(path)
    assert described["kind"] == "outline" and described["tag"] is None


def test_a_head_reads_the_maps_of_its_detector_at_its_pixel_size() -> None:
    with pytest.raises(ValueError, match="works at 0.5 um/px, its detector at 0.33"):
        OutlineHead(OutlineConfig(), DetectorConfig(mpp=0.33))
    # the same design at the detector's pixel size: what it reads and how far it reaches stay the same in um
    finer = OutlineConfig().at_mpp(0.33)
    OutlineHead(finer, DetectorConfig(mpp=0.33))
    base = OutlineConfig()
    assert finer.mpp == 0.33 and finer.max_radius * 0.33 == pytest.approx(base.max_radius * base.mpp)
    assert [grid for grid, _ in finer.lattices] == [grid for grid, _ in base.lattices]
    assert [spacing * 0.33 for _, spacing in finer.lattices] == pytest.approx(
        [spacing * base.mpp for _, spacing in base.lattices])
    assert base.at_mpp(base.mpp) == base


@pytest.mark.parametrize("mpp", [0.5, 0.33])
def test_convs_run_on_windows_read_what_they_read_on_the_whole_map(mpp: float) -> None:
    """The head's convs run only on a window around each point (``_read_windows``); its reads equal those of the
    convs run over the whole map and read there, the design's definition, for points inside the image, on its
    edges and past them, with batch-norm statistics that are not the identity's."""
    import torch.nn.functional as F

    from denuc.models.outline import MAPS

    torch.manual_seed(0)
    head = OutlineHead(OutlineConfig().at_mpp(mpp), DetectorConfig(mpp=mpp)).eval()
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    images = torch.rand(2, 3, 96, 128) * 255
    rng = np.random.default_rng(0)
    points = [torch.from_numpy(rng.uniform([-6, -6], [134, 102], (30, 2))).float(),
              torch.tensor([[0.0, 0.0], [127.0, 95.0], [-0.5, 50.0], [64.3, 95.5]])]
    with torch.no_grad():
        features = head.features(images)
        radii = head.read(features, points)
        whole = {"stride2": head.fine(features["stride2"]), "stride4": head.coarse(features["stride4"]),
                 "head": features["head"]}
        reads = []
        for name in MAPS:  # every map read over the whole of it, as the head's lattice says
            h, w = whole[name].shape[-2:]
            stride = head.strides[name]
            xy = torch.nn.utils.rnn.pad_sequence(points, batch_first=True)[:, :, None, :] + getattr(
                head, f"{name}_offsets")
            grid = torch.stack([(xy[..., 0] + 0.5) / (stride * w) * 2 - 1, (xy[..., 1] + 0.5) / (stride * h) * 2 - 1],
                               -1)
            sampled = F.grid_sample(whole[name], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            reads.append(sampled.permute(0, 2, 3, 1).reshape(*xy.shape[:2], -1))
        real = torch.arange(30)[None] < torch.tensor([len(p) for p in points])[:, None]
        expected = F.softplus(head.regress(torch.cat(reads, -1)[real]) + 4.0)
    assert radii.shape == (34, head.config.rays)
    torch.testing.assert_close(radii, expected, rtol=1e-4, atol=1e-4)
    assert head.read(features, [torch.zeros(0, 2), torch.zeros(0, 2)]).shape == (0, head.config.rays)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_behind_its_own_detector_one_pass_gives_points_and_outlines(sample: np.ndarray, runtime: str) -> None:
    """``sharing`` hands back a detector on the same network whose pass also keeps the head's maps: the same points
    as the detector alone, and the same outlines as the head running the network itself; another detector is
    handed back as it is."""
    outliner = Outliner.from_pretrained("default-outlines", runtime=runtime)
    detector = Detector.from_pretrained("default", runtime=runtime)
    shared = outliner.sharing(detector)
    assert shared is not detector and shared.model is detector.model and shared.runtime == runtime
    tiles = np.ascontiguousarray(np.stack([sample[:448, :448], sample[-448:, -448:]]))
    found = shared.detect_tiles(tiles)
    alone = detector.detect_tiles(tiles)
    assert outliner._last is not None and outliner._last[0] is tiles
    one_pass = outliner.outline_tiles(tiles, found)
    assert outliner._last is None  # the maps are read once, then let go
    again = outliner.outline_tiles(tiles, alone)  # the head runs the network itself
    for (a, a_values), (b, b_values), f, g in zip(one_pass, again, found, alone):
        np.testing.assert_allclose(f.xy, g.xy, rtol=0, atol=1e-3)
        assert len(a) > 100
        for p, q in zip(a.outlines, b.outlines):
            np.testing.assert_allclose(p, q, rtol=0, atol=1e-3)
        np.testing.assert_allclose(a_values["area_um2"], b_values["area_um2"], rtol=0.02)
    other = Detector.from_pretrained("precise", runtime=runtime)
    assert outliner.sharing(other) is other


def test_the_head_for_a_detector_reads_its_maps() -> None:
    """``--outlines`` without a model: behind `precise` the head trained on its maps (one pass), else
    default-outlines."""
    for name, tag in (("precise", "precise-outlines"), ("default", "default-outlines"), ("fast", "default-outlines")):
        detector = Detector.from_pretrained(name)
        outliner, chosen = Outliner.for_detector(detector)
        assert chosen == hub.shipped(tag).tag
        assert (outliner.sharing(detector) is detector) == (name == "fast")
        if name != "fast":  # fast has no head of its own: default-outlines runs its own copy of default
            assert outliner.config.mpp == detector.config.mpp


def test_an_outline_head_of_denuc_0_5_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """0.5's heads ran a stem of their own (format denuc-outline-1); today's read their detector's maps."""
    old = tmp_path / "old_head.safetensors"
    save_file({"regress.0.weight": torch.zeros(1)}, str(old), metadata={"format": "denuc-outline-1", "config": "{}"})
    with pytest.raises(InputError, match=f"{old}: an outline head of denuc 0.5 or earlier.*denuc train-outlines"):
        Outliner.from_pretrained(old)


def test_a_detector_file_is_not_an_outline_head() -> None:
    detector = hub.resolve("default")
    with pytest.raises(InputError, match=f"{detector}: not a denuc outline head"):
        Outliner.from_pretrained(detector)


def test_shipped_head_outlines_the_sample_at_its_annotated_points(sample: np.ndarray) -> None:
    assert hub.describe("default-outlines")["kind"] == "outline"
    truth = read_points(SAMPLE_POINTS)
    size = (sample.shape[1], sample.shape[0])
    outlined = clip_outlines(Outliner.from_pretrained("default-outlines").outline(sample, truth, SAMPLE_MPP), size)
    assert len(outlined) == len(truth) > 300
    for point, outline in zip(outlined.xy, outlined.outlines):  # star-convex about its point
        assert points_in_poly(point[None], outline)[0]
    values = measure(outlined, sample, SAMPLE_MPP)
    diameter = values["equivalent_diameter_um"]
    assert np.isfinite(diameter).mean() > 0.95
    assert 4 < np.nanmean(diameter) < 12  # nuclei, not pixels nor cells


# --- training ---------------------------------------------------------------------------------------------------


def write_consep(root: Path, names: list[str], size: int = 160, seed: int = 0) -> Path:
    """A CoNSeP copy (0.25 um/px): six dark ellipses per image on a pink background, with their labels."""
    rng = np.random.default_rng(seed)
    for folder in ("Images", "Labels"):
        (root / "Train" / folder).mkdir(parents=True)
    for name in names:
        image = np.empty((size, size, 3), np.float64)
        image[:] = (235, 200, 220)
        inst_map = np.zeros((size, size), np.int32)
        centroids = []
        for k, (cy, cx) in enumerate(itertools.product(np.linspace(24, size - 24, 3), (40, size - 40)), start=1):
            rows, cols = ellipse(cy, cx, rng.uniform(6, 12), rng.uniform(6, 12), (size, size),
                                 rotation=rng.uniform(0, np.pi))
            inst_map[rows, cols] = k
            image[rows, cols] = (90, 50, 140)
            centroids.append((cols.mean(), rows.mean()))
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "Train" / "Images" / f"{name}.png")
        scipy.io.savemat(root / "Train" / "Labels" / f"{name}.mat",
                         {"inst_map": inst_map, "type_map": (inst_map > 0).astype(np.int32),
                          "inst_type": np.ones((len(centroids), 1)), "inst_centroid": np.array(centroids)})
    return root


@pytest.fixture(scope="module")
def consep(tmp_path_factory) -> Path:
    """train_8 is in CoNSeP's validation split, the others in its training split."""
    return write_consep(tmp_path_factory.mktemp("consep"), ["train_1_000", "train_1_001", "train_2_000",
                                                           "train_8_000"])


def test_training_writes_the_best_head_and_resumes_exactly(consep: Path, tmp_path: Path) -> None:
    cfg = OutlineTrainConfig(datasets=[DatasetSpec("consep", str(consep))],
                             model=OutlineConfig(fine_convs=1, hidden=32), epochs=2, iters_per_epoch=3,
                             batch_size=16, warmup_iters=1)
    run = tmp_path / "resumed"
    history = train_outline_head(cfg, run, progress=False, epochs_this_run=1)  # "dies" after epoch 1
    assert [row["epoch"] for row in history] == [1]
    assert 0 < history[0]["val_f1_consep"] <= 1 and history[0]["val_f1_mean"] == history[0]["val_f1_consep"]
    assert json.loads((run / "log.json").read_text()) == history
    best = hub.read_metadata(run / "best.safetensors")
    assert json.loads(best["epoch"]) == 1 and json.loads(best["val_star_iou"])["consep"] == history[0]["val_f1_consep"]
    assert Outliner.from_pretrained(run / "best.safetensors").config == cfg.model

    history = train_outline_head(cfg, run, resume=True, progress=False)
    assert [row["epoch"] for row in history] == [1, 2]
    train_outline_head(cfg, tmp_path / "straight", progress=False)
    resumed = torch.load(run / "last.pt", weights_only=False)["model"]
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_training_refuses_a_dataset_without_outlines(tmp_path: Path) -> None:
    root = tmp_path / "brcam2c"
    root.mkdir()
    (root / "brca_ds_train.txt").write_text("img.png\n")
    cfg = OutlineTrainConfig(datasets=[DatasetSpec("brcam2c", str(root))], epochs=1, iters_per_epoch=1)
    with pytest.raises(InputError, match="brcam2c has no instance outlines"):
        train_outline_head(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- commands ---------------------------------------------------------------------------------------------------


def run_denuc(*argv) -> subprocess.CompletedProcess:
    """The real entry point, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "denuc.cli", *map(str, argv)], capture_output=True, text=True)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_outlines_on_the_sample(tmp_path: Path, capsys) -> None:
    """Polygons and measurements in every output, at the very points a run without --outlines finds; the same
    command again keeps its results, and a run without --outlines into the same folder is refused. (The first run
    through the real entry point, the others in this process: starting one costs seconds.)"""
    command = ["predict", "--sample", "--runtime", "torch", "--quiet"]
    done = run_denuc(*command, "--outlines", "--out", tmp_path / "outlined")
    assert done.returncode == 0, done.stderr
    assert main(command + ["--out", str(tmp_path / "points")]) == 0

    rows = read_csv(tmp_path / "outlined" / "sample_brcam2c.csv")
    points = read_csv(tmp_path / "points" / "sample_brcam2c.csv")
    assert len(rows) == len(points) > 300
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    np.testing.assert_allclose(xy, [[float(r["x"]), float(r["y"])] for r in points], rtol=0, atol=1e-3)  # threads
    assert set(MEASUREMENTS) <= set(rows[0]) and not set(MEASUREMENTS) & set(points[0])
    diameters = np.array([float(r["equivalent_diameter_um"]) for r in rows])
    assert 4 < np.nanmean(diameters) < 12

    features = json.loads((tmp_path / "outlined" / "sample_brcam2c.geojson").read_text())["features"]
    assert len(features) == len(rows)
    for feature, row in zip(features, rows):
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        ring = np.array(geometry["coordinates"][0])
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()  # closed, as GeoJSON wants
        assert set(MEASUREMENTS) <= set(feature["properties"]["measurements"])
        assert points_in_poly([[float(row["x"]), float(row["y"])]], ring)[0]  # star-convex about its point
    summary = json.loads((tmp_path / "outlined" / "sample_brcam2c_summary.json").read_text())
    assert summary["provenance"]["outlines"]["tag"] == hub.describe("default-outlines")["tag"]

    kept = (tmp_path / "outlined" / "sample_brcam2c_summary.json").read_bytes()
    capsys.readouterr()
    assert main(command[:-1] + ["--outlines", "--out", str(tmp_path / "outlined")]) == 0
    assert "already done with the same model and settings, kept" in capsys.readouterr().out
    assert main(command + ["--out", str(tmp_path / "outlined")]) == 2
    err = capsys.readouterr().err
    assert "holds results with other settings or another model" in err and "--overwrite" in err
    assert (tmp_path / "outlined" / "sample_brcam2c_summary.json").read_bytes() == kept


def test_train_outlines_command(consep: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["train-outlines", "--dataset", f"consep={consep}", "--run-dir", run, "--epochs", "1",
            "--iters-per-epoch", "2", "--batch-size", "8", "--lr", "0.001", "--threads", "1", "--quiet"]
    done = run_denuc(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"model: {run / 'best.safetensors'} (epoch 1, validation mean star IoU 0.")
    recipe = json.loads((run / "config.json").read_text())
    assert (recipe["epochs"], recipe["iters_per_epoch"], recipe["batch_size"], recipe["lr"], recipe["threads"]) == (
        1, 2, 8, 0.001, 1)
    assert recipe["datasets"] == [{"name": "consep", "root": str(consep)}]
    assert hub.describe(run / "best.safetensors")["kind"] == "outline"

    assert recipe["model"]["mpp"] == 0.5  # the default detector's pixel size

    behind_precise = run_denuc(*argv[:3], "--run-dir", tmp_path / "precise", "--detector", "precise", *argv[5:])
    assert behind_precise.returncode == 0, behind_precise.stderr
    assert json.loads((tmp_path / "precise" / "config.json").read_text())["model"]["mpp"] == 0.33
    outliner = Outliner.from_pretrained(tmp_path / "precise" / "best.safetensors")
    assert outliner.config.mpp == 0.33
    precise = Detector.from_pretrained("precise")
    assert outliner.sharing(precise) is not precise  # one pass behind precise gives points and outlines

    assert main([str(a) for a in argv]) == 2  # a trained run is not replaced silently
    err = capsys.readouterr().err
    assert "holds a trained run" in err and "--resume" in err and "--overwrite" in err
    assert main([str(a) for a in argv] + ["--resume"]) == 0  # every epoch done: nothing to add
    assert len(json.loads((run / "log.json").read_text())) == 1


def test_train_outlines_refuses_a_dataset_without_outlines_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "brcam2c"
    root.mkdir()
    (root / "brca_ds_train.txt").write_text("img.png\n")
    done = run_denuc("train-outlines", "--dataset", f"brcam2c={root}", "--run-dir", tmp_path / "run", "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"denuc train-outlines: error: {root}: brcam2c has no instance outlines to "
                                        "train an outline head on"]
    assert not (tmp_path / "run").exists()


def test_onnx_network_gives_the_torch_radii() -> None:
    """The head's network in ONNX Runtime (the CPU default) and in PyTorch give the same outlines."""
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))[:300, :260]
    xy = np.random.default_rng(0).uniform(0, 250, (40, 2))
    torch_radii = Outliner.from_pretrained("default-outlines", runtime="torch").radii(image, xy)
    onnx_radii = Outliner.from_pretrained("default-outlines", runtime="onnx").radii(image, xy)
    assert np.abs(torch_radii - onnx_radii).max() < 1e-3
