"""Ship the run that ship_rule_train_reassembled.txt chose as `precise`: the run's model with the score thresholds
of the rule's comparison (bench_thresholds' per-scan rule on thresholds_val4_trained_reassembled.json), at the run's
own NMS radius, under the new tag.

    python benchmarks/results/consep_reassembled/ship_precise.py runs/detector_reassembled/model.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from denuc.hub import shipped
from denuc.inference.detect import Detector

HERE = Path(__file__).resolve().parent
RULE = "benchmarks/results/consep_reassembled/ship_rule_train_reassembled.txt"
VALIDATION = "benchmarks/results/consep_reassembled/thresholds_val4_trained_reassembled.json"


def main() -> None:
    run_model = Path(sys.argv[1])
    model = shipped("precise")
    chosen = json.loads((HERE.parents[2] / VALIDATION).read_text())["summary"]["per_scan"]
    detector = Detector.from_pretrained(run_model)
    detector.with_settings(score_threshold=chosen["threshold"]["20x"], score_threshold_40x=chosen["threshold"]["40x"])
    run = json.loads((run_model.parent / "log.json").read_text())
    best = max(run, key=lambda row: row["val_f1_mean"])
    detector.save(model.path, {"training_data": model.training_data, "licence": model.licence,
                               "epoch": best["epoch"], "scan_thresholds": {"rule": RULE, "validation": VALIDATION,
                                                                           "per_scan": chosen}}, tag=model.tag)
    print(model.path, model.tag, chosen["threshold"], f"validation mean F1 {chosen['mean_f1']:.4f}")


if __name__ == "__main__":
    main()
