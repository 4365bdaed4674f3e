"""All configuration in one place: dataclasses with defaults that work.

A model's config travels inside its weights file (safetensors metadata), so a saved detector knows its
architecture, its working pixel size and the thresholds chosen for it on validation data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

RUNTIMES = ("auto", "torch", "onnx")
"""Where the networks run: PyTorch (any device), ONNX Runtime (CPU), or "auto": ONNX Runtime on a CPU, where
it is the faster of the two (docs/benchmarks.md), and PyTorch on a GPU (``inference.detect.choose_runtime``)."""
MPP_AUTO = "auto"
"""The pixel size that asks for an estimate from the image itself (``--mpp auto``, a manifest's ``auto``;
``inference.mpp``, docs/pixel_size.md)."""
FINE_SCAN_MPP = 0.35
"""Scans finer than this (um/px) count as 40x (0.22-0.27 um/px on common scanners), coarser ones as 20x (0.46-0.52):
a detector may have a score threshold for each (``DetectorConfig.threshold_for``)."""


class _ModelConfig:
    """JSON of a model's config dataclass, as it travels in the weights' metadata; ``_what`` names it in errors."""

    _what = "model"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls._what} config keys {sorted(unknown)}")
        return cls(**data)


class _TrainConfig:
    """A training recipe as the plain dict its run folder keeps (``config.json``, ``last.pt``), and back:
    ``datasets`` are ``DatasetSpec``s, ``model`` (when ``_model`` names its class) that model's config."""

    _model: type | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["datasets"] = [DatasetSpec(**d) for d in data.get("datasets", [])]
        if cls._model is not None:
            data["model"] = cls._model(**data.get("model", {}))
        return cls(**data)


@dataclass
class DetectorConfig(_ModelConfig):
    """Architecture and inference settings of a point detector."""

    _what = "detector"

    backbone: str = "shufflenet_v2_x0_5"  # shufflenet_v2_x{0_5,1_0,1_5,2_0} or resnet50
    neck_channels: int = 64
    head_convs: int = 3
    # the head's 3x3 convs depthwise-separable (depthwise 3x3 + pointwise 1x1, as in NanoDet's head): 0.70x the
    # 0.5x network's time (ONNX Runtime, random weights), 0.87x end to end, -1.3 validation F1 (DETECTOR_CARD.md)
    head_separable: bool = False
    head_stride: int = 8  # the paper's grid; a stride-4 head measured less accurate and 3x slower (DETECTOR_CARD.md)
    mpp: float = 0.5  # working resolution (um/px): inputs are resampled to it
    score_threshold: float = 0.5
    # the threshold for images scanned finer than FINE_SCAN_MPP (40x); None: score_threshold for every scan. 40x
    # scans, shrunk to the working grid, score their nuclei lower than 20x ones (DETECTOR_CARD.md)
    score_threshold_40x: float | None = None
    nms_radius_um: float = 2.0
    tile_size: int = 256
    tile_overlap: int = 32
    # (tile size, 20x threshold, 40x threshold or None): thresholds chosen on validation at larger tiles, used for
    # tiles at least that size (the pipeline enlarges a detector's tiles to give a classifier its context). A
    # detector trained on small crops scores nuclei far from a tile's border lower (DETECTOR_CARD.md); None: the
    # thresholds above at every tile size
    large_tile_thresholds: tuple[int, float, float | None] | None = None
    # test-time augmentation: 1 (off), 2, 4 or 8 flipped/transposed views of each tile, their points fused
    # (``denuc.inference.tta.fuse_views``); 8 measured +1.5 validation F1 points for 8x the network's time
    test_time_views: int = 1

    def __post_init__(self) -> None:
        if self.test_time_views not in (1, 2, 4, 8):
            raise ValueError(f"test_time_views must be 1, 2, 4 or 8, got {self.test_time_views}")
        # tiles start on multiples of the backbone's stride (32) so every tile's anchor grid lines up
        if self.tile_size % 32 or self.tile_overlap % 32 or not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"tile_size ({self.tile_size}) and tile_overlap ({self.tile_overlap}) must be "
                             "multiples of 32 with overlap < tile size")
        if self.large_tile_thresholds is not None:  # JSON gives a list
            self.large_tile_thresholds = tuple(self.large_tile_thresholds)
            if len(self.large_tile_thresholds) != 3:
                raise ValueError("large_tile_thresholds must be (tile size, 20x threshold, 40x threshold or None), "
                                 f"got {self.large_tile_thresholds}")

    def threshold_for(self, scan_mpp: float | None) -> float:
        """The score threshold for an image scanned at ``scan_mpp`` um/px (None: unknown, the 20x threshold), at
        this config's tile size."""
        threshold, threshold_40x = self.score_threshold, self.score_threshold_40x
        if self.large_tile_thresholds is not None and self.tile_size >= self.large_tile_thresholds[0]:
            threshold, threshold_40x = self.large_tile_thresholds[1:]
        if threshold_40x is not None and scan_mpp is not None and scan_mpp < FINE_SCAN_MPP:
            return threshold_40x
        return threshold

    def architecture(self) -> str:
        """What fixes the weights' shapes and meaning, in words (thresholds and tiling are not part of it)."""
        return (f"{self.backbone} (neck {self.neck_channels} ch, {self.head_convs} "
                f"{'separable ' if self.head_separable else ''}head convs, head stride {self.head_stride}, "
                f"{self.mpp} um/px)")


