"""How well ``denuc.inference.mpp.estimate_mpp`` tells an image's pixel size, and the data behind its model.

    python benchmarks/bench_mpp.py --fit           # dev images: compare the approaches, fit the shipped model
    python benchmarks/bench_mpp.py                 # all images x 3 pixel sizes + the two slides: the accuracy
    python benchmarks/bench_mpp.py --plausibility  # nuclei per mm^2 and scores at right and wrong pixel sizes

Images: every image of BRCAM2C (0.5 um/px), CRCHisto (0.55) and MoNuSeg (its files' 0.2456-0.2527; 0.25 for the
one without a value), and of CoNSeP (0.25) two 256 px crops per source image, drawn with a fixed seed (the 16
crops of a source overlap; all 432 would triple the run for little new tissue). Each is resampled (bicubic) to
0.25, 0.5 and 1.0 um/px and estimated; the error is estimate / true pixel size - 1.

``--fit``: the dev images are those of the train splits (BRCAM2C, CRCHisto, MoNuSeg ``splits.json``, CoNSeP's
train source images), each also as a copy blurred by a Gaussian of 0.5-2 native pixels (drawn per image): the
model must not take a soft image for a finer pixel size, as it did on the TCGA slide before the blurred copies
were added. Their evidence (``measure_evidence``) is measured once and cached (``--cache``). Four approaches are
scored by leave-one-dataset-out cross-validation (fit on three datasets, score the fourth) and by 5-fold
cross-validation over images: A, the detector sweep's peak (the candidate with the most points scored >= 0.8 per
area, interpolated, times a calibration factor); B, the apparent blob size (the candidate at which the
haematoxylin LoG response's mean log scale equals its median at the true pixel size); C, the conditional-logit
model over both kinds of evidence; D, the same on the detector's evidence alone. The rule, written before the
run: ship the approach with the highest leave-one-dataset-out fraction within 15%, sharp and blurred copies
together; a conditional logit is then fitted on all of them and written to ``denuc/weights/mpp_estimator.json``.
Results: ``benchmarks/results/mpp/mpp_fit.json``.

Default: the final figures on all the images above (``benchmarks/results/mpp/mpp_auto.json``), also split into
dev images (in the model's training data: optimistic) and held-out images (val/test splits: the honest figure),
the end-to-end time of ``estimate_mpp``, a table of warning rules (how often an estimate contradicts the true
pixel size, and a wrong one, by more than a factor), the held-out images at 0.5 um/px blurred by 1.5 native
pixels, and the two slides in ../shared/slides. Evidence already
measured for ``--fit`` is read from the cache (it is what ``estimate_mpp`` computes: the run checks this on
some images, end to end).

The CPU is shared: torch runs on ``--threads`` (1) threads.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from denuc.inference.detect import Detector  # noqa: E402
from denuc.inference.mpp import (  # noqa: E402
    CANDIDATES,
    DENSITY_MIN_AREA_MM2,
    EVIDENCE,
    MEDIAN_SCORE_OF,
    MppModel,
    candidate_probabilities,
    check_plausibility,
    choosable,
    estimate_mpp,
    load_model,
    measure_evidence,
    summarise,
)
from denuc.io.atomic import atomic_path  # noqa: E402
from denuc.io.images import read_image, resample  # noqa: E402
from denuc.io.slides import open_slide  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATASETS = SHARED / "datasets"
SLIDES = {"CMU-1-Small-Region.svs": 0.499, "TCGA-CR-7395-01A-01-TS1.svs": None}
"""True pixel sizes: CMU-1's metadata; the TCGA slide has none (its nuclei suggest 0.7-1.4 um/px:
results/mpp/explain_TCGA-CR-7395-01A-01-TS1.json)."""
SCALES = (0.25, 0.5, 1.0)  # the benchmark's pixel sizes
RESULTS = Path(__file__).resolve().parent / "results" / "mpp"
MODEL_PATH = Path(__file__).resolve().parents[1] / "denuc" / "weights" / "mpp_estimator.json"
ORDER = ("brcam2c", "crchisto", "consep", "monuseg")
RULE = ("written before the run: ship the approach with the highest leave-one-dataset-out fraction within 15% on "
        "the dev images, sharp and blurred copies together; fit it on all of them")
L2 = 1e-3  # ridge weight of the conditional logit (chosen on the exploration data, 1e-4 to 1e-2 within a point)
WARNING_FACTORS = (1.41, 1.5, 1.6, 1.68, 2.0)
BLUR_CHECK = (1.5,)  # Gaussian blur (native pixels) of the held-out images in the robustness check


def images(consep_per_source: int = 2, limit: int | None = None) -> list[dict]:
    """Every benchmark image: dataset, name, path, true pixel size, and whether it is a dev (train split) image."""
    out = []
    root = DATASETS / "brcam2c"
    train = set((root / "brca_ds_train.txt").read_text().split())
    out += [{"dataset": "brcam2c", "name": p.name, "path": p, "mpp": 0.5, "dev": p.name in train}
            for p in sorted((root / "images").glob("*.png"))]
    root = DATASETS / "crchisto"
    train = set((root / "split_train.txt").read_text().split())
    out += [{"dataset": "crchisto", "name": p.name, "path": p / f"{p.name}.bmp", "mpp": 0.55, "dev": p.name in train}
            for p in sorted(root.iterdir()) if p.is_dir()]
    root = DATASETS / "consep"
    splits = json.loads((root / "splits.json").read_text())["splits"]
    by_source: dict[str, list[Path]] = {}
    for p in sorted((root / "Train" / "Images").glob("*.jpg")):
        by_source.setdefault(p.stem.rsplit("_", 1)[0], []).append(p)
    rng = random.Random(0)
    for source, crops in sorted(by_source.items()):
        out += [{"dataset": "consep", "name": p.stem, "path": p, "mpp": 0.25, "dev": source in splits["train"]}
                for p in sorted(rng.sample(crops, consep_per_source))]
    root = DATASETS / "monuseg"
    splits = json.loads((root / "splits.json").read_text())["splits"]
    for name in sorted(sum(splits.values(), [])):
        header = (root / "MoNuSegTrainingData" / "Annotations" / f"{name}.xml").read_text(errors="ignore")[:500]
        found = re.search(r'MicronsPerPixel="([0-9.]+)"', header)
        out.append({"dataset": "monuseg", "name": name, "path": root / "MoNuSegTrainingData" / "Tissue Images" /
                    f"{name}.tif", "mpp": float(found.group(1)) if found else 0.25, "dev": name in splits["train"]})
    if limit:  # a smoke test: the first dev and held-out images of each dataset
        out = [i for d in ORDER for dev in (True, False) for i in [i for i in out if i["dataset"] == d
                                                                   and i["dev"] == dev][:limit]]
    return out


def blur_sigma(item: dict) -> float:
    """The Gaussian blur (native pixels) of an image's blurred copy: drawn per image, 0.5-2, from its name."""
    return float(np.random.default_rng(zlib.crc32(item["name"].encode())).uniform(0.5, 2.0))


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return image
    return np.stack([ndimage.gaussian_filter(image[..., c].astype(np.float32), sigma) for c in range(3)],
                    axis=-1).round().clip(0, 255).astype(np.uint8)


