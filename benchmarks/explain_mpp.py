"""Why ``estimate_mpp`` says what it says about one slide: the evidence, the model's terms, and independent hints.

    python benchmarks/explain_mpp.py ../shared/slides/TCGA-CR-7395-01A-01-TS1.svs   # -> results/mpp/explain_<stem>.json

Recorded: the estimate and each measured region's own; per candidate pixel size, the model's probability and
the detector's evidence (``EVIDENCE``); the model's largest terms at the most probable candidate and at the one
where the detector finds the most confident points; the detector run on the first region as if its pixels were
each of ``CLAIMS`` um/px (nuclei, per mm^2, median score); the apparent size of the dark (haematoxylin) blobs
against a reference slide of known pixel size (``--reference``, CMU-1 at 0.499 um/px), a crude ruler; and what
the estimate would be if candidates at which the detector finds (almost) no confident point could not be chosen
(an experiment, not the shipped estimator). Then ``denuc predict --mpp auto --detector-only`` on the slide: the
summary's pixel size and warnings. docs/pixel_size.md (Limits) reads this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from skimage import filters, measure, morphology

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from denuc.cli import main as denuc  # noqa: E402
from denuc.inference import mpp as M  # noqa: E402
from denuc.inference.detect import Detector  # noqa: E402
from denuc.io.slides import open_slide  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mpp"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "slides" / "CMU-1-Small-Region.svs"
CLAIMS = (0.25, 0.32, 0.5, 0.7, 1.0, 1.4, 2.0)
CONFIDENT = ("points_0.8-0.95", "points_0.95-1")
GUARD = 0.1  # the experiment: a candidate whose confident points (summed log1p per 10^4 px^2) are under this is out


def blob_diameters(regions: list[np.ndarray]) -> np.ndarray:
    """Equivalent diameters (px) of compact dark blobs: the haematoxylin channel over its Otsu threshold, opened
    by a 1 px disk; blobs of at least 6 px, solidity over 0.85, eccentricity under 0.9."""
    found = []
    for region in regions:
        haematoxylin = -np.log((region.astype(np.float32) + 1) / 256) @ M._HAEMATOXYLIN
        mask = morphology.opening(haematoxylin > filters.threshold_otsu(haematoxylin), morphology.disk(1))
        found += [p.equivalent_diameter_area for p in measure.regionprops(measure.label(mask))
                  if p.area >= 6 and p.solidity > 0.85 and p.eccentricity < 0.9]
    return np.array(found)


def top_terms(model: M.MppModel, evidence: np.ndarray, k: int, n: int = 8) -> list[dict]:
    """The ``n`` largest terms (linear + quadratic, by size) of candidate ``k``'s score."""
    x = (model.features(evidence) - model.mean) / model.std
    names = [f"{name}@{offset:+d}" for offset in range(-model.neighbours, model.neighbours + 1) for name in model.uses]
    terms = x[k] * model.linear + x[k] ** 2 * model.quadratic
    return [{"feature": names[i], "z": float(x[k, i]), "term": float(terms[i])} for i in np.argsort(-np.abs(terms))[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="a slide whose metadata has its mpp")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    detector = Detector.from_pretrained("default")
    model = M.load_model()
    with open_slide(args.slide, mpp_required=False) as slide:
        regions = M._regions(slide)
        evidence, windows = M.measure_evidence(slide, detector)
        stated = slide.mpp
    probabilities = M.candidate_probabilities(evidence, model)
    estimate, confidence = M.summarise(probabilities)
    confident = evidence[:, [M.EVIDENCE.index(name) for name in CONFIDENT]].sum(axis=1)
    best, peak = int(np.argmax(probabilities)), int(np.argmax(confident))
    guarded = np.where(confident >= GUARD, probabilities, 0.0)
    out = {"slide": args.slide.name, "metadata_mpp": None if np.isnan(stated) else stated,
           "estimate": estimate, "confidence": confidence, "windows": windows,
           "regions": [{"estimate": M.estimate_mpp(region, detector).mpp, "shape": list(region.shape[:2])}
                       for region in regions],
           "candidates": [{"mpp": float(c), "probability": float(p), **dict(zip(M.EVIDENCE, map(float, row)))}
                          for c, p, row in zip(M.CANDIDATES, probabilities, evidence)],
           "most_probable": {"mpp": float(M.CANDIDATES[best]), "terms": top_terms(model, evidence, best),
                             "score": float(sum(t["term"] for t in top_terms(model, evidence, best, 10**6)))},
           "most_confident_points": {"mpp": float(M.CANDIDATES[peak]), "terms": top_terms(model, evidence, peak),
                                     "score": float(sum(t["term"] for t in top_terms(model, evidence, peak, 10**6)))},
           "guard_experiment": {"rule": f"candidates with {' + '.join(CONFIDENT)} < {GUARD} cannot be chosen",
                                "estimate": M.summarise(guarded / guarded.sum())[0] if guarded.any() else None}}
    claims = []
    for mpp in CLAIMS:
        nuclei = detector.detect(regions[0], mpp=mpp)
        area = regions[0].shape[0] * regions[0].shape[1] * mpp**2 / 1e6
        claims.append({"mpp": mpp, "nuclei": len(nuclei), "per_mm2": len(nuclei) / area,
                       "median_score": float(np.median(nuclei.scores)) if len(nuclei) else None})
    out["first_region_detected_as"] = claims
    diameters = blob_diameters(regions)
    with open_slide(args.reference) as reference:
        reference_diameters = blob_diameters(M._regions(reference))
        reference_mpp = reference.mpp
    out["blob_ruler"] = {"reference": args.reference.name, "reference_mpp": reference_mpp,
                         "median_diameter_px": float(np.median(diameters)),
                         "reference_median_diameter_px": float(np.median(reference_diameters)),
                         "implied_mpp": reference_mpp * float(np.median(reference_diameters) / np.median(diameters)),
                         "blobs": int(len(diameters)), "reference_blobs": int(len(reference_diameters))}
    with tempfile.TemporaryDirectory() as folder:
        code = denuc(["predict", str(args.slide), "--mpp", "auto", "--detector-only", "--quiet", "--out", folder])
        summary = json.loads((Path(folder) / f"{args.slide.stem}_summary.json").read_text()) if code == 0 else {}
    out["predict_mpp_auto"] = {"exit": code, **{k: summary.get(k) for k in ("mpp", "mpp_source", "mpp_estimate",
                                                                               "nuclei", "density_per_mm2",
                                                                               "warnings")}}
    path = RESULTS / f"explain_{args.slide.stem}.json"
    write_result(path, out, models=["default"])
    print(json.dumps({k: v for k, v in out.items() if k != "candidates"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
