"""Side-by-side CPU speed of denuc and the tools users compare it with, in one run on the same machine.

    python benchmarks/bench_peers.py [--repeats 2] [--batch 4] [--threads N] [--skip-encoders]

Parts, all with random weights (speed does not depend on weight values), written to
benchmarks/results/peers/peers.json:

1. Networks per tile: the denuc detector at each width, HoVer-Net (original 270 -> 80, fast 256 -> 164),
   CellViT-256 and a StarDist 2D_versatile_he U-Net (re-implementations: see peer_models.py). Every model
   gets the same batch of random tiles at its native input size; rounds run every model once, in turn, after
   a warm-up round, so load from other processes falls on all alike; the median round is reported. Seconds
   per mm^2 count only each model's valid output (HoVer-Net's central crop; all of a same-padded output).
2. Post-processing: HoVer-Net's watershed (its reference ``process_np_hv``) on maps drawn from synthetic
   nuclei at the density of the BRCAM2C ground truth, and denuc's point NMS on candidates around them.
3. Classification-stage encoders (compact CNN, ViT-L/16 as in UNI, ViT-H/14 as in UNI2-h) per mm^2.
4. Scoring: denuc's greedy matcher against a brute-force re-implementation of the paper code's greedy loop:
   identical pairs on random inputs, and the time of each at 10k x 10k points.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402
from peer_models import CellViT256, HoVerNet, StarDistUNet  # noqa: E402

from denuc.config import DetectorConfig  # noqa: E402
from denuc.inference.detect import make_detector  # noqa: E402
from denuc.inference.nms import point_nms  # noqa: E402
from denuc.metrics.matching import greedy_match  # noqa: E402
from denuc.models.detector import PointDetector, count_parameters  # noqa: E402
from denuc.models.encoders import create_encoder  # noqa: E402

NUCLEI_PER_MM2 = 10_000  # order of the BRCAM2C ground truth's density (about 1 per 100 um^2)


def mm2(pixels: float, mpp: float) -> float:
    return pixels * (mpp * 1e-3) ** 2


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds, after a warm-up round, all run in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            if round_index:
                times[name].append(seconds)
            print(f"  round {round_index} {name}: {seconds:.3f} s", flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def networks(batch: int, repeats: int) -> list[dict]:
    """ms per tile and s per mm^2 of valid output of every network, each at its native input size."""
    models = [(f"denuc {w}", PointDetector(DetectorConfig(backbone=w)), 256, 256, [0.5, 0.25],
               f"denuc.models.detector.PointDetector (head stride {DetectorConfig().head_stride})")
              for w in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x2_0", "resnet50")]
    models += [
        ("HoVer-Net original", HoVerNet("original"), 270, 80, [0.25], "re-implementation (peer_models.py)"),
        ("HoVer-Net fast", HoVerNet("fast"), 256, 164, [0.25], "re-implementation (peer_models.py)"),
        ("CellViT-256", CellViT256(), 256, 256, [0.25], "re-implementation (peer_models.py), timm ViT-S/16"),
        ("StarDist 2D_versatile_he U-Net", StarDistUNet(), 256, 256, [0.5, 0.25],
         "re-implementation in PyTorch (peer_models.py)"),
    ]
    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (batch, 3, 270, 270)).astype(np.float32))
    runs = {}
    for name, model, side, _, _, _ in models:
        model.eval()
        x = tiles[:, :, :side, :side].contiguous()  # PyTorch's default layout, as the reference code runs

        def run(model=model, x=x) -> None:
            with torch.inference_mode():
                model(x)

        runs[name] = run
    # denuc's CPU fast path: the shipped widths (0.5x "fast", 1.0x "default") in ONNX Runtime, each listed
    # after its PyTorch row
    onnx_input = tiles[:, :, :256, :256].numpy().copy()
    for width in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0"):
        onnx = make_detector(PointDetector(DetectorConfig(backbone=width)), runtime="onnx")
        name = f"denuc {width}, onnxruntime"
        position = [m[0] for m in models].index(f"denuc {width}") + 1
        models.insert(position, (name, onnx.model, 256, 256, [0.5, 0.25], "denuc.inference.runtime (runtime='onnx')"))
        runs[name] = lambda session=onnx.backend.session: session.run(None, {"images": onnx_input})
    print(f"networks, batch {batch}:", flush=True)
    seconds = interleaved(runs, repeats)
    rows = []
    for name, model, side, valid, mpps, source in models:
        ms = seconds[name] * 1000 / batch
        rows.append({"model": name, "source": source, "params_m": round(count_parameters(model) / 1e6, 2),
                     "input_px": side, "valid_output_px": valid, "ms_per_tile": ms,
                     "s_per_mm2": {str(m): ms / 1000 / mm2(valid ** 2, m) for m in mpps}})
    return rows


def synthetic_nuclei(side: int, mpp: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres (x, y) at NUCLEI_PER_MM2 and an instance map of 3.5 um-radius disks around them."""
    n = rng.poisson(NUCLEI_PER_MM2 * mm2(side ** 2, mpp))
    xy = rng.uniform(0, side, (n, 2))
    radius = 3.5 / mpp
    instance = np.zeros((side, side), np.int32)
    yy, xx = np.mgrid[:side, :side]
    for k, (x, y) in enumerate(xy, start=1):
        y0, y1 = int(max(y - radius, 0)), int(min(y + radius + 1, side))
        x0, x1 = int(max(x - radius, 0)), int(min(x + radius + 1, side))
        disk = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= radius ** 2
        instance[y0:y1, x0:x1][disk] = k
    return xy, instance


