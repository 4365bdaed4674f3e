"""Whole-image detection on CPU: the PyTorch path before and after the fast-path changes, ONNX Runtime, tile sizes.

    python benchmarks/bench_detect_fastpath.py [--model PATH] [--side 2048] [--repeats 3]

Input: a side x side mosaic of the BRCAM2C test images (real H&E, already at 0.5 um/px, so no resampling).
Each variant detects on the whole mosaic; variants run interleaved (one repeat of each in turn, after one
warm-up round) so that load from other processes on this shared machine falls on all of them alike; the
median of the repeats is reported. Each run's time is split into the network's forward pass, per-tile
post-processing (score threshold, point NMS) and the rest (tiling, tile ownership, cross-tile NMS).
A raw forward-pass comparison adds OpenVINO when it is installed.

Without ``--model`` the detector is randomly initialised (speed does not depend on weight values) and its
score threshold is set so that it finds as many points per mm^2 as the test images' ground truth has, which
keeps the post-processing load realistic. Writes benchmarks/results/speed/fastpath.json.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, write_result

from denuc.config import DetectorConfig
from denuc.datasets import get_dataset
from denuc.inference.detect import Detector, make_detector
from denuc.inference.runtime import OnnxBackend, export_onnx
from denuc.inference.tiling import tile_origins
from denuc.io.images import read_image
from denuc.models.detector import PointDetector

BRCAM2C = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "brcam2c"


def versions() -> dict:
    import onnxruntime

    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
             "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        found["openvino"] = openvino.__version__
    except ImportError:
        pass
    return found


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def mosaic_of_test_images(side: int) -> tuple[np.ndarray, float]:
    """A side x side mosaic of BRCAM2C test images, and their ground-truth nuclei per pixel."""
    samples = get_dataset("brcam2c", BRCAM2C).samples("test")
    images = [read_image(s.image_path) for s in samples]
    density = sum(len(s.nuclei) for s in samples) / sum(i.shape[0] * i.shape[1] for i in images)
    crop = min(min(i.shape[:2]) for i in images)
    per_side = -(-side // crop)
    rows = [np.concatenate([images[(r * per_side + c) % len(images)][:crop, :crop] for c in range(per_side)], 1)
            for r in range(per_side)]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:side, :side]), density


def calibrated_model(mosaic: np.ndarray, density: float) -> PointDetector:
    """A random detector whose score threshold passes ``density`` points per pixel on the mosaic."""
    torch.manual_seed(0)
    model = PointDetector(DetectorConfig()).eval()
    scores = Detector(copy.deepcopy(model)).forward(mosaic[None, :512, :512])[0].numpy().ravel()
    passing = density * model.stride ** 2  # fraction of anchors (one per stride^2 pixels) to keep
    model.config.score_threshold = float(np.quantile(scores, 1 - passing))
    return model


class Timed:
    """A detector with its forward pass and per-tile detection timed (seconds summed since ``reset``)."""

    def __init__(self, detector: Detector, threads: int) -> None:
        self.detector, self.threads = detector, threads
        self.forward_s = self.tiles_s = 0.0
        forward, detect_tiles = detector.forward, detector.detect_tiles

        def timed_forward(tiles):
            started = time.perf_counter()
            try:
                return forward(tiles)
            finally:
                self.forward_s += time.perf_counter() - started

        def timed_detect_tiles(tiles):
            started = time.perf_counter()
            try:
                return detect_tiles(tiles)
            finally:
                self.tiles_s += time.perf_counter() - started

        # instance attributes shadow the methods: detect_tiles calls self.forward, detect calls self.detect_tiles
        detector.forward, detector.detect_tiles = timed_forward, timed_detect_tiles

    def run(self, image: np.ndarray, batch_size: int) -> dict:
        self.forward_s = self.tiles_s = 0.0
        default = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        found = self.detector.detect(image, mpp=self.detector.config.mpp, batch_size=batch_size)
        total = time.perf_counter() - started
        torch.set_num_threads(default)
        return {"total_s": total, "forward_s": self.forward_s, "tile_postprocess_s": self.tiles_s - self.forward_s,
                "tiling_and_merge_s": total - self.tiles_s, "points": len(found)}


def interleaved(runs: dict[str, Callable[[], dict]], repeats: int) -> dict[str, dict]:
    """Median over ``repeats`` rounds (after a warm-up round) of each field of each run's result."""
    rounds: dict[str, list[dict]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            result = run()
            if round_index:
                rounds[name].append(result)
            print(f"  round {round_index} {name}: {result}", flush=True)
    return {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for name, results in rounds.items()}


def raw_forward(model: PointDetector, repeats: int) -> dict[str, dict]:
    """ms per 256^2-equivalent of input for the network alone, per runtime, at 8 x 256^2 and 1 x 1024^2."""
    import onnxruntime

    buffer = io.BytesIO()
    export_onnx(copy.deepcopy(model), buffer)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    contiguous = copy.deepcopy(model)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    runtimes: dict[str, Callable[[np.ndarray], object]] = {
        "torch (contiguous weights)": lambda x: contiguous(torch.from_numpy(x).contiguous(
            memory_format=torch.channels_last)),
        "torch (channels-last weights)": lambda x: channels_last(torch.from_numpy(x).contiguous(
            memory_format=torch.channels_last)),
        "onnxruntime": lambda x: session.run(None, {"images": x}),
    }
    try:
        import openvino

        compiled = openvino.Core().compile_model(
            openvino.Core().read_model(buffer.getvalue()), "CPU",
            {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        runtimes["openvino (f32)"] = lambda x: request.infer({0: x})
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    shapes = {"8x256": (8, 3, 256, 256), "1x1024": (1, 3, 1024, 1024)}
    runs = {}
    for shape_name, shape in shapes.items():
        x = rng.uniform(0, 255, shape).astype(np.float32)
        units = shape[0] * shape[2] * shape[3] / 256 ** 2

        def timed(fn=None, x=x, units=units):
            started = time.perf_counter()
            with torch.inference_mode():
                fn(x)
            return {"ms_per_256_tile": (time.perf_counter() - started) * 1000 / units}

        for name, fn in runtimes.items():
            runs[f"{shape_name} {name}"] = lambda fn=fn, timed=timed: timed(fn)
    return interleaved(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a trained detector (.safetensors); default: random weights")
    parser.add_argument("--side", type=int, default=2048, help="mosaic side in pixels (0.5 um/px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed" / "fastpath.json")
    args = parser.parse_args()

    mosaic, density = mosaic_of_test_images(args.side)
    if args.model:
        model = Detector.from_pretrained(args.model).model
    else:
        model = calibrated_model(mosaic, density)
    area_mm2 = mosaic.shape[0] * mosaic.shape[1] * (model.config.mpp * 1e-3) ** 2
    print(f"mosaic {mosaic.shape[1]}x{mosaic.shape[0]} px = {area_mm2:.3f} mm^2; threshold "
          f"{model.config.score_threshold:.4f}", flush=True)

    threads = torch.get_num_threads()
    variants = {  # name: (runtime, tile size, weights as before this change, threads)
        "torch, tile 256 (before: contiguous weights)": ("torch", 256, True, threads),
        "torch, tile 256, channels-last weights": ("torch", 256, False, threads),
        "torch, tile 256, channels-last weights, 1 thread": ("torch", 256, False, 1),
        "onnx, tile 256": ("onnx", 256, False, threads),
        "torch, tile 512, channels-last weights": ("torch", 512, False, threads),
        "onnx, tile 512": ("onnx", 512, False, threads),
        "onnx, tile 512, 1 thread": ("onnx", 512, False, 1),
        "onnx, tile 1024": ("onnx", 1024, False, threads),
    }
    detectors = {}
    for name, (runtime, tile, before, count) in variants.items():
        own = copy.deepcopy(model)
        own.config = replace(own.config, tile_size=tile)
        if before:
            detector = Detector(own)
            detector.model.to(memory_format=torch.contiguous_format)  # undo the fast path's weight layout
        elif runtime == "onnx":
            detector = Detector(own, backend=OnnxBackend(own, threads=count))
        else:
            detector = make_detector(own, runtime=runtime)
        detectors[name] = Timed(detector, count)
    batch = {name: max(1, args.batch_size * 256 ** 2 // variants[name][1] ** 2) for name in variants}
    print("whole-image detection:", flush=True)
    medians = interleaved({name: (lambda t=t, b=batch[name]: t.run(mosaic, b)) for name, t in detectors.items()},
                          args.repeats)
    whole_image = {}
    for name, m in medians.items():
        runtime, tile, _, count = variants[name]
        tiles = len(tile_origins(args.side, tile, 32)) ** 2
        whole_image[name] = {"runtime": runtime, "threads": count, "tile_size": tile, "tile_overlap": 32,
                             "batch_size": batch[name],
                             "tiles": tiles, **m, "s_per_mm2": m["total_s"] / area_mm2}
    print("network forward pass alone:", flush=True)
    forward = raw_forward(model, args.repeats)

    results = {
        "script": "benchmarks/bench_detect_fastpath.py", "machine": machine(), "versions": versions(),
        "model": str(args.model) if args.model else "random init, shufflenet_v2_x0_5, threshold calibrated",
        "config": json.loads(model.config.to_json()), "mosaic_px": list(mosaic.shape[:2]),
        "area_mm2": area_mm2, "ground_truth_points_per_mm2": density / (model.config.mpp * 1e-3) ** 2,
        "repeats": args.repeats, "whole_image": whole_image, "forward_only": forward,
    }
    print(f"\n{'variant':48s} {'s/mm^2':>7s} {'forward':>8s} {'tile pp':>8s} {'tiling':>8s} {'points':>7s}")
    for name, r in whole_image.items():
        print(f"{name:48s} {r['s_per_mm2']:7.3f} {r['forward_s']:8.3f} {r['tile_postprocess_s']:8.3f} "
              f"{r['tiling_and_merge_s']:8.3f} {r['points']:7.0f}")
    for name, r in forward.items():
        print(f"forward {name:44s} {r['ms_per_256_tile']:7.1f} ms per 256^2")
    write_result(args.out, results, models=[args.model] if args.model else [])
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
