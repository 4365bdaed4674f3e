"""The tables of docs/pixel_size.md, read off the saved results (nothing is measured here):

    python benchmarks/mpp_tables.py            # prints every table, in Markdown, headed by its section
    python benchmarks/mpp_tables.py --check    # exit 1 when docs/pixel_size.md lacks one of them, as printed

Sources: ``results/mpp/mpp_fit.json`` (``bench_mpp.py --fit``), ``results/mpp/mpp_auto.json`` (``bench_mpp.py``),
``results/mpp/plausibility.json`` (``bench_mpp.py --plausibility``), and for the cost of the estimate next to a
run, ``results/slide/slide.json`` and ``results/speed/fastpath.json``. tests/test_mpp.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "pixel_size.md"
ORDER = ("brcam2c", "crchisto", "consep", "monuseg")
APPROACHES = {"A_detector_peak": "A: the detector sweep's peak", "B_blob_size": "B: the apparent blob size",
              "C_conditional_logit": "C: conditional logit, detector + blob evidence (shipped)",
              "D_conditional_logit_detector_only": "D: conditional logit, detector evidence only"}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def accuracy_row(label: str, figures: dict) -> str:
    return (f"| {label} | {figures['images']} | {pct(figures['within_15pct'])} | {pct(figures['within_25pct'])} | "
            f"{pct(figures['median_abs_rel_error'])} | {pct(figures['off_by_factor_1_5_or_more'])} |")


ACCURACY_HEADER = ("| which | estimates | within 15% | within 25% | median abs. error | off by 1.5x or more |\n"
                   "|---|---|---|---|---|---|")


def accuracy_table(result: dict) -> str:
    """One ``bench_mpp.table`` result: all, each dataset (its three pixel sizes together), each pixel size."""
    rows = [accuracy_row("all", result["all"])]
    rows += [accuracy_row(d, result[d]["all"]) for d in ORDER if d in result]
    rows += [accuracy_row(f"at {key.split()[1]} um/px", value) for key, value in result.items()
             if key.startswith("scale ")]
    return "\n".join([ACCURACY_HEADER, *rows])


def fit_section() -> str:
    fit = load("mpp/mpp_fit.json")
    rows = ["| approach | leave one dataset out: within 15% | within 25% | off by 1.5x+ | 5-fold by image: "
            "within 15% | within 25% | off by 1.5x+ |", "|---|---|---|---|---|---|---|"]
    for key, label in APPROACHES.items():
        cells = []
        for scheme in ("leave_one_dataset_out", "5_fold_by_image"):
            f = fit["approaches"][key][scheme]["sharp_and_blurred"]["all"]
            cells += [pct(f["within_15pct"]), pct(f["within_25pct"]), pct(f["off_by_factor_1_5_or_more"])]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    dev = ", ".join(f"{d} {n}" for d, n in fit["dev_images"].items())
    return (f"Dev images (train splits): {dev}; each at {', '.join(map(str, fit['scales']))} um/px, sharp and "
            f"blurred ({sum(fit['dev_images'].values()) * len(fit['scales']) * 2} estimates per approach). "
            f"Rule, {fit['rule']}. Chosen: {APPROACHES[fit['chosen']].split(': ')[0]}.\n\n" + "\n".join(rows))


def auto_section() -> str:
    auto = load("mpp/mpp_auto.json")
    images = ", ".join(f"{d} {n}" for d, n in auto["images"].items())
    no_answer = sum(1 for r in auto["per_image"] if r["estimate"] is None or math.isnan(r["estimate"]))
    seconds = auto["seconds_per_estimate"]
    parts = [f"Images: {images} (CoNSeP: {auto['consep_crops_per_source_image']} crops of 256 px per source "
             f"image), each at {', '.join(map(str, auto['scales']))} um/px: {auto['all']['all']['images']} "
             f"estimates; {no_answer} without an answer (counted as wrong).",
             "**All images** (dev and held-out):", accuracy_table(auto["all"]),
             "**Held-out images only** (val/test splits, never seen by the fit):", accuracy_table(auto["held_out"])]
    blur = [accuracy_row("sharp", auto["held_out_0.5_sharp"]["all"]),
            accuracy_row("blurred (Gaussian, 1.5 native px)", auto["held_out_0.5_blur_1.5"]["all"])]
    parts += ["**Blur** (held-out images at 0.5 um/px):", "\n".join([ACCURACY_HEADER, *blur])]
    calibration = ["| confidence | estimates | mean confidence | observed within 15% |", "|---|---|---|---|"]
    for band in auto["confidence_calibration"]["held_out"]:
        calibration.append(f"| {band['confidence'][0]:g}-{band['confidence'][1]:g} | {band['images']} | "
                           f"{pct(band['mean_confidence'])} | {pct(band['observed_within_15pct'])} |")
    parts += ["**Confidence** (held-out images): the model's probability of being within 15%, against what was "
              "observed:", "\n".join(calibration)]
    slides = ["| slide | metadata | estimate | confidence | windows | seconds |", "|---|---|---|---|---|---|"]
    for s in auto["slides"]:
        stated = "none" if s["metadata_mpp"] is None else f"{s['metadata_mpp']:g} um/px"
        slides.append(f"| {s['slide']} | {stated} | {s['estimate']:.3f} um/px | {s['confidence']:.2f} | "
                      f"{s['windows']} | {s['seconds']:.1f} |")
    parts += ["**Slides** (two 1,024 px squares of tissue each):", "\n".join(slides)]
    parts.append(f"Time per estimate, {seconds['threads']} torch thread: median {seconds['median']:.2f} s, p95 "
                 f"{seconds['p95']:.2f} s (end to end, {len(auto['end_to_end']['runs'])} runs: median "
                 f"{auto['end_to_end']['median_seconds']:.2f} s, identical to the figures from cached evidence: "
                 f"largest difference {auto['end_to_end']['max_abs_difference']:g}).")
    return "\n\n".join(parts)


def warning_rules_table(rules: dict, chosen: float) -> str:
    rows = ["| warn when off by more than | false alarms (right pixel size) | caught: 2x too large | 2x too small | "
            "1.5x too large | 1.5x too small |", "|---|---|---|---|---|---|"]
    for factor, f in rules.items():
        mark = " (`CONTRADICTION_FACTOR`)" if float(factor) == chosen else ""
        rows.append(f"| {factor}x{mark} | {pct(f['false_alarm'])} | {pct(f['caught_2x_too_large'])} | "
                    f"{pct(f['caught_2x_too_small'])} | {pct(f['caught_1_5x_too_large'])} | "
                    f"{pct(f['caught_1_5x_too_small'])} |")
    return "\n".join(rows)


def plausibility_section(contradiction_factor: float) -> str:
    auto = load("mpp/mpp_auto.json")
    plausible = load("mpp/plausibility.json")
    parts = ["**The estimate against the pixel size used** (a warning when they differ by more than a factor; "
             "all images, then held-out only):",
             warning_rules_table(auto["warning_rules"]["all"], contradiction_factor),
             warning_rules_table(auto["warning_rules"]["held_out"], contradiction_factor)]
    rows = ["| pixel size claimed | images | over 0.05 mm^2 | nuclei per mm^2: min | median | max | lowest median "
            "score (30+ nuclei) | warned |", "|---|---|---|---|---|---|---|---|"]

    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.0f}"

    for factor, s in plausible["summary"].items():
        score = "n/a" if s["median_score_min_30_nuclei"] is None else f"{s['median_score_min_30_nuclei']:.2f}"
        rows.append(f"| true x {factor} | {s['images']} | {s['images_over_min_area']} | {number(s['density_min'])} | "
                    f"{number(s['density_median'])} | {number(s['density_max'])} | {score} | {pct(s['warned'])} |")
    parts += ["**The nuclei alone** (density and scores, no estimate): dev images detected by `default` at their "
              "true pixel size times a factor (`plausibility.json`):", "\n".join(rows)]
    return "\n\n".join(parts)


def cost_section() -> str:
    auto = load("mpp/mpp_auto.json")
    slide = load("slide/slide.json")
    fastpath = load("speed/fastpath.json")
    onnx = fastpath["whole_image"]["onnx, tile 256"]
    rows = ["| what | seconds | source |", "|---|---|---|",
            f"| one estimate (median over images, {auto['seconds_per_estimate']['threads']} thread) | "
            f"{auto['seconds_per_estimate']['median']:.2f} | `mpp/mpp_auto.json` `seconds_per_estimate` |"]
    rows += [f"| one estimate of a slide ({s['slide']}) | {s['seconds']:.2f} | `mpp/mpp_auto.json` `slides[]` |"
             for s in auto["slides"]]
    rows.append(f"| detecting 1 mm^2 (ONNX Runtime, {onnx['threads']} threads, 256 px tiles) | "
                f"{onnx['s_per_mm2']:.2f} | `speed/fastpath.json` `whole_image` |")
    for r in slide["runs"]:
        if r["slide"] == "CMU-1-Small-Region.svs" and r["model"] == "default" and r["runtime"] == "onnx":
            rows.append(f"| `predict` on CMU-1-Small-Region ({r['tissue_mm2']:.2f} mm^2 of tissue), default, "
                        f"{r['mode']} | {r['wall_s']:.2f} | `slide/slide.json` `runs[]` |")
    return "\n".join(rows)


def sections() -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from denuc.inference.mpp import CONTRADICTION_FACTOR

    return {"fit": fit_section(), "accuracy": auto_section(),
            "plausibility": plausibility_section(CONTRADICTION_FACTOR), "cost": cost_section()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help=f"check that {DOC.name} holds every table as printed")
    args = parser.parse_args()
    tables = sections()
    if args.check:
        doc = DOC.read_text()
        missing = [name for name, text in tables.items() if text not in doc]
        if missing:
            sys.exit(f"{DOC} lacks the tables {missing} as benchmarks/mpp_tables.py prints them")
        return
    for name, text in tables.items():
        print(f"<!-- {name} -->\n{text}\n")


if __name__ == "__main__":
    main()
