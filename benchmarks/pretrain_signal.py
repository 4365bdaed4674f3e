"""Why short `denuc pretrain` runs stay near ln(prototypes): how much the two views agree, and what a run learns.

    python benchmarks/pretrain_signal.py [--steps 120] [--out benchmarks/results/pretrain/signal.json]

1. At initialisation (the compact encoder of the bundle, random weights or ``--init``'s, and the DINO heads), for
   batches of view pairs drawn as `denuc pretrain` draws them (BRCAM2C train split, 128 px crops): the cosine, after
   centring over the batch, between the teacher's outputs for the two views of one region (or one nucleus)
   against two different ones, and how often a view's nearest other view is its own pair (retrieval top-1;
   chance is one in the batch). Both with the default views and with views at one pixel size without colour
   augmentation (what is left is the crop's position, flips and turns). Self-distillation can only learn what
   the teacher's two views share.
2. A short run of `denuc pretrain` (the same settings as bench_pretrain.py) logs per epoch the loss and its floor,
   the entropy of the teacher's targets; and at its end, from ``last.pt``, the mean cosine between the student's
   embeddings (head bottleneck, L2-normalised) of different regions of one batch, against the same at
   initialisation: embeddings that converge are the collapse DINO's centring and sharpening fight.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_pretrain import ENCODER, LAYERS, SHARED
from common import RESULTS, write_result

from denuc.config import DatasetSpec, PretrainConfig
from denuc.inference.detect import Detector
from denuc.models.encoders import Encoder, create_encoder
from denuc.train.pretrain import SelfDistillation, pretrain
from denuc.train.regions import pretraining_regions, region_nuclei
from denuc.train.views import ViewPairBatches


def settings(steps: int, **changes) -> PretrainConfig:
    return PretrainConfig(datasets=[DatasetSpec("brcam2c", str(SHARED / "brcam2c"))],
                          encoder=ENCODER, encoder_layers=LAYERS, encoder_kwargs={}, crop_size=128, batch_size=16,
                          epochs=max(1, steps // 60),
                          iters_per_epoch=min(steps, 60), warmup_iters=min(steps, 60), teacher_temp_warmup_epochs=1,
                          prototypes=1024, head_hidden=512, lr=5e-4, threads=2, **changes)


def encoder(cfg: PretrainConfig) -> Encoder:
    return create_encoder(cfg.encoder, weights=cfg.encoder_weights, layers=cfg.encoder_layers)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Rows of ``a`` and ``b`` are the two views of one item: centred cosines, same item against others."""
    centre = torch.cat([a, b]).mean(0)
    ea, eb = F.normalize(a - centre, dim=-1), F.normalize(b - centre, dim=-1)
    cosine = ea @ eb.T
    others = ~torch.eye(len(a), dtype=torch.bool)
    return {"same": cosine.diag().mean().item(), "different": cosine[others].mean().item(),
            "retrieval_top1": (cosine.argmax(1) == torch.arange(len(a))).float().mean().item(),
            "chance": 1 / len(a), "items": len(a)}


def batches(cfg: PretrainConfig, count: int, cache: Path) -> list[dict]:
    regions = pretraining_regions(cfg)
    nuclei = region_nuclei(regions, Detector.from_pretrained(cfg.detector), cache, progress=False)
    draw = iter(ViewPairBatches(regions, nuclei, cfg, 0, count, 0))
    return [next(draw) for _ in range(count)]


@torch.no_grad()
def view_agreement(model: SelfDistillation, batch: dict) -> dict:
    images = torch.cat([batch["images_a"], batch["images_b"]])
    points = list(batch["points_a"] + batch["points_b"])
    maps = model.teacher.encoder(images)
    pooled = maps[-1].mean((2, 3))
    image_scores, nucleus_scores = model.teacher(images, points)
    half, nuclei = len(pooled) // 2, len(nucleus_scores) // 2
    return {"pooled_features": agreement(pooled[:half], pooled[half:]),
            "image_head": agreement(image_scores[:half], image_scores[half:]),
            "nucleus_head": agreement(nucleus_scores[:nuclei], nucleus_scores[nuclei:])}


@torch.no_grad()
def embedding_cosine(model: SelfDistillation, batch: dict) -> float:
    """Mean cosine between the student's image embeddings (bottleneck, normalised) of different views, batch
    norm with the batch's statistics as in training."""
    model.train()
    images = torch.cat([batch["images_a"], batch["images_b"]])
    embedded = F.normalize(model.student.image_head.mlp(model.student.encoder(images)[-1].mean((2, 3))), dim=-1)
    cosine = embedded @ embedded.T
    return cosine[~torch.eye(len(cosine), dtype=torch.bool)].mean().item()


def mean_of(rows: list[dict]) -> dict:
    return {key: {k: float(np.mean([r[key][k] for r in rows])) for k in rows[0][key]} for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 view pairs for part 1")
    parser.add_argument("--init", type=Path, help="encoder weights to start from (e.g. `denuc export-backbone "
                        "default`; default: random initialisation)")
    parser.add_argument("--runs", type=Path, default=Path("runs/pretrain_signal"))
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrain" / "signal.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.runs.mkdir(parents=True, exist_ok=True)
    cache = args.runs / "nuclei.npz"
    weights = None if args.init is None else str(args.init.resolve())

    conditions = {"default_views": {}, "one_pixel_size_no_colour": {"other_mpp": (0.5, 0.5), "color_jitter": 0.0,
                                                                   "stain_vector_jitter": 0.0}}
    at_init = {}
    for name, changes in conditions.items():
        cfg = settings(args.steps, encoder_weights=weights, **changes)
        torch.manual_seed(cfg.seed)
        model = SelfDistillation(encoder(cfg), cfg).train()
        at_init[name] = mean_of([view_agreement(model, b) for b in batches(cfg, args.batches, cache)])
        print(name, json.dumps(at_init[name]), flush=True)

    cfg = settings(args.steps, encoder_weights=weights)
    probe = batches(cfg, 1, cache)[0]
    torch.manual_seed(cfg.seed)
    start = SelfDistillation(encoder(cfg), cfg)
    cosine_at_init = embedding_cosine(start, probe)
    run = args.runs / "pretrain"
    pretrain(cfg, run, overwrite=True, progress=False)
    trained = SelfDistillation(encoder(cfg), cfg)
    trained.load_state_dict(torch.load(run / "last.pt", weights_only=False)["distillation"])
    log = json.loads((run / "log.json").read_text())
    result = {
        "study": "issue 32: what the teacher's two views share at initialisation, and what a short run learns",
        "config": json.loads((run / "config.json").read_text()),
        "at_initialisation": at_init,
        "run": {"log": [{k: row[k] for k in ("epoch", "image_loss", "image_target_entropy", "nucleus_loss",
                                             "nucleus_target_entropy")} for row in log],
                "ln_prototypes": float(np.log(cfg.prototypes)),
                "student_embedding_cosine": {"initialisation": cosine_at_init,
                                             "end": embedding_cosine(trained, probe)}},
    }
    print(json.dumps(result["run"], indent=1))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
