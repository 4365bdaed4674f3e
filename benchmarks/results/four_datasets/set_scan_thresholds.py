"""Give the shipped `default` and `precise` detectors (and the default bundle's, the same weights as `default`) a
score threshold per scan magnification, as ship_rule_threshold_40x.txt decided: the 20x and 40x thresholds are the
shipping rule's within each group (bench_thresholds.per_scan) on the validation sweeps of
detection/thresholds_val_{default,precise}.json. Only the config in each file's metadata changes; the tensors are
written back byte for byte.

    python benchmarks/results/four_datasets/set_scan_thresholds.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/
from bench_thresholds import per_scan  # noqa: E402

from denuc.io.atomic import atomic_path  # noqa: E402

WEIGHTS = HERE.parents[2] / "denuc" / "weights"
RULE = "benchmarks/results/four_datasets/ship_rule_threshold_40x.txt"
TARGETS = {"default": ["detector_default.safetensors", "bundle_default.safetensors"],
           "precise": ["detector_precise.safetensors"]}


def main() -> None:
    for model, files in TARGETS.items():
        sweep = json.loads((HERE.parent / "detection" / f"thresholds_val_{model}.json").read_text())
        groups = {"20x": ["brcam2c", "crchisto"], "40x": ["consep", "monuseg"]}
        chosen = per_scan(sweep["results"], groups)
        for name in files:
            path = WEIGHTS / name
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata())
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            config = json.loads(metadata["denuc_detector"])
            config.update(score_threshold=chosen["threshold"]["20x"], score_threshold_40x=chosen["threshold"]["40x"])
            metadata["denuc_detector"] = json.dumps(config, sort_keys=True)
            metadata["scan_thresholds"] = json.dumps({"rule": RULE, "validation": f"detection/thresholds_val_{model}"
                                                      ".json", "per_scan": chosen})
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            print(name, chosen["threshold"], f"validation mean F1 {chosen['mean_f1']:.4f}")


if __name__ == "__main__":
    main()
