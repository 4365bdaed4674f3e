"""Would INT8 help the CPU fast path? The ONNX detector quantised by ONNX Runtime, against float32, side by side.

    python benchmarks/bench_int8.py [--model default] [--calibration-tiles 64] [--repeats 15]
        [--out benchmarks/results/speed/int8.json]

The detector is exported as ``runtime="onnx"`` exports it, then statically quantised (QDQ format, per-channel
int8 weights, uint8 activations; calibrated on 256^2 crops of BRCAM2C and CRCHisto *train* images). Both
sessions run in the shipped ``OnnxBackend`` (its threads and settings). Reported:
milliseconds per tile on batches of 8 real tiles (the sessions alternate within each round, median round), and
detection F1 on the *validation* splits of both datasets (`denuc` protocol, 3 um) with each session inside the
same ``Detector`` (tiling, threshold and NMS unchanged). Validation, not test: this decides a default.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import RESULTS, write_result
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from PIL import Image

from denuc.datasets import get_dataset
from denuc.inference.detect import Detector
from denuc.inference.runtime import OnnxBackend, export_onnx
from denuc.metrics.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {"brcam2c": SHARED / "brcam2c", "crchisto": SHARED / "crchisto"}
TILE = 256


def crops(split: str, count: int, seed: int) -> np.ndarray:
    """``count`` random TILE^2 crops (RGB uint8) of the split's images, alternating datasets."""
    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.open(s.image_path).convert("RGB"))
              for name, root in DATASETS.items() for s in get_dataset(name, root).samples(split)]
    out = []
    for k in range(count):
        image = images[rng.integers(len(images))]
        y, x = rng.integers(image.shape[0] - TILE + 1), rng.integers(image.shape[1] - TILE + 1)
        out.append(image[y:y + TILE, x:x + TILE])
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--calibration-tiles", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed" / "int8.json")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    float32 = Detector.from_pretrained(args.model, runtime="onnx")
    with io.BytesIO() as buffer:
        export_onnx(float32.model, buffer)
        graph = buffer.getvalue()
    calibration = crops("train", args.calibration_tiles, seed=0).transpose(0, 3, 1, 2).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"images": calibration[i:i + 8]} for i in range(0, len(calibration), 8))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    folder = args.out.parent / ".int8_tmp"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "float32.onnx").write_bytes(graph)
    quant_pre_process(str(folder / "float32.onnx"), str(folder / "prepared.onnx"))
    quantize_static(str(folder / "prepared.onnx"), str(folder / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    int8 = Detector(float32.model, backend=OnnxBackend(float32.model, graph=(folder / "int8.onnx").read_bytes()))
    size_mb = {"float32": len(graph) / 1e6, "int8": (folder / "int8.onnx").stat().st_size / 1e6}
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()

    detectors = {"float32": float32, "int8": int8}
    batch = crops("val", 8, seed=1)
    for detector in detectors.values():
        detector.forward(batch)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in detectors}
    for _ in range(args.repeats):
        for name, detector in detectors.items():
            begin = time.perf_counter()
            detector.forward(batch)
            rounds[name].append((time.perf_counter() - begin) * 1000 / len(batch))

    results = {"model": args.model, "threads": threads, "onnxruntime": onnxruntime.__version__,
               "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "repeats": args.repeats,
               "quantisation": "static QDQ, per-channel int8 weights, uint8 activations, "
                               f"{args.calibration_tiles} train crops of {TILE}^2", "variants": {}}
    for name, detector in detectors.items():
        row = {"ms_per_tile": statistics.median(rounds[name]), "graph_mb": size_mb[name], "validation": {}}
        for dataset, root in DATASETS.items():
            pairs = [(s.name, detector.detect(s.image_path, mpp=s.nuclei.mpp), s.nuclei)
                     for s in get_dataset(dataset, root).samples("val")]
            det = evaluate(pairs, radius_um=3.0).detection
            row["validation"][dataset] = {"precision": det.precision, "recall": det.recall, "f1": det.f1,
                                          "tp": det.tp, "fp": det.fp, "fn": det.fn}
        results["variants"][name] = row
        print(f"{name:8s} {row['ms_per_tile']:.2f} ms/tile (median of {args.repeats}), graph {row['graph_mb']:.2f} MB, "
              + ", ".join(f"{d} val F1 {v['f1']:.4f} (P {v['precision']:.3f} R {v['recall']:.3f})"
                          for d, v in row["validation"].items()))
    speedup = results["variants"]["float32"]["ms_per_tile"] / results["variants"]["int8"]["ms_per_tile"]
    results["int8_speedup"] = speedup
    print(f"int8 speed-up: {speedup:.2f}x")
    write_result(args.out, results, models=[args.model])
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
