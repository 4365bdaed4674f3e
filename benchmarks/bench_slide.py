"""Whole-slide prediction speed and memory on this CPU: `denuc predict` on a real SVS and a 4x larger slide.

    python benchmarks/bench_slide.py [--model default [--model fast ...]] [--repeats 3]
        [--out benchmarks/results/slide/slide.json]
    python benchmarks/bench_slide.py --normalise-stain --repeats 5 \
        --out benchmarks/results/slide/slide_normalise_stain.json   (without and with it, side by side)
    python benchmarks/bench_slide.py --device cuda --batch-size 32 --slide .gpu/slides/CMU-1-Small-Region.svs \
        --out $OUT/slide_gpu.json        (a GPU: PyTorch only; the slide wherever the machine has it)

Inputs: ../shared/slides/CMU-1-Small-Region.svs (2220 x 2967 px at 0.499 um/px, about 1.6 mm^2, of which
the tissue mask keeps about 0.64 mm^2), and a synthetic pyramidal TIFF of four times its area (its level 0
tiled 2 x 2, written with tifffile). Each run is a fresh child process (so its peak resident memory is its
own) that opens the slide, loads the model and runs ``predict_slide`` with the CLI's defaults (batch 8,
2 reading threads), with the networks in PyTorch and in ONNX Runtime. Reports wall time (end to end: opening
the slide, tissue mask, reading, model, writing every output), seconds per mm^2 of tissue, nuclei per second,
peak memory and where the time went, for detection only and for the full pipeline (detector + classifier)
when the model has a classifier. Several models are measured in the same rounds, interleaved. Runs on the
region are repeated and the median reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SLIDES = Path(__file__).resolve().parents[2] / "shared" / "slides"
# common.RESULTS; common itself is imported late, so that the timed child processes load only what they use
RESULTS = Path(__file__).resolve().parent / "results"
CMU = SLIDES / "CMU-1-Small-Region.svs"


def one_run(slide_path: str, model_name: str, detector_only: bool, runtime: str, out: str, device: str = "cpu",
            batch_size: int = 8, normalise: bool = False) -> dict:
    """Runs in the child: one slide, one model, fresh process. Returns the figures."""
    import torch

    from denuc.colour import StainNormaliser
    from denuc.hub import describe
    from denuc.inference.pipeline import Pipeline
    from denuc.inference.slide import predict_slide
    from denuc.io.slides import open_slide

    model = Pipeline.from_pretrained(model_name, runtime=runtime, device=device)
    if detector_only:
        model = Pipeline(model.detector)
    started = time.perf_counter()
    with open_slide(slide_path) as slide:
        colours = describe(model_name)["training_colours"] if normalise else None
        normaliser = None if colours is None else StainNormaliser.from_dict(colours)
        summary = predict_slide(slide, model, out, progress=False, model_name=model_name, batch_size=batch_size,
                                normaliser=normaliser)
    seconds = time.perf_counter() - started
    area = summary["tissue"]["area_mm2"]
    return {"model": model_name, "slide": Path(slide_path).name,
            "mode": "detection only" if model.classifier is None else "full", "normalise_stain": normalise,
            "runtime": runtime, "device": device, "batch_size": batch_size, "timing_s": summary["timing_s"],
            "classes": [c.name for c in model.classes], "wall_s": seconds, "tissue_mm2": area,
            "slide_mm2": summary["slide"]["dimensions"][0] * summary["slide"]["dimensions"][1]
            * summary["mpp"] ** 2 / 1e6,
            "tiles": summary["tiles"]["processed"], "nuclei": summary["nuclei"],
            "s_per_mm2_tissue": seconds / area, "nuclei_per_s": summary["nuclei"] / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else None}


def build_4x_slide(source: Path, path: Path) -> None:
    """A pyramidal TIFF of ``source``'s level 0 tiled 2 x 2 (four times the area), same pixel size."""
    from denuc.io.slides import open_slide, write_pyramidal_tiff

    with open_slide(source) as slide:
        w, h = slide.dimensions
        region = slide.read_region(0, 0, 0, w, h)
        mpp = slide.mpp
    write_pyramidal_tiff(path, np.tile(region, (2, 2, 1)), mpp)


