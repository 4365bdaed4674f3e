"""Ship the outline head that ship_rule_precise_outlines.txt chose as `precise-outlines`: the run's best epoch under
its tag in denuc.hub, with the training data and licence of that entry.

    python benchmarks/results/outlines/ship_precise_outlines.py runs/outline_precise/best.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from denuc.hub import shipped
from denuc.inference.outline import Outliner
from denuc.train.outlines import save_outline_head

RULE = "benchmarks/results/outlines/ship_rule_precise_outlines.txt"


def main() -> None:
    run_head = Path(sys.argv[1])
    model = shipped("precise-outlines")
    head = Outliner.from_pretrained(run_head).model
    run = json.loads((run_head.parent / "log.json").read_text())
    best = max(run, key=lambda row: row["val_f1_mean"])
    save_outline_head(head, model.path, {"training_data": model.training_data, "licence": model.licence,
                                         "epoch": best["epoch"], "val_star_iou": best["val_f1_mean"], "rule": RULE},
                      tag=model.tag)
    print(model.path, model.tag, f"epoch {best['epoch']}, validation mean star IoU {best['val_f1_mean']:.4f}")


if __name__ == "__main__":
    main()