def hovernet_maps(instance: np.ndarray) -> np.ndarray:
    """HoVer-Net's targets as a perfect network would output them: (H, W, 3) of np, h, v."""
    np_map = (instance > 0).astype(np.float32)
    hv = np.zeros((*instance.shape, 2), np.float32)
    from scipy import ndimage

    for k, box in enumerate(ndimage.find_objects(instance), start=1):
        if box is None:
            continue
        ys, xs = np.nonzero(instance[box] == k)
        for axis, coords in ((0, xs), (1, ys)):
            centred = coords - coords.mean()
            scale = np.abs(centred).max() or 1.0
            hv[box][ys, xs, axis] = centred / scale
    return np.dstack([np_map, hv])


def process_np_hv(pred: np.ndarray) -> np.ndarray:
    """HoVer-Net's watershed post-processing, as in vqdang/hover_net ``models/hovernet/post_proc.py``."""
    import cv2
    from scipy.ndimage import binary_fill_holes, label
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    blb_raw, h_dir_raw, v_dir_raw = pred[..., 0], pred[..., 1], pred[..., 2]
    blb = label(blb_raw >= 0.5)[0]
    blb = remove_small_objects(blb, max_size=9)
    blb[blb > 0] = 1
    h_dir = cv2.normalize(h_dir_raw, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v_dir = cv2.normalize(v_dir_raw, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelh = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=21)
    sobelv = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=21)
    sobelh = 1 - cv2.normalize(sobelh, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sobelv = 1 - cv2.normalize(sobelv, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sobelh, sobelv)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)
    overall = np.array(overall >= 0.4, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = binary_fill_holes(marker).astype("uint8")
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = label(marker)[0]
    marker = remove_small_objects(marker, max_size=9)
    return watershed(dist, markers=marker, mask=blb)


def post_processing(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    side_hv = 1024  # one HoVer-Net output mosaic at 0.25 um/px (0.066 mm^2)
    _, instance = synthetic_nuclei(side_hv, 0.25, rng)
    maps = hovernet_maps(instance)
    side_pt = 2048  # denuc candidates at 0.5 um/px (1.05 mm^2): a few anchors above threshold per nucleus
    centres, _ = synthetic_nuclei(side_pt, 0.5, rng)
    candidates = np.repeat(centres, 3, axis=0) + rng.normal(0, 1.0, (3 * len(centres), 2))
    scores = rng.random(len(candidates))
    radius = DetectorConfig().nms_radius_um / DetectorConfig().mpp
    print("post-processing:", flush=True)
    seconds = interleaved({"hovernet watershed": lambda: process_np_hv(maps),
                           "denuc point NMS": lambda: point_nms(candidates, scores, radius)}, repeats)
    found = int(process_np_hv(maps).max())
    kept = len(point_nms(candidates, scores, radius))
    return {
        "hovernet_watershed": {"px": side_hv, "mpp": 0.25, "nuclei_drawn": int(instance.max()),
                               "instances_found": found, "seconds": seconds["hovernet watershed"],
                               "s_per_mm2": seconds["hovernet watershed"] / mm2(side_hv ** 2, 0.25)},
        "denuc_point_nms": {"px": side_pt, "mpp": 0.5, "candidates": len(candidates), "kept": kept,
                            "radius_px": radius, "seconds": seconds["denuc point NMS"],
                            "s_per_mm2": seconds["denuc point NMS"] / mm2(side_pt ** 2, 0.5)},
    }


def encoders(repeats: int) -> list[dict]:
    """Forward time per 224^2 tile at 0.5 um/px (the resolution UNI and UNI2-h were trained at), batch 1."""
    specs = [("compact: timm resnet18", "timm:resnet18"), ("ViT-L/16 (UNI)", "uni"), ("ViT-H/14 (UNI2-h)", "uni2-h")]
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224)).astype(np.float32))
    runs, built = {}, {}
    for label, name in specs:
        started = time.perf_counter()
        encoder = create_encoder(name).eval()
        print(f"  built {label} in {time.perf_counter() - started:.0f} s", flush=True)
        built[label] = (name, count_parameters(encoder))

        def run(encoder=encoder) -> None:
            with torch.inference_mode():
                encoder(x)

        runs[label] = run
    print("encoders, one 224^2 tile:", flush=True)
    seconds = interleaved(runs, repeats)
    return [{"encoder": label, "name": built[label][0], "params_m": round(built[label][1] / 1e6, 1),
             "input_px": 224, "mpp": 0.5, "ms_per_tile": seconds[label] * 1000,
             "s_per_mm2": seconds[label] / mm2(224 ** 2, 0.5)} for label in runs]