class Cache:
    """Evidence per (dataset, image, scale, blur), with the true pixel size of the resampled image and the seconds
    the measurement took; saved after every image so an interrupted run resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items = dict(np.load(path, allow_pickle=True)["items"].item()) if path.exists() else {}

    def get(self, item: dict, scale: float, detector: Detector, blur: float = 0.0) -> dict:
        key = f"{item['dataset']}/{item['name']}/{scale}" + (f"/blur {blur:.4f}" if blur else "")
        if key not in self.items:
            original = read_image(item["path"])
            image = resample(blurred(original, blur), item["mpp"] / scale)
            started = time.perf_counter()
            evidence, windows = measure_evidence(image, detector)
            self.items[key] = {"evidence": evidence, "seconds": time.perf_counter() - started, "windows": windows,
                               "mpp": item["mpp"] * original.shape[1] / image.shape[1], "shape": image.shape[:2]}
        return self.items[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, items=np.array(self.items, dtype=object))
        tmp.replace(self.path)


def measure(items: list[dict], cache: Cache, detector: Detector, scales=SCALES, blur: bool = False) -> list[dict]:
    """Rows of evidence for each item at each scale; ``blur``: of the item's blurred copy (``blur_sigma``)."""
    rows = []
    for k, item in enumerate(items):
        sigma = blur_sigma(item) if blur else 0.0
        for scale in scales:
            rows.append({"dataset": item["dataset"], "name": item["name"], "scale": scale, "dev": item["dev"],
                         "blur": sigma, **cache.get(item, scale, detector, sigma)})
        cache.save()
        if k % 20 == 0:
            print(f"  {k + 1}/{len(items)} {item['dataset']} {item['name']}", flush=True)
    return rows