def child(slide: Path, model: str, detector_only: bool, runtime: str, normalise: bool, out: Path, device: str,
          batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", str(slide), "--model", model, "--child-out", str(out),
               "--runtime", runtime, "--device", device, "--batch-size", str(batch_size)]
    if detector_only:
        command.append("--detector-only")
    if normalise:
        command.append("--normalise-stain")
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="shipped name or file; repeat to compare (default: default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "slide" / "slide.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting on the region (median kept)")
    parser.add_argument("--detector-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: PyTorch only there (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per batch (default: %(default)s, the CLI's)")
    parser.add_argument("--slide", type=Path, default=CMU, help="the region slide (default: %(default)s)")
    parser.add_argument("--normalise-stain", action="store_true",
                        help="instead: each model's full pipeline in ONNX Runtime (the CLI's) without and with "
                             "--normalise-stain, side by side")
    args = parser.parse_args()
    models = args.model or ["default"]
    if args.child:
        print(json.dumps(one_run(args.child, models[0], args.detector_only, args.runtime, args.child_out,
                                 args.device, args.batch_size, args.normalise_stain)))
        return
    if not args.slide.is_file():
        sys.exit(f"benchmark slide not found: {args.slide}")

    from common import write_result

    from denuc.inference.pipeline import Pipeline
    from denuc.inference.slide import software_versions

    with_classifier = [m for m in models if Pipeline.from_pretrained(m).classifier is not None]
    settings = [(m, d, r, False) for m in models for d in ([True, False] if m in with_classifier else [True])
                for r in (("torch", "onnx") if args.device == "cpu" else ("torch",))]
    if args.normalise_stain:
        settings = [(m, False, "onnx", n) for m in with_classifier for n in (False, True)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / f"{args.slide.stem}-4x.tif"
        build_4x_slide(args.slide, big)
        for slide, repeats in ((args.slide, args.repeats), (big, 1)):
            trials: dict[tuple[str, bool, str, bool], list[dict]] = {setting: [] for setting in settings}
            for i in range(repeats):  # settings interleaved within each round: other load hits all alike
                for k, setting in enumerate(settings):
                    out = Path(tmp) / f"out-{slide.stem}-{i}-{k}"
                    trials[setting].append(child(slide, *setting, out, args.device, args.batch_size))
            for (model, _, runtime, normalise), repeated in trials.items():
                r = sorted(repeated, key=lambda t: t["wall_s"])[len(repeated) // 2]
                r["repeats_wall_s"] = [t["wall_s"] for t in repeated]
                runs.append(r)
                where = ", ".join(f"{k} {v:.2f}" for k, v in r["timing_s"].items())
                print(f"{r['slide']:28s} {model:8s} {r['mode']:15s} {runtime:5s}"
                      f"{' normalised' if normalise else ''} {r['tissue_mm2']:.2f} mm^2 tissue, "
                      f"{r['tiles']} tiles, {r['nuclei']} nuclei: {r['wall_s']:.2f} s (median of {repeats}), "
                      f"{r['s_per_mm2_tissue']:.2f} s/mm^2, {r['nuclei_per_s']:.0f} nuclei/s, "
                      f"peak {r['peak_rss_mb']:.0f} MB\n    time (s): {where}")
    for model in set(models) - set(with_classifier):
        print(f"model {model!r} has no classifier: the full pipeline was not measured for it")
    results = {"models": models, "full_pipeline_measured": with_classifier, "runs": runs, "device": args.device,
               "cpu_count": os.cpu_count(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "load_average_at_start": os.getloadavg(), "versions": software_versions()}
    write_result(args.out, results, models=models, kind="bundle")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