def brute_force_greedy(pred_xy: np.ndarray, scores: np.ndarray, gt_xy: np.ndarray,
                       radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper code's loop: predictions by descending score, each takes the nearest free ground truth
    within ``radius`` (inclusive), scanning every ground-truth point."""
    free = np.ones(len(gt_xy), bool)
    pairs = []
    for i in np.argsort(-scores, kind="stable"):
        dist = np.hypot(gt_xy[:, 0] - pred_xy[i, 0], gt_xy[:, 1] - pred_xy[i, 1])
        dist[~free] = np.inf
        j = int(np.argmin(dist))
        if dist[j] <= radius:
            free[j] = False
            pairs.append((i, j))
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def matching(points: int) -> dict:
    rng = np.random.default_rng(0)
    trials = 0
    for seed in range(200):
        r = np.random.default_rng(seed)
        n, m = r.integers(0, 300, 2)
        # integer coordinates and few distinct scores make ties in distance and in score common
        pred, gt = r.integers(0, 60, (n, 2)).astype(float), r.integers(0, 60, (m, 2)).astype(float)
        scores = r.integers(0, 5, n).astype(float)
        radius = float(r.choice([0.0, 1.0, 2.0, 5.0]))
        expected = brute_force_greedy(pred, scores, gt, radius)
        found = greedy_match(pred, scores, gt, radius)
        if not all(np.array_equal(a, b) for a, b in zip(expected, found)):
            raise AssertionError(f"matcher differs from the brute-force loop (seed {seed})")
        trials += 1
    side = np.sqrt(points * 100.0)  # 1 point per 100 px^2, 6 px radius: nuclei at 0.5 um/px scored at 3 um
    pred, gt, scores = rng.uniform(0, side, (points, 2)), rng.uniform(0, side, (points, 2)), rng.random(points)
    timed = {}
    for name, fn in (("denuc greedy_match", greedy_match), ("brute-force loop", brute_force_greedy)):
        started = time.perf_counter()
        result = fn(pred, scores, gt, 6.0)
        timed[name] = (time.perf_counter() - started, result)
    same = all(np.array_equal(a, b) for a, b in zip(timed["denuc greedy_match"][1], timed["brute-force loop"][1]))
    return {"random_trials_identical": trials, "points": points, "radius_px": 6.0, "identical_at_size": same,
            "matches": len(timed["denuc greedy_match"][1][0]),
            "seconds": {name: t for name, (t, _) in timed.items()},
            "speedup": timed["brute-force loop"][0] / timed["denuc greedy_match"][0]}


def conditions(threads: int, batch: int, repeats: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads, "batch": batch,
            "repeats": repeats, "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__,
                         "torchvision": torchvision.__version__, "timm": timm.__version__, "numpy": np.__version__},
            "weights": "random init (speed does not depend on weight values)",
            "peer_implementations": "re-implemented in benchmarks/peer_models.py (tiatoolbox needs torch < 2.13)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--match-points", type=int, default=10_000)
    parser.add_argument("--skip-encoders", action="store_true", help="skip the (slow to build) ViT encoders")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers" / "peers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {"conditions": conditions(args.threads, args.batch, args.repeats)}
    results["networks"] = networks(args.batch, args.repeats)
    base = results["networks"][0]
    for row in results["networks"]:
        row["x_denuc_0_5x_ms_per_tile"] = row["ms_per_tile"] / base["ms_per_tile"]
    results["post_processing"] = post_processing(args.repeats)
    results["encoders"] = None if args.skip_encoders else encoders(args.repeats)
    results["matching"] = matching(args.match_points)

    print(f"\n{'model':34s} {'params':>7s} {'ms/tile':>9s} {'x denuc':>8s}  s/mm^2 (um/px)")
    for r in results["networks"]:
        per = ", ".join(f"{v:.2f} ({k})" for k, v in r["s_per_mm2"].items())
        print(f"{r['model']:34s} {r['params_m']:6.2f}M {r['ms_per_tile']:9.1f} "
              f"{r['x_denuc_0_5x_ms_per_tile']:8.1f}  {per}")
    for name, r in results["post_processing"].items():
        print(f"post-processing {name}: {r['s_per_mm2']:.3f} s/mm^2 at {r['mpp']} um/px")
    for r in results["encoders"] or []:
        print(f"encoder {r['encoder']:26s} {r['params_m']:7.1f}M {r['ms_per_tile']:9.0f} ms/224^2 tile "
              f"{r['s_per_mm2']:8.1f} s/mm^2")
    m = results["matching"]
    print(f"matching: identical on {m['random_trials_identical']} random trials and at {m['points']} points: "
          f"{m['identical_at_size']}; {m['seconds']} -> {m['speedup']:.0f}x")
    write_result(args.out, results)  # random weights: no model files
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