@dataclass
class DatasetSpec:
    """One training source: a dataset name understood by denuc.datasets.get_dataset and its root folder."""

    name: str
    root: str

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        """From the command line's ``NAME=ROOT``, e.g. ``brcam2c=/data/brcam2c``."""
        if "=" not in text:
            raise ValueError(f"{text!r}: a dataset is given as NAME=ROOT, e.g. brcam2c=/data/brcam2c")
        name, root = text.split("=", 1)
        return cls(name, root)


def _check_schedule(cfg: "DetectorTrainConfig | ClassifierTrainConfig | OutlineTrainConfig | PretrainConfig") -> None:
    """The numbers every training recipe needs: whole counts of at least 1, a positive finite learning rate."""
    for name in ("epochs", "iters_per_epoch", "batch_size", "crop_size"):
        if not hasattr(cfg, name):  # an outline head trains on patches of its own size, not crops
            continue
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {getattr(cfg, name)}")
    if not (isinstance(cfg.warmup_iters, int) and cfg.warmup_iters >= 0):
        raise ValueError(f"warmup_iters must be a whole number >= 0, got {cfg.warmup_iters}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0) or not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"lr must be > 0 and weight_decay >= 0 (finite), got {cfg.lr} and {cfg.weight_decay}")


SAMPLINGS = ("image", "dataset")


@dataclass
class DetectorTrainConfig(_TrainConfig):
    """Training of a point detector (the paper's defaults where it gives them)."""

    _model = DetectorConfig

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
    # every ground-truth point its own anchors (Hungarian), not first claim wins (train.detector.match_anchors)
    match_one_to_one: bool = False
    coord_loss_weight: float = 5e-3
    background_weight: float = 0.5
    scale_jitter: float = 0.1  # crops rescaled by a factor in [1 - j, 1 + j]
    color_jitter: float = 0.1  # stain (HED), brightness and contrast perturbation strength
    stain_vector_jitter: float = 0.0  # noise on the H and E colour vectors (train.stain.color_jitter; 0: off)
    # probability that a crop is first re-stained to a virtual template drawn from the training images' CIELAB
    # statistics (RandStainNA; 0: off)
    randstainna: float = 0.0
    # which training images crops come from: "image" (each image alike) or "dataset" (each dataset alike, then
    # images by area: for joint training on datasets of very different sizes; ``train.detector.sampling_weights``)
    sampling: str = "image"
    # probability that a crop is drawn around a crowded ground-truth nucleus (denuc.metrics.crowding) of the image
    # picked: dense clusters, rare in random crops, are where detectors miss most (0: off)
    crowded_crops: float = 0.0
    # a nucleus cut by a crop's edge is labelled at the centre of its part inside the crop (modelled as a disc of
    # this radius in um; under a fifth inside: no nucleus), as annotators label nuclei cut by an image's border
    # (CoNSeP's crops, MoNuSeg's outlines, BRCAM2C's clicks); 0: its whole centre, and none if that is outside
    cut_nucleus_radius_um: float = 0.0
    ema_decay: float | None = None  # validate and save an exponential moving average of the weights (e.g. 0.998)
    seed: int = 0
    threads: int = 0  # 0: torch's default
    init: str | None = None  # fine-tuning: start from this denuc detector (file or shipped name), not random
    backbone_weights: str | None = None  # an ImageNet checkpoint of the torchvision backbone, loaded strictly

    def __post_init__(self) -> None:
        _check_schedule(self)
        for name in ("color_jitter", "scale_jitter", "stain_vector_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("randstainna", "crowded_crops"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.cut_nucleus_radius_um) and self.cut_nucleus_radius_um >= 0):
            raise ValueError(f"cut_nucleus_radius_um must be >= 0, got {self.cut_nucleus_radius_um}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")


@dataclass
class ClassifierConfig(_ModelConfig):
    """A nucleus classifier: the image encoder whose dense features are read at nucleus points, and the head.

    ``encoder`` is a name understood by ``denuc.models.encoders.create_encoder`` (a built-in foundation model,
    ``timm:<model>`` or ``torchvision:<model>``); ``encoder_weights`` the local file its weights come from (None:
    random initialisation, or weights stored in the model file itself).
    """

    _what = "classifier"

    encoder: str = "timm:regnetx_002"
    encoder_weights: str | None = None
    encoder_layers: list[int] | list[str] | None = None  # None: the encoder's default levels
    encoder_kwargs: dict = field(default_factory=lambda: {"num_classes": 0})  # architecture overrides
    head: str = "linear"  # "linear" or "mlp"
    # taxonomies whose head is of another kind than ``head`` (heads added to a bundle with another kind)
    taxonomy_heads: dict[str, str] = field(default_factory=dict)
    mlp_hidden: int = 256
    mpp: float = 0.5  # working resolution (um/px); must match the detector's in a Pipeline

    def head_kind(self, taxonomy: str) -> str:
        """The kind of ``taxonomy``'s head: "linear" or "mlp"."""
        return self.taxonomy_heads.get(taxonomy, self.head)


CLASSIFIER_MODES = ("frozen", "lora", "full", "joint")
PROTOCOLS = ("denuc", "ocelot", "puma", "hungarian")  # point-matching protocols (``denuc.metrics.evaluate``)
HEADS = ("linear", "mlp")  # classification heads (``denuc.models.heads.create_head``)


@dataclass
class ClassifierTrainConfig(_TrainConfig):
    """Training of a nucleus classifier on the labelled ground truth of one or more datasets.

    Modes: ``frozen`` (features extracted once and cached, only the head trains: the paper's "Linear"),
    ``lora`` (low-rank adapters on the encoder's linear and convolution layers), ``full`` (every weight), and
    ``joint``: the end-to-end baseline, one network for detection and classification (``train_joint``).
    """

    _model = ClassifierConfig

    datasets: list[DatasetSpec] = field(default_factory=list)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    mode: str = "frozen"
    detector: str = "default"  # its false positives on the training images are the "not a nucleus" examples
    # a bundle (shipped name or file) to add heads to: its detector, frozen encoder and other heads are kept as they
    # are and heads are trained for ``datasets`` only (one of the same name is replaced); mode "frozen", and
    # ``model`` and ``detector`` are the bundle's (``train_classifier`` records them)
    base: str | None = None
    base_head: str | None = None  # with ``base``: the kind of the heads trained (None: the bundle's, ``head_kind``)
    negatives: bool = True
    match_radius_um: float = 3.0  # a detection farther than this from every ground-truth point is a negative
    class_balanced: bool = False  # weight the loss by inverse class frequency
    offsets: str = "nucleus"  # after training, tune on validation: "none", "nucleus" or "all" (tune_offsets)
    epochs: int = 20
    iters_per_epoch: int = 100  # lora / full: crops batches per epoch (frozen: full passes over the cache)
    batch_size: int = 8
    crop_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    # full mode: validate and keep an exponential moving average of the weights, as the detector's (e.g. 0.999)
    ema_decay: float | None = None
    color_jitter: float = 0.1  # lora / full / joint: stain (HED), brightness and contrast jitter of the crops
    stain_vector_jitter: float = 0.0  # lora / full / joint: noise on the H and E colour vectors (0: off)
    # lora / full / joint: probability that a crop is first re-stained (RandStainNA; see DetectorTrainConfig)
    randstainna: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        _check_schedule(self)
        if self.mode not in CLASSIFIER_MODES:
            raise ValueError(f"unknown classifier training mode {self.mode!r}; choose from {list(CLASSIFIER_MODES)}")
        if self.offsets not in ("none", "nucleus", "all"):
            raise ValueError(f"unknown offsets {self.offsets!r}; choose from ['none', 'nucleus', 'all']")
        if self.base is not None and self.mode != "frozen":
            raise ValueError(f"a base bundle's encoder stays frozen: mode must be 'frozen', got {self.mode!r}")
        if self.base_head is not None and (self.base is None or self.base_head not in HEADS):
            raise ValueError(f"base_head is the kind ({' or '.join(HEADS)}) of heads added to a base bundle, got "
                             f"{self.base_head!r}" + ("" if self.base is not None else " without a base"))
        for name in ("color_jitter", "stain_vector_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.randstainna <= 1:
            raise ValueError(f"randstainna must be a probability in [0, 1], got {self.randstainna}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        # the average is a copy of the whole model: a frozen foundation encoder would be held and updated twice
        if self.ema_decay is not None and self.mode != "full":
            raise ValueError("ema_decay applies to mode 'full' only")
        for name in ("randstainna", "stain_vector_jitter"):
            if getattr(self, name) > 0 and self.mode == "frozen":
                raise ValueError(f"{name} re-colours training crops; mode 'frozen' trains on cached features of "
                                 "the unaugmented images: use mode 'lora' or 'full'")


@dataclass
class OutlineConfig(_ModelConfig):
    """A nucleus outline head: the nucleus's star-convex outline, its distance to the boundary along ``rays``
    evenly spaced directions (StarDist's representation), predicted only at detected points from the detector's own
    feature maps (``denuc.models.outline``): a small MLP reads them on lattices around each point."""

    _what = "outline"

    rays: int = 32  # directions, from +x (angle 0) turning towards +y; a multiple of 4 (flips and rot90 permute them)
    fine_convs: int = 2  # depthwise-separable convs of the head's own on the detector's stride-2 map ...
    coarse_convs: int = 1  # ... and on its stride-4 map
    # (grid, spacing in working pixels) of the grid x grid lattice centred on the point on which each map is read:
    # the stride-2 map after fine_convs (+-4 px = 2 um at 0.5 um/px), the stride-4 map after coarse_convs (+-8 px)
    # and the detector's point head's hidden map (stride 8, +-8 px; its receptive field covers the largest nuclei)
    lattices: tuple[tuple[int, float], ...] = ((5, 2.0), (5, 4.0), (3, 8.0))
    hidden: int = 256
    max_radius: float = 22.0  # the longest ray trained on (working pixels: 11 um at 0.5 um/px)
    mpp: float = 0.5  # working resolution (um/px): the detector's

    def __post_init__(self) -> None:
        self.lattices = tuple((int(grid), float(spacing)) for grid, spacing in self.lattices)
        if self.rays < 4 or self.rays % 4:
            raise ValueError(f"rays must be a multiple of 4, got {self.rays}")
        if len(self.lattices) != 3 or any(grid < 1 or grid % 2 == 0 for grid, _ in self.lattices):
            raise ValueError(f"lattices: one (odd grid, spacing) per map (stride 2, stride 4, head), "
                             f"got {self.lattices}")

    @property
    def reach(self) -> float:
        """How far from its point (working pixels) a nucleus's outline may reach."""
        return self.max_radius

    def at_mpp(self, mpp: float) -> "OutlineConfig":
        """This design at another working pixel size ``mpp``: the longest ray and the lattices keep their extent in
        um (so a head behind a finer detector reads the same tissue around each point, in more pixels)."""
        factor = self.mpp / mpp
        return replace(self, mpp=mpp, max_radius=self.max_radius * factor,
                       lattices=tuple((grid, spacing * factor) for grid, spacing in self.lattices))


@dataclass
class OutlineTrainConfig(_TrainConfig):
    """Training of an outline head on the instance outlines of datasets that have them (CoNSeP, MoNuSeg)."""

    _model = OutlineConfig

    datasets: list[DatasetSpec] = field(default_factory=list)
    model: OutlineConfig = field(default_factory=OutlineConfig)
    epochs: int = 20
    iters_per_epoch: int = 200
    batch_size: int = 256  # nuclei per step
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    detector: str = "default"  # whose feature maps the head reads (a shipped name or a file); kept frozen
    centre_jitter_um: float = 1.0  # the patch centre is moved by up to this much: detected points are not centroids
    color_jitter: float = 0.1  # per-channel gain and contrast perturbation strength
    ema_decay: float | None = None
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        _check_schedule(self)


@dataclass
class PretrainConfig(_TrainConfig):
    """Self-supervised pretraining of an encoder on unlabelled H&E (``denuc pretrain``; docs/pretraining.md).

    MUSE's nucleus-level self-distillation (NuLo): a student and its exponential moving average, the teacher,
    see two views of one tissue region at different pixel sizes; the student learns to give, for the region and
    for each nucleus found in it by ``detector``, what the teacher gives for the other view (DINO's centred and
    sharpened targets). The teacher's encoder is the result: a weights file of the whole ``encoder`` network.
    """

    images: list[str] = field(default_factory=list)  # slides and images (folders already expanded)
    images_mpp: float | None = None  # pixel size (um/px) of the images whose files state none
    datasets: list[DatasetSpec] = field(default_factory=list)  # their train splits' images; labels unused
    encoder: str = "timm:regnetx_002"
    encoder_weights: str | None = None  # start from these weights (None: random initialisation)
    encoder_layers: list[int] | list[str] | None = None  # the levels read at nuclei (None: the encoder's default)
    encoder_kwargs: dict = field(default_factory=lambda: {"num_classes": 0})
    detector: str = "default"  # finds the nuclei of each region (once: they are cached in the run folder)
    mpp: float = 0.5  # one view's pixel size: the classifier's working resolution
    other_mpp: tuple[float, float] = (0.25, 1.0)  # the other view's: log-uniform in this range
    crop_size: int = 224  # side of both views in pixels
    region_um: float = 512.0  # slides are cut into square regions of this side; each region's nuclei are cached
    min_tissue: float = 0.5  # a slide region is used when at least this fraction of it is tissue
    regions_per_source: int = 200  # at most this many regions of one slide or image (drawn at random)
    max_nuclei: int = 64  # nuclei per view pair in the nucleus-level loss (drawn at random among those matched)
    epochs: int = 100
    iters_per_epoch: int = 500
    batch_size: int = 32  # view pairs per step (per process under torchrun)
    lr: float = 6.25e-5  # DINO's 0.0005 x total batch / 256: scale it with batch_size x processes
    weight_decay: float = 0.04
    warmup_iters: int = 1000
    momentum_teacher: float = 0.996  # the teacher's EMA momentum, raised to 1 along a cosine over the run
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04  # the teacher's temperature rises linearly from this ...
    teacher_temp_warmup_epochs: int = 10  # ... to teacher_temp over these epochs (DINO: 30 of 100-300)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    prototypes: int = 4096  # outputs of each head (DINO: 65536)
    head_hidden: int = 1024
    head_bottleneck: int = 256
    image_loss_weight: float = 1.0
    nucleus_loss_weight: float = 1.0
    color_jitter: float = 0.2  # stain (HED), brightness and contrast jitter of each view
    stain_vector_jitter: float = 0.05  # noise on the H and E colour vectors of each view (0: off)
    seed: int = 0
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        _check_schedule(self)
        self.other_mpp = tuple(self.other_mpp)
        low, high = self.other_mpp
        if not (0 < low <= high and self.mpp > 0):
            raise ValueError(f"pixel sizes must be > 0 with other_mpp low <= high, got mpp {self.mpp}, "
                             f"other_mpp {self.other_mpp}")
        if self.images_mpp is not None and not self.images_mpp > 0:
            raise ValueError(f"images_mpp must be > 0, got {self.images_mpp}")
        for name in ("regions_per_source", "max_nuclei", "prototypes", "head_hidden", "head_bottleneck"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_tissue <= 1 or not self.region_um > 0:
            raise ValueError(f"min_tissue must be in [0, 1] and region_um > 0, got {self.min_tissue}, "
                             f"{self.region_um}")
        if not 0 < self.momentum_teacher <= 1 or not 0 <= self.center_momentum < 1:
            raise ValueError("momentum_teacher must be in (0, 1] and center_momentum in [0, 1)")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise ValueError("temperatures must be > 0")
        if not (isinstance(self.teacher_temp_warmup_epochs, int) and self.teacher_temp_warmup_epochs >= 0):
            raise ValueError(f"teacher_temp_warmup_epochs must be a whole number >= 0, got "
                             f"{self.teacher_temp_warmup_epochs}")
        if min(self.image_loss_weight, self.nucleus_loss_weight) < 0 or \
                self.image_loss_weight + self.nucleus_loss_weight == 0:
            raise ValueError("loss weights must be >= 0, not both 0")
        for name in ("color_jitter", "stain_vector_jitter"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
