"""Pretrained (`denuc pretrain`) against random initialisation of the shipped bundle's compact encoder: a linear
probe on BRCAM2C (issue 32). The rule was written before the runs: results/pretrain/rule.txt.

    python benchmarks/bench_pretrain.py [--epochs 4 --iters-per-epoch 60 --batch-size 16 --crop-size 128]
        [--runs runs/bench_pretrain] [--out benchmarks/results/pretrain/linear_probe.json]

1. Pretrain torchvision:shufflenet_v2_x1_0 (levels maxpool, stage2-4) on the train splits of BRCAM2C and
   CRCHisto, labels unused (the nuclei come from the shipped default detector).
   With ``--init WEIGHTS`` (e.g. `denuc export-backbone default`) pretraining starts from them instead of
   random weights. With ``--pretrained RUN_DIR`` a run made elsewhere (a GPU: benchmarks/gpu/pretrain.sh) is
   probed instead of pretraining here.
2. `train-classifier --mode frozen` on BRCAM2C, the same recipe and seed, from random weights, from ``--init``'s
   if given, and from the pretrained ones (the detections of the first run are reused: same detector, images).
3. Score each classifier at BRCAM2C validation's ground-truth points (bench_classification.at_ground_truth:
   argmax over the 3 classes), also re-stained with ``--restain``, and end to end (its own validation score).
   The primary gain is the pretrained arm's over where pretraining started (random init, or ``--init``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_classification import at_ground_truth, restainer, summary
from common import RESULTS, write_result

from denuc.config import ClassifierConfig, ClassifierTrainConfig, DatasetSpec, PretrainConfig
from denuc.datasets import get_dataset
from denuc.inference.pipeline import Pipeline
from denuc.io.images import read_image
from denuc.metrics.evaluate import evaluate
from denuc.nuclei import UNLABELLED
from denuc.train.classifier import train_classifier
from denuc.train.pretrain import pretrain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ENCODER = "torchvision:shufflenet_v2_x1_0"
LAYERS = ["maxpool", "stage2", "stage3", "stage4"]


def ground_truth_points(bundle: Path, root: Path, split: str = "val",
                        restain: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Mean class F1 of the bundle's classifier at the ground-truth points of BRCAM2C's ``split`` (3 um), the
    images re-stained by ``restain`` first if given."""
    model = Pipeline.from_pretrained(bundle, taxonomy="brcam2c")
    pairs = []
    for sample in get_dataset("brcam2c", root).samples(split):
        image = read_image(sample.image_path)
        labels = at_ground_truth(model, sample, image if restain is None else restain(image))
        labels[sample.nuclei.labels == UNLABELLED] = UNLABELLED
        pairs.append((sample.name, replace(sample.nuclei, labels=labels), sample.nuclei))
    return summary(evaluate(pairs, radius_um=3.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iters-per-epoch", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4, help="(default: the rule's run's, above the command's "
                                                                  "default for its batch)")
    parser.add_argument("--teacher-temp", type=float, default=PretrainConfig.teacher_temp,
                        help="also the warm-up's starting temperature when lower than the default's")
    parser.add_argument("--momentum-teacher", type=float, default=PretrainConfig.momentum_teacher)
    parser.add_argument("--prototypes", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_pretrain"))
    parser.add_argument("--nuclei-cache", type=Path, help="a nuclei_*.npz of an earlier run with the same detector")
    parser.add_argument("--note", default="the run the rule decides on",
                        help="what this run is (e.g. an exploratory setting chosen after the rule's run)")
    parser.add_argument("--init", type=Path, help="start pretraining from these encoder weights (e.g. `denuc "
                        "export-backbone default`); adds their own probe as the arm to beat (default: random init)")
    parser.add_argument("--restain", default="none", help="also probe on validation re-stained so "
                        "(bench_classification.py's --restain names, e.g. macenko-cmu1)")
    parser.add_argument("--pretrained", type=Path, metavar="RUN_DIR", help="probe this finished `denuc pretrain` "
                        "run (e.g. one made on a GPU: benchmarks/gpu/pretrain.sh) instead of pretraining here; its "
                        "config.json and log.json are recorded, the pretraining options above are not used")
    parser.add_argument("--win-margin", type=float, default=0.05, help="the rule's primary gain to win")
    parser.add_argument("--rule", type=Path, default=RESULTS / "pretrain" / "rule.txt")
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrain" / "linear_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    brcam2c, crchisto = SHARED / "brcam2c", SHARED / "crchisto"

    cfg = PretrainConfig(datasets=[DatasetSpec("brcam2c", str(brcam2c)), DatasetSpec("crchisto", str(crchisto))],
                         encoder=ENCODER, encoder_layers=LAYERS, encoder_kwargs={}, crop_size=args.crop_size,
                         batch_size=args.batch_size, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
                         warmup_iters=args.iters_per_epoch, teacher_temp_warmup_epochs=1,
                         prototypes=args.prototypes, head_hidden=512, threads=args.threads, lr=args.lr,
                         teacher_temp=args.teacher_temp,
                         warmup_teacher_temp=min(args.teacher_temp, PretrainConfig.warmup_teacher_temp),
                         momentum_teacher=args.momentum_teacher,
                         encoder_weights=None if args.init is None else str(args.init.resolve()))
    if args.pretrained is not None:  # made elsewhere: its own settings are the record
        run, pretrain_seconds = args.pretrained, None
        weights, config = run / "encoder.safetensors", json.loads((run / "config.json").read_text())
    else:
        run = args.runs / "pretrain"
        if args.nuclei_cache is not None:
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.nuclei_cache, run / args.nuclei_cache.name)
        started = time.perf_counter()
        weights, config = pretrain(cfg, run, overwrite=True, progress=True), cfg.to_dict()
        pretrain_seconds = time.perf_counter() - started

    restain = None if args.restain == "none" else restainer(args.restain)
    starts = [("random_init", None)] + ([("initial_weights", str(args.init.resolve()))] if args.init else [])
    arms = {}
    for name, init in starts + [("pretrained", str(weights.resolve()))]:
        probe = ClassifierTrainConfig(datasets=[DatasetSpec("brcam2c", str(brcam2c))], mode="frozen",
                                      model=ClassifierConfig(encoder=ENCODER, encoder_weights=init,
                                                             encoder_layers=LAYERS, encoder_kwargs={}),
                                      threads=args.threads)
        folder = args.runs / name
        if name != "random_init":  # the same detector's points on the same images as the first arm's
            folder.mkdir(parents=True, exist_ok=True)
            for cached in (args.runs / "random_init").glob("detections_*.safetensors"):
                shutil.copy(cached, folder / cached.name)
        started = time.perf_counter()
        bundle = train_classifier(probe, folder, overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        log = json.loads((folder / "log.json").read_text())
        best = max(log, key=lambda row: row["val_f1_mean"])
        arms[name] = {"encoder_weights": init, "seconds": seconds,
                      "end_to_end_val_mean_f1_of_selected_epoch": best["val_f1_mean"], "selected_epoch": best["epoch"],
                      "ground_truth_points_val": ground_truth_points(bundle, brcam2c)}
        if restain is not None:
            arms[name][f"ground_truth_points_val_{args.restain}"] = ground_truth_points(bundle, brcam2c,
                                                                                       restain=restain)
        print(name, json.dumps({k: v for k, v in arms[name].items() if k != "ground_truth_points_val"}),
              "GT-point mean F1", round(arms[name]["ground_truth_points_val"]["mean_f1"], 4), flush=True)

    baseline = starts[-1][0]  # pretraining must beat where it started
    gain = (arms["pretrained"]["ground_truth_points_val"]["mean_f1"]
            - arms[baseline]["ground_truth_points_val"]["mean_f1"])
    history = json.loads((run / "log.json").read_text())
    write_result(args.out, {
        "study": "issue 32: nucleus-level self-distillation pretraining vs random init, linear probe on BRCAM2C",
        "note": args.note,
        "rule": args.rule.read_text(),
        "pretraining": {"run": None if args.pretrained is None else str(args.pretrained), "config": config,
                        "steps": config["epochs"] * config["iters_per_epoch"],
                        "seconds": pretrain_seconds, "log": history},
        "probe_recipe": ClassifierTrainConfig(mode="frozen").to_dict() | {"datasets": ["brcam2c"]},
        "arms": arms,
        "primary": {"metric": "BRCAM2C val mean class F1 at ground-truth points", "baseline": baseline, "gain": gain,
                    "margin": args.win_margin, "wins_by_rule": gain >= args.win_margin},
    }, models=["default"])
    print(f"gain over {baseline} {gain:+.4f}: {'wins' if gain >= args.win_margin else 'does not win'} by the rule")


if __name__ == "__main__":
    main()
