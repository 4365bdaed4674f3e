"""All configuration in one place: dataclasses with defaults that work.

A model's config travels inside its weights file (safetensors metadata), so a saved detector knows its
architecture, its working pixel size and the thresholds chosen for it on validation data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class DetectorConfig:
    """Architecture and inference settings of a point detector."""

    backbone: str = "shufflenet_v2_x0_5"  # shufflenet_v2_x{0_5,1_0,1_5,2_0} or resnet50
    neck_channels: int = 64
    head_convs: int = 3
    head_stride: int = 4  # 8 is the paper's grid; 4 halves the grid's quantisation error (see ANCHORS.md)
    mpp: float = 0.5  # working resolution (um/px): inputs are resampled to it
    score_threshold: float = 0.5
    nms_radius_um: float = 2.0
    tile_size: int = 256
    tile_overlap: int = 32

    def __post_init__(self) -> None:
        # tiles start on multiples of the backbone's stride (32) so every tile's anchor grid lines up
        if self.tile_size % 32 or self.tile_overlap % 32 or not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_size ({self.tile_size}) and tile_overlap ({self.tile_overlap}) must be "
                             "multiples of 32 with overlap < tile size")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DetectorConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown detector config keys {sorted(unknown)}")
        return cls(**data)


@dataclass
class DatasetSpec:
    """One training source: a dataset name understood by denuc.datasets.get_dataset and its root folder."""

    name: str
    root: str


@dataclass
class DetectorTrainConfig:
    """Training of a point detector (the paper's defaults where it gives them)."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    model: DetectorConfig = field(default_factory=DetectorConfig)
    crop_size: int = 256
    batch_size: int = 16
    epochs: int = 20
    iters_per_epoch: int = 250
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    match_distance_weight: float = 0.1  # cost = 0.1 x distance - nucleus probability
    match_topk: int = 1
    coord_loss_weight: float = 5e-3
    background_weight: float = 0.5
    scale_jitter: float = 0.1  # crops rescaled by a factor in [1 - j, 1 + j]
    color_jitter: float = 0.1  # brightness / contrast / saturation / stain (HED) perturbation strength
    seed: int = 0
    threads: int = 0  # 0: torch's default

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorTrainConfig":
        data = dict(data)
        data["datasets"] = [DatasetSpec(**d) for d in data.get("datasets", [])]
        data["model"] = DetectorConfig(**data.get("model", {}))
        return cls(**data)
