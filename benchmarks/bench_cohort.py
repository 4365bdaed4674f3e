"""Cohort throughput on this machine: 8 copies of a slide, sequential vs Dask local:1 vs local:2, slides per hour;
and, on one CPU, how long the model waits for tiles.

    python benchmarks/bench_cohort.py [--model default-bundle] [--detector-only] [--copies 8] [--repeats 3]
        [--out benchmarks/results/cohort/cohort.json]

Cohort: a folder of ``--copies`` symbolic links to ../shared/slides/CMU-1-Small-Region.svs (2220 x 2967 px,
0.499 um/px, 45 tissue tiles for the default bundle). Each setting is one end-to-end ``denuc predict FOLDER
--out NEW_FOLDER --quiet`` in a fresh process, timed from launch to exit (importing, starting the workers,
loading the model in each, every slide's outputs, the cohort table): ``sequential`` (no --cluster: the loop
over slides in one process, torch's threads on every core), ``local:1`` and ``local:2`` (``--cluster local:N``:
N worker processes, the cores shared out among them). The settings are interleaved within each round, so other
load on the machine hits them alike; the median over rounds is reported, with each round's wall time and the
load averages around it.

Waiting for input (``one_cpu``): ``predict_slide`` on one slide in a child pinned to one core (torch and ONNX
Runtime on 1 thread), with 0 tile-reading threads (reading in the model's thread) and 2 (reading ahead);
the summary's ``timing_s`` says where the time went: ``waiting_for_tiles`` is what the model's thread spent
waiting for tiles, ``model`` the networks, and the stages that do not overlap the model: ``level_in_memory``
(decoding a level that is read whole), ``tissue_mask``, ``assemble_outputs``. Slides: CMU (one level, decoded
whole before the model starts) and bench_slide.py's pyramidal TIFF of four times its area (tiles read from
disk while the model runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLIDES = Path(os.environ.get("DENUC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("sequential", "local:1", "local:2")


def cohort_run(setting: str, folder: Path, out: Path, model: str, detector_only: bool) -> dict:
    """One end-to-end `denuc predict` over the folder; wall time, throughput and the per-slide rows."""
    command = [sys.executable, "-m", "denuc.cli", "predict", str(folder), "--out", str(out), "--model", model,
               "--quiet"]
    if detector_only:
        command.append("--detector-only")
    if setting != "sequential":
        command += ["--cluster", setting]
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    wall = time.perf_counter() - started
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*_summary.json"))]
    slides = len(summaries)
    return {"setting": setting, "wall_s": wall, "slides": slides, "slides_per_hour": slides / wall * 3600,
            "slide_runtime_s": [s["runtime_s"] for s in summaries],
            "model_s": [s["timing_s"]["model"] for s in summaries],
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def one_cpu_child(slide: str, reading_threads: int, model: str, detector_only: bool, out: str) -> dict:
    """In the child: one core, one thread for the networks; the summary's timings."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    from denuc.inference.cohort import ModelSpec
    from denuc.inference.slide import predict_slide
    from denuc.io.slides import open_slide

    pipeline = ModelSpec(model, detector_only).load()
    started = time.perf_counter()
    with open_slide(slide) as opened:
        summary = predict_slide(opened, pipeline, out, workers=reading_threads, progress=False)
    wall = time.perf_counter() - started
    timing = summary["timing_s"]
    return {"slide": Path(slide).name, "reading_threads": reading_threads,
            "tiles": summary["tiles"]["processed"], "wall_s": wall, "timing_s": timing,
            "model_share": timing["model"] / wall, "waiting_for_tiles_share": timing["waiting_for_tiles"] / wall,
            # before the first tile and after the last: the model has nothing to do
            "serial_stages_share": (timing["level_in_memory"] + timing["tissue_mask"] + timing["assemble_outputs"])
            / wall,
            "runtime": summary["settings"]["runtime"]}


def one_cpu(slide: Path, reading_threads: int, model: str, detector_only: bool, out: Path) -> dict:
    command = [sys.executable, __file__, "--one-cpu-child", str(slide), "--child-reading-threads",
               str(reading_threads), "--child-out", str(out), "--model", model]
    if detector_only:
        command.append("--detector-only")
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-bundle", help="shipped name or file (default: %(default)s)")
    parser.add_argument("--detector-only", action="store_true", help="detect only (the model's detector)")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three settings (median kept)")
    parser.add_argument("--out", type=Path, default=RESULTS / "cohort" / "cohort.json")
    parser.add_argument("--one-cpu-child", help=argparse.SUPPRESS)
    parser.add_argument("--child-reading-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_cpu_child:
        print(json.dumps(one_cpu_child(args.one_cpu_child, args.child_reading_threads, args.model, args.detector_only,
                                       args.child_out)))
        return
    if not CMU.is_file():
        sys.exit(f"benchmark slide not found: {CMU}")

    from bench_slide import build_4x_slide
    from common import write_result

    from denuc.inference.slide import software_versions

    rounds: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    waiting = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cohort"
        folder.mkdir()
        for k in range(args.copies):
            (folder / f"CMU-1-copy{k}.svs").symlink_to(CMU)
        # a first, untimed run exports the ONNX graphs into the cache, as a user's earlier runs would have
        cohort_run("sequential", folder, Path(tmp) / "warm-up", args.model, args.detector_only)
        for i in range(args.repeats):
            order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                run = cohort_run(setting, folder, Path(tmp) / f"out-{i}-{setting.replace(':', '')}", args.model,
                                 args.detector_only)
                rounds[setting].append(run)
                print(f"round {i}: {setting:10s} {run['wall_s']:6.1f} s, {run['slides_per_hour']:6.0f} slides/h "
                      f"(load {run['load_average_before'][0]:.1f})", flush=True)
        big = Path(tmp) / "CMU-1-Small-Region-4x.tif"
        build_4x_slide(big)
        for slide in (CMU, big):
            for threads in (0, 2):
                result = one_cpu(slide, threads, args.model, args.detector_only,
                                 Path(tmp) / f"one-cpu-{slide.stem}-{threads}")
                waiting.append(result)
                print(f"one CPU, {result['slide']}, {threads} reading threads: {result['wall_s']:.1f} s, model "
                      f"{result['timing_s']['model']:.1f} s, waiting for tiles "
                      f"{result['timing_s']['waiting_for_tiles']:.1f} s", flush=True)

    summary = {}
    for setting, runs in rounds.items():
        walls = [r["wall_s"] for r in runs]
        summary[setting] = {"wall_s_median": statistics.median(walls), "wall_s_rounds": walls,
                            "slides_per_hour_median": statistics.median(r["slides_per_hour"] for r in runs),
                            "slide_runtime_s_median": statistics.median(s for r in runs for s in r["slide_runtime_s"])}
    results = {
        "slide": CMU.name, "copies": args.copies, "model": args.model,
        "mode": "detection only" if args.detector_only else "full (detector + classifier)",
        "summary": summary,
        "speedup_local2_vs_local1": summary["local:1"]["wall_s_median"] / summary["local:2"]["wall_s_median"],
        "speedup_local2_vs_sequential": summary["sequential"]["wall_s_median"] / summary["local:2"]["wall_s_median"],
        "rounds": rounds, "one_cpu": waiting,
        "cpu_count": os.cpu_count(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "contention": "the machine's cores were shared with other jobs during the run: see each round's load "
                      "averages; the settings were interleaved so that load hit them alike",
        "versions": software_versions(),
    }
    write_result(args.out, results, models=[args.model], kind=None if args.detector_only else "bundle")
    print(json.dumps(summary, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
