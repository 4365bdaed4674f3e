"""Ship a run that a rule chose as `precise`: the run's model with the score thresholds of the rule's comparison
(bench_thresholds' per-scan rule in the validation file), at the run's own NMS radius, under `precise`'s tag in
denuc.hub.

    python benchmarks/results/consep_reassembled/ship_precise.py RUN/model.safetensors RULE VALIDATION \
        [TILE_RULE TILE_VALIDATION]

0.8.0's first `precise`: runs/detector_reassembled/model.safetensors, ship_rule_train_reassembled.txt,
thresholds_val4_trained_reassembled.json; its second: runs/detector_one_to_one/model.safetensors,
ship_rule_one_to_one.txt, thresholds_val4_one_to_one.json (both files in this folder). Since 0.9.0 also
../classification/pipeline_tile_thresholds_rule.txt ../detection/thresholds_val_precise_tiles608.json: the
thresholds of a sweep at larger tiles (its per-scan rule), for tiles at least that size (the pipeline's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from denuc.hub import shipped
from denuc.inference.detect import Detector

HERE = Path(__file__).resolve().parent


def main() -> None:
    run_model = Path(sys.argv[1])
    rule, validation, *at_tiles = ((HERE / name).resolve() for name in sys.argv[2:6])  # relative to this folder
    model = shipped("precise")
    chosen = json.loads(validation.read_text())["summary"]["per_scan"]
    detector = Detector.from_pretrained(run_model)
    repo = HERE.parents[2]
    metadata = {"training_data": model.training_data, "licence": model.licence,
                "scan_thresholds": {"rule": str(rule.relative_to(repo)),
                                    "validation": str(validation.relative_to(repo)), "per_scan": chosen}}
    large_tiles = None
    if at_tiles:
        tile_rule, tile_validation = at_tiles
        sweep = json.loads(tile_validation.read_text())
        at_tile = sweep["summary"]["per_scan"]
        large_tiles = (sweep["tile"][0], at_tile["threshold"]["20x"], at_tile["threshold"]["40x"])
        metadata["large_tile_thresholds"] = {"rule": str(tile_rule.relative_to(repo)),
                                             "validation": str(tile_validation.relative_to(repo)),
                                             "per_scan": at_tile}
    detector.with_settings(score_threshold=chosen["threshold"]["20x"], score_threshold_40x=chosen["threshold"]["40x"],
                           large_tile_thresholds=large_tiles)
    run = json.loads((run_model.parent / "log.json").read_text())
    metadata["epoch"] = max(run, key=lambda row: row["val_f1_mean"])["epoch"]
    detector.save(model.path, metadata, tag=model.tag)
    print(model.path, model.tag, chosen["threshold"], f"validation mean F1 {chosen['mean_f1']:.4f}",
          f"from {large_tiles[0]}-px tiles {large_tiles[1:]}" if large_tiles else "")


if __name__ == "__main__":
    main()