# --- the three approaches, each fit(rows) -> predict(evidence) -> estimate (um/px) --------------------------------

def fit_peak(rows: list[dict]):
    """A: the candidate with the most points scored >= 0.8 per area, interpolated, times a calibration factor."""
    def raw(evidence: np.ndarray) -> float:
        density = np.where(choosable(evidence), np.expm1(evidence[:, 2]) + np.expm1(evidence[:, 3]), -np.inf)
        return float(np.exp(_parabolic_peak(np.log(CANDIDATES), density)))
    factor = np.exp(np.median([np.log(r["mpp"] / raw(r["evidence"])) for r in rows]))
    return lambda evidence: raw(evidence) * factor


def fit_blob_size(rows: list[dict]):
    """B: the candidate at which the LoG response's mean log scale equals its median value at the true pixel size."""
    log_sigma = np.log([float(n.split("_")[1]) for n in EVIDENCE if n.startswith("blob_") and n != "blob_total"])
    blob = slice(4, 4 + len(log_sigma))

    def apparent(evidence: np.ndarray) -> np.ndarray:
        shares = evidence[:, blob]
        return (shares * log_sigma).sum(1) / np.maximum(shares.sum(1), 1e-9)

    def at_truth(r: dict) -> float:
        ok = choosable(r["evidence"])
        return float(np.interp(np.log(r["mpp"]), np.log(CANDIDATES[ok]), apparent(r["evidence"])[ok]))
    reference = np.median([at_truth(r) for r in rows])

    def predict(evidence: np.ndarray) -> float:
        ok = choosable(evidence)
        log_c, size = np.log(CANDIDATES[ok]), apparent(evidence)[ok]
        k = int(np.argmin(np.abs(size - reference)))
        j = k + 1 if (k + 1 < len(size) and (size[k] - reference) * (size[k + 1] - reference) <= 0) else k - 1
        if 0 <= j < len(size) and size[j] != size[k]:
            return float(np.exp(log_c[k] + (reference - size[k]) * (log_c[j] - log_c[k]) / (size[j] - size[k])))
        return float(np.exp(log_c[k]))
    return predict


