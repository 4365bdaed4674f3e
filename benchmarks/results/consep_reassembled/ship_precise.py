"""Ship a run that a rule chose as `precise`: the run's model with the score thresholds of the rule's comparison
(bench_thresholds' per-scan rule in the validation file), at the run's own NMS radius, under `precise`'s tag in
denuc.hub.

    python benchmarks/results/consep_reassembled/ship_precise.py RUN/model.safetensors RULE VALIDATION

0.8.0's first `precise`: runs/detector_reassembled/model.safetensors, ship_rule_train_reassembled.txt,
thresholds_val4_trained_reassembled.json; its second: runs/detector_one_to_one/model.safetensors,
ship_rule_one_to_one.txt, thresholds_val4_one_to_one.json (both files in this folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from denuc.hub import shipped
from denuc.inference.detect import Detector

HERE = Path(__file__).resolve().parent


def main() -> None:
    run_model, rule, validation = Path(sys.argv[1]), HERE / sys.argv[2], HERE / sys.argv[3]
    model = shipped("precise")
    chosen = json.loads(validation.read_text())["summary"]["per_scan"]
    detector = Detector.from_pretrained(run_model)
    detector.with_settings(score_threshold=chosen["threshold"]["20x"], score_threshold_40x=chosen["threshold"]["40x"])
    run = json.loads((run_model.parent / "log.json").read_text())
    best = max(run, key=lambda row: row["val_f1_mean"])
    repo = HERE.parents[2]
    thresholds = {"rule": str(rule.relative_to(repo)), "validation": str(validation.relative_to(repo)),
                  "per_scan": chosen}
    detector.save(model.path, {"training_data": model.training_data, "licence": model.licence,
                               "epoch": best["epoch"], "scan_thresholds": thresholds}, tag=model.tag)
    print(model.path, model.tag, chosen["threshold"], f"validation mean F1 {chosen['mean_f1']:.4f}")


if __name__ == "__main__":
    main()
