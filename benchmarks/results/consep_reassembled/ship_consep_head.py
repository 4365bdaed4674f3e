"""Ship a `consep` head that a rule chose into the default bundle: the run's bundle (`train-classifier --base
default-bundle --dataset consep=...`) is checked to hold the shipped bundle's every other tensor bit for bit, then
written over `default-bundle` with the shipped file's metadata (licence, thresholds, the other heads' training record),
the training data as denuc.hub states it, the run's classifier config and offsets, the new head's record
(`consep_head`: its validation, epoch, recipe, the rule and the comparison that chose it) and the tag in denuc.hub.

    python benchmarks/results/consep_reassembled/ship_consep_head.py RUN/model.safetensors RULE VALIDATION

0.10.0's MLP head: runs/bundle_consep_mlp/model.safetensors consep_head_mlp_rule.txt consep_head_mlp_val.json (the
last two in this folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from denuc.hub import shipped, stamp

HERE = Path(__file__).resolve().parent
HEAD = "classifier.heads.consep."


def main() -> None:
    run_bundle = Path(sys.argv[1])
    rule, validation = ((HERE / name).resolve() for name in sys.argv[2:4])  # relative to this folder
    model = shipped("default-bundle")
    before, after = load_file(str(model.path)), load_file(str(run_bundle))
    for key in set(before) | set(after):
        if not key.startswith(HEAD):
            assert key in before and key in after and before[key].dtype == after[key].dtype, key
            assert torch.equal(before[key], after[key]), key
    with safe_open(str(model.path), framework="pt") as f:
        metadata = dict(f.metadata())
    with safe_open(str(run_bundle), framework="pt") as f:
        trained = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
    repo = HERE.parents[2]
    metadata |= {"training_data": json.dumps(model.training_data),
                 "denuc_classifier": json.dumps(trained["denuc_classifier"]),
                 "class_offsets": json.dumps(trained["class_offsets"]),
                 "consep_head": json.dumps({"val_f1": trained["val_f1"], "epoch": trained["epoch"],
                                            "train_config": trained["train_config"],
                                            "rule": str(rule.relative_to(repo)),
                                            "validation": str(validation.relative_to(repo))})}
    save_file(after, str(model.path), metadata=stamp(metadata, model.tag))
    print(model.path, model.tag, "consep head:", trained["denuc_classifier"].get("taxonomy_heads"),
          "epoch", trained["epoch"], trained["val_f1"])


if __name__ == "__main__":
    main()
