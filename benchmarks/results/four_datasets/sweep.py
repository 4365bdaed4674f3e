"""Validation sweep (threshold x NMS radius) of a detector on the four datasets' validation splits."""
import json
import sys
import time

from denuc.config import DatasetSpec, DetectorTrainConfig
from denuc.inference.detect import Detector
from denuc.train.data import load_split
from denuc.train.detector import tune_thresholds, validate

S = "/work/shared/datasets"
model, out = sys.argv[1], sys.argv[2]
det = Detector.from_pretrained(model)
cfg = DetectorTrainConfig(datasets=[DatasetSpec(n, f"{S}/{n}") for n in ("brcam2c", "crchisto", "consep", "monuseg")],
                          model=det.config)
t = time.time()
own = validate(det, load_split(cfg, "val"))
chosen = tune_thresholds(model, cfg, out + ".safetensors")
json.dump({"model": model, "own_settings": {"score_threshold": det.config.score_threshold,
           "nms_radius_um": det.config.nms_radius_um, **own}, "chosen": chosen, "seconds": time.time() - t,
           "command": " ".join(sys.argv)}, open(out + ".json", "w"), indent=1)
print(json.dumps({"own": own, "chosen": chosen}))