def fit_logit(rows: list[dict], uses: tuple[str, ...] = EVIDENCE, l2: float = L2, neighbours: int = 2) -> MppModel:
    """C, D: the conditional logit (``MppModel``) on the ``uses`` evidence, each dataset weighted equally, soft
    targets split between the two candidates around the true pixel size (in log scale), fitted by L-BFGS."""
    evidence = np.stack([r["evidence"] for r in rows])
    blank = MppModel(neighbours, np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1), uses)
    x = np.stack([blank.features(e) for e in evidence])
    allowed = np.stack([choosable(e) for e in evidence])
    mean, std = x[allowed].mean(0), x[allowed].std(0) + 1e-6
    log_c = np.log(CANDIDATES)
    target = np.zeros(allowed.shape)
    for k, r in enumerate(rows):
        position = (np.log(r["mpp"]) - log_c[0]) / (log_c[1] - log_c[0])
        low = int(np.floor(position))
        target[k, low], target[k, low + 1] = 1 - (position - low), position - low
    datasets = [r["dataset"] for r in rows]
    weight = np.array([1.0 / datasets.count(d) for d in datasets])
    xt = torch.tensor((x - mean) / std, dtype=torch.float64)
    tt, wt = torch.tensor(target), torch.tensor(weight / weight.mean())
    mask = torch.tensor(np.where(allowed, 0.0, -1e9))
    linear = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    quadratic = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([linear, quadratic], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        scores = xt @ linear + (xt ** 2) @ quadratic + mask
        loss = -((tt * torch.log_softmax(scores, -1)).sum(-1) * wt).mean()
        loss = loss + l2 * (linear.pow(2).sum() + quadratic.pow(2).sum())
        loss.backward()
        return loss
    optimiser.step(closure)
    return MppModel(neighbours, mean, std, linear.detach().numpy(), quadratic.detach().numpy(), uses)


def logit_predictor(model: MppModel):
    return lambda evidence: summarise(candidate_probabilities(evidence, model))[0]


DETECTOR_EVIDENCE = tuple(n for n in EVIDENCE if n.startswith("points_")) + ("no_evidence",)
USES = {"C_conditional_logit": EVIDENCE, "D_conditional_logit_detector_only": DETECTOR_EVIDENCE}
APPROACHES = {"A_detector_peak": fit_peak, "B_blob_size": fit_blob_size,
              **{name: (lambda uses: lambda rows: logit_predictor(fit_logit(rows, uses)))(uses)
                 for name, uses in USES.items()}}


def _parabolic_peak(x: np.ndarray, y: np.ndarray) -> float:
    k = int(np.argmax(y))
    if 0 < k < len(y) - 1 and np.isfinite(y[k - 1]) and np.isfinite(y[k + 1]):
        curvature = y[k - 1] - 2 * y[k] + y[k + 1]
        if curvature < 0:
            return x[k] + 0.5 * (y[k - 1] - y[k + 1]) / curvature * (x[1] - x[0])
    return x[k]


def cross_validate(rows: list[dict], fit, groups: list) -> np.ndarray:
    estimates = np.zeros(len(rows))
    for group in sorted(set(groups)):
        train = [r for r, g in zip(rows, groups) if g != group]
        predict = fit(train)
        for k, (r, g) in enumerate(zip(rows, groups)):
            if g == group:
                estimates[k] = predict(r["evidence"])
    return estimates


# --- figures --------------------------------------------------------------------------------------------------

def accuracy(true: np.ndarray, estimate: np.ndarray) -> dict:
    """Figures over images; an image without an answer (NaN: no nucleus found at any scale) counts as wrong by
    an infinite error."""
    answered = np.isfinite(estimate)
    error = np.where(answered, estimate / true - 1, np.inf)
    factor = np.where(answered, np.exp(np.abs(np.log(np.where(answered, estimate, 1.0) / true))), np.inf)
    return {"images": int(len(true)), "no_answer": int((~answered).sum()),
            "within_15pct": float(np.mean(np.abs(error) <= 0.15)),
            "within_25pct": float(np.mean(np.abs(error) <= 0.25)),
            "median_abs_rel_error": float(np.median(np.abs(error))),
            "median_rel_error": float(np.median(error)),
            "off_by_factor_1_5_or_more": float(np.mean(factor >= 1.5))}


def table(rows: list[dict], estimates: np.ndarray) -> dict:
    """Accuracy over all rows, per dataset (all its pixel sizes, then each) and per pixel size."""
    true = np.array([r["mpp"] for r in rows])
    datasets, scales = np.array([r["dataset"] for r in rows]), np.array([r["scale"] for r in rows])
    out = {"all": accuracy(true, estimates)}
    for d in ORDER:
        pick = datasets == d
        if pick.any():
            out[d] = {"all": accuracy(true[pick], estimates[pick])}
            out[d].update({str(s): accuracy(true[pick & (scales == s)], estimates[pick & (scales == s)])
                           for s in sorted(set(scales)) if (pick & (scales == s)).any()})
    for s in sorted(set(scales)):
        out[f"scale {s}"] = accuracy(true[scales == s], estimates[scales == s])
    return out


def print_table(title: str, result: dict) -> None:
    print(f"\n{title}")
    print(f"  {'':10s} {'images':>6s} {'<=15%':>6s} {'<=25%':>6s} {'median':>7s} {'x1.5+':>6s}")
    for key, value in result.items():
        for sub, figures in ([(key, value)] if "images" in value else [(f"{key} {k}", v) for k, v in value.items()]):
            print(f"  {sub:22s} {figures['images']:6d} {figures['within_15pct']:6.3f} {figures['within_25pct']:6.3f}"
                  f" {figures['median_abs_rel_error']:7.3f} {figures['off_by_factor_1_5_or_more']:6.3f}")


def warning_rules(true: np.ndarray, estimates: np.ndarray) -> dict:
    """For a rule "warn when the pixel size used and the estimate differ by more than F times": how often it
    warns when the pixel size used is right (false alarm), and when it is 2x too large or too small (caught)."""
    out = {}
    for f in WARNING_FACTORS:
        def warns(used: np.ndarray) -> float:
            return float(np.mean(np.exp(np.abs(np.log(used / estimates))) > f))
        out[str(f)] = {"false_alarm": warns(true), "caught_2x_too_large": warns(2 * true),
                       "caught_2x_too_small": warns(true / 2), "caught_1_5x_too_large": warns(1.5 * true),
                       "caught_1_5x_too_small": warns(true / 1.5)}
    return out


def calibration(true: np.ndarray, estimates: np.ndarray, confidence: np.ndarray) -> list[dict]:
    """Observed fraction within 15% per band of the model's confidence."""
    within = np.abs(estimates / true - 1) <= 0.15
    out = []
    for low, high in ((0, 0.5), (0.5, 0.7), (0.7, 0.85), (0.85, 1.01)):
        pick = (confidence >= low) & (confidence < high)
        out.append({"confidence": [low, min(high, 1.0)], "images": int(pick.sum()),
                    "mean_confidence": float(confidence[pick].mean()) if pick.any() else None,
                    "observed_within_15pct": float(within[pick].mean()) if pick.any() else None})
    return out


# --- modes ----------------------------------------------------------------------------------------------------

def run_fit(args, detector: Detector) -> None:
    dev = [item for item in images(args.consep_per_source, args.limit) if item["dev"]]
    print(f"--fit: measuring {len(dev)} dev images at {SCALES} um/px, sharp and blurred", flush=True)
    cache = Cache(args.cache)
    rows = measure(dev, cache, detector) + measure(dev, cache, detector, blur=True)
    names = sorted({r["name"] for r in rows})
    fold = dict(zip(names, np.random.default_rng(0).integers(0, 5, len(names))))
    sharp = np.array([r["blur"] == 0 for r in rows])
    design = {}
    for label, fit in APPROACHES.items():
        design[label] = {}
        for scheme, groups in (("leave_one_dataset_out", [r["dataset"] for r in rows]),
                               ("5_fold_by_image", [int(fold[r["name"]]) for r in rows])):
            estimates = cross_validate(rows, fit, groups)
            design[label][scheme] = {
                "sharp_and_blurred": table(rows, estimates),
                "sharp": table([r for r, k in zip(rows, sharp) if k], estimates[sharp]),
                "blurred": table([r for r, k in zip(rows, sharp) if not k], estimates[~sharp])}
            print_table(f"{label}, {scheme}", {part: design[label][scheme][part]["all"]
                                               for part in ("sharp_and_blurred", "sharp", "blurred")})
    chosen = max(APPROACHES,
                 key=lambda a: design[a]["leave_one_dataset_out"]["sharp_and_blurred"]["all"]["within_15pct"])
    print(f"\nchosen by the rule (best leave-one-dataset-out fraction within 15%, sharp and blurred): {chosen}")
    result = {"rule": RULE, "chosen": chosen, "l2": L2,
              "dev_images": {d: sum(1 for i in dev if i["dataset"] == d) for d in ORDER},
              "blur": "each dev image also as a copy blurred by a Gaussian of 0.5-2 native pixels (drawn per image)",
              "scales": list(SCALES), "approaches": design}
    if chosen in USES:
        model = fit_logit(rows, USES[chosen])
        model.provenance = {"fitted_by": "python benchmarks/bench_mpp.py --fit", "detector": "default",
                            "data": "train splits: " + ", ".join(f"{d} {n}" for d, n in result["dev_images"].items())
                                    + f" images, each at {', '.join(map(str, SCALES))} um/px, sharp and blurred",
                            "approach": chosen, "l2": L2}
        with atomic_path(MODEL_PATH) as tmp:
            Path(tmp).write_text(model.to_json() + "\n")
        result["in_sample"] = table(rows, np.array([logit_predictor(model)(r["evidence"]) for r in rows]))
        print(f"wrote {MODEL_PATH}")
    write_result(RESULTS / "mpp_fit.json", result, models=["default"])
    print(f"wrote {RESULTS / 'mpp_fit.json'}; {time.perf_counter() - args.started:.0f} s")


def run_benchmark(args, detector: Detector) -> None:
    items = images(args.consep_per_source, args.limit)
    print(f"measuring {len(items)} images x {len(SCALES)} pixel sizes (cached evidence is reused)", flush=True)
    cache = Cache(args.cache)
    rows = measure(items, cache, detector)
    model = load_model()
    results = [summarise(candidate_probabilities(r["evidence"], model)) for r in rows]
    estimates, confidence = np.array([e for e, _ in results]), np.array([c for _, c in results])
    true = np.array([r["mpp"] for r in rows])
    dev = np.array([r["dev"] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    out = {"images": {d: sum(1 for i in items if i["dataset"] == d) for d in ORDER},
           "consep_crops_per_source_image": args.consep_per_source, "scales": list(SCALES),
           "all": table(rows, estimates),
           "held_out": table([r for r, d in zip(rows, dev) if not d], estimates[~dev]),
           "dev_in_sample": table([r for r, d in zip(rows, dev) if d], estimates[dev]),
           "seconds_per_estimate": {"median": float(np.median(seconds)), "mean": float(seconds.mean()),
                                    "p95": float(np.percentile(seconds, 95)), "threads": torch.get_num_threads(),
                                    **{d: float(np.median(seconds[[r["dataset"] == d for r in rows]]))
                                       for d in ORDER}},
           "warning_rules": {"all": warning_rules(true, estimates),
                             "held_out": warning_rules(true[~dev], estimates[~dev])},
           "confidence_calibration": {"all": calibration(true, estimates, confidence),
                                      "held_out": calibration(true[~dev], estimates[~dev], confidence[~dev])}}
    # blur: the held-out images at 0.5 um/px, blurred by BLUR_CHECK native pixels (focus, compression)
    held_out = [i for i in items if not i["dev"]]
    for sigma in BLUR_CHECK:
        blurred_rows = []
        for item in held_out:
            blurred_rows.append({"dataset": item["dataset"], "name": item["name"], "scale": 0.5, "dev": False,
                                 **Cache.get(cache, item, 0.5, detector, sigma)})
        cache.save()
        sharp_rows = [r for r in rows if not r["dev"] and r["scale"] == 0.5]
        out[f"held_out_0.5_blur_{sigma}"] = table(blurred_rows, np.array(
            [summarise(candidate_probabilities(r["evidence"], model))[0] for r in blurred_rows]))
        out["held_out_0.5_sharp"] = table(sharp_rows, np.array(
            [summarise(candidate_probabilities(r["evidence"], model))[0] for r in sharp_rows]))
    print_table("all images", out["all"])
    print_table("held-out images (val/test splits)", out["held_out"])
    # estimate_mpp end to end on a few images: the same figures as from the cached evidence, and its own time
    checks = []
    for r in rows[::max(1, len(rows) // args.end_to_end)][:args.end_to_end]:
        item = next(i for i in items if i["dataset"] == r["dataset"] and i["name"] == r["name"])
        original = read_image(item["path"])
        image = resample(original, item["mpp"] / r["scale"])
        estimate = estimate_mpp(image, detector)
        cached = summarise(candidate_probabilities(r["evidence"], model))[0]
        checks.append({"dataset": r["dataset"], "name": r["name"], "scale": r["scale"], "estimate": estimate.mpp,
                       "from_cache": cached, "seconds": estimate.seconds})
    out["end_to_end"] = {"runs": checks,
                         "max_abs_difference": max(abs(c["estimate"] - c["from_cache"]) for c in checks),
                         "median_seconds": float(np.median([c["seconds"] for c in checks]))}
    print(f"\nend to end: {len(checks)} runs, median {out['end_to_end']['median_seconds']:.2f} s, "
          f"max |difference| to cached {out['end_to_end']['max_abs_difference']:.2g}")
    out["slides"] = []
    for name, mpp in SLIDES.items():
        path = SLIDES_DIR / name
        if not path.exists():
            continue
        # a slide without a pixel size opens only with one given: the placeholder is never read by the estimate
        with open_slide(path, mpp=None if mpp else 1.0) as slide:
            estimate = estimate_mpp(slide, detector)
        out["slides"].append({"slide": name, "metadata_mpp": mpp, "estimate": estimate.mpp,
                              "confidence": estimate.confidence, "seconds": estimate.seconds,
                              "windows": estimate.windows})
        print(f"{name}: estimate {estimate.mpp:.3f} um/px (metadata {mpp}), confidence {estimate.confidence:.2f}, "
              f"{estimate.seconds:.1f} s")
    out["per_image"] = [{"dataset": r["dataset"], "name": r["name"], "scale": r["scale"], "dev": bool(r["dev"]),
                         "true_mpp": r["mpp"], "estimate": float(e), "confidence": float(c),
                         "seconds": float(r["seconds"])}
                        for r, e, c in zip(rows, estimates, confidence)]
    write_result(args.out, out, models=["default"])
    print(f"wrote {args.out}; {time.perf_counter() - args.started:.0f} s")


SLIDES_DIR = SHARED / "slides"
CLAIM_FACTORS = (0.125, 0.25, 0.5, 0.7, 1.0, 1.4, 2.0)


def run_plausibility(args, detector: Detector) -> None:
    """Dev images detected at their true pixel size times each of CLAIM_FACTORS: nuclei per mm^2 (of the image,
    at the claimed pixel size), the median detection score, and how often ``check_plausibility`` warns (without
    an estimate: what the nuclei alone tell)."""
    rng = random.Random(1)
    dev = [i for i in images(args.consep_per_source, args.limit) if i["dev"]]
    picked = [i for d in ORDER for i in sorted(rng.sample([i for i in dev if i["dataset"] == d],
                                                          min(args.plausibility_images,
                                                              sum(1 for i in dev if i["dataset"] == d))),
                                               key=lambda i: i["name"])]
    rows = []
    for item in picked:
        image = read_image(item["path"])
        for k in CLAIM_FACTORS:
            claimed = item["mpp"] * k
            nuclei = detector.detect(image, mpp=claimed)
            confident = nuclei.scores[nuclei.scores > MEDIAN_SCORE_OF]
            area = image.shape[0] * image.shape[1] * claimed ** 2 / 1e6
            rows.append({"dataset": item["dataset"], "name": item["name"], "claim_factor": k, "nuclei": len(nuclei),
                         "area_mm2": area, "density_per_mm2": len(nuclei) / area,
                         # the statistic check_plausibility reads: the median of the points above MEDIAN_SCORE_OF
                         "median_score": float(np.median(confident)) if len(confident) else None,
                         "nuclei_above_median_floor": len(confident),
                         "warnings": check_plausibility(nuclei.scores, claimed, area)})
    summary = {}
    for k in CLAIM_FACTORS:
        at = [r for r in rows if r["claim_factor"] == k]
        large = [r for r in at if r["area_mm2"] >= DENSITY_MIN_AREA_MM2]
        density = np.array([r["density_per_mm2"] for r in large])
        summary[str(k)] = {"images": len(at), "images_over_min_area": len(large),
                           "density_min": float(density.min()) if len(density) else None,
                           "density_median": float(np.median(density)) if len(density) else None,
                           "density_max": float(density.max()) if len(density) else None,
                           "density_max_any_area": max(r["density_per_mm2"] for r in at),
                           "median_score_min_30_nuclei": min((r["median_score"] for r in at
                                                              if r["nuclei_above_median_floor"] >= 30),
                                                             default=None),
                           "warned": float(np.mean([bool(r["warnings"]) for r in at]))}
        print(f"claimed = true x {k}: {summary[str(k)]}")
    write_result(RESULTS / "plausibility.json", {"claim_factors": list(CLAIM_FACTORS), "summary": summary,
                                                  "per_image": rows}, models=["default"])
    print(f"wrote {RESULTS / 'plausibility.json'}; {time.perf_counter() - args.started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="compare the approaches on dev images, fit the model")
    parser.add_argument("--plausibility", action="store_true",
                        help="nuclei per mm^2 and scores at right and wrong pixel sizes (check_plausibility's data)")
    parser.add_argument("--plausibility-images", type=int, default=20, help="dev images per dataset for it")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/denuc_mpp_evidence.npz"),
                        help="evidence cache (default: %(default)s)")
    parser.add_argument("--consep-per-source", type=int, default=2, help="CoNSeP crops per source image")
    parser.add_argument("--end-to-end", type=int, default=12, help="images estimated end to end by estimate_mpp")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "mpp_auto.json")
    parser.add_argument("--limit", type=int, help="smoke test: this many dev and held-out images per dataset")
    args = parser.parse_args()
    if not DATASETS.exists():
        sys.exit(f"{DATASETS} not found: this benchmark needs the shared datasets")
    torch.set_num_threads(args.threads)
    args.started = time.perf_counter()
    detector = Detector.from_pretrained("default")
    if args.fit:
        run_fit(args, detector)
    elif args.plausibility:
        run_plausibility(args, detector)
    else:
        run_benchmark(args, detector)


if __name__ == "__main__":
    main()
