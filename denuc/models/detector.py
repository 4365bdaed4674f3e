"""The DeNuC point detector: ShuffleNetV2 (or ResNet-50) backbone, PAN neck, and a point head.

The head predicts, at every point of a regular grid (the "anchors"), a 2-way logit (background / nucleus)
and a 2-D offset; a prediction is anchor + offset. Coordinates follow denuc's pixel-centre convention
(see denuc.nuclei): the anchor of grid cell (i, j) at stride s sits at the centre of that cell,
x = j * s + (s - 1) / 2.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from denuc.config import DetectorConfig
from denuc.errors import InputError

BACKBONES = {
    # name: (torchvision constructor, output channels at strides 4, 8, 16, 32)
    "shufflenet_v2_x0_5": (torchvision.models.shufflenet_v2_x0_5, (24, 48, 96, 192)),
    "shufflenet_v2_x1_0": (torchvision.models.shufflenet_v2_x1_0, (24, 116, 232, 464)),
    "shufflenet_v2_x1_5": (torchvision.models.shufflenet_v2_x1_5, (24, 176, 352, 704)),
    "shufflenet_v2_x2_0": (torchvision.models.shufflenet_v2_x2_0, (24, 244, 488, 976)),
    "resnet50": (torchvision.models.resnet50, (256, 512, 1024, 2048)),
}


def _conv_bn_relu(cin: int, cout: int | None = None, kernel: int = 3) -> nn.Sequential:
    cout = cin if cout is None else cout
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _separable_conv_bn_relu(channels: int) -> nn.Sequential:
    """A 3x3 depthwise conv then a 1x1 pointwise conv, each with BN + ReLU: about an eighth of a full 3x3
    conv's arithmetic at 64 channels."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True), _conv_bn_relu(channels, channels, 1),
    )


class Backbone(nn.Module):
    """A torchvision classification network cut into its stride-4, 8, 16 and 32 stages."""

    def __init__(self, name: str, imagenet_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
        constructor, self.channels = BACKBONES[name]
        net = constructor(weights=None)
        if imagenet_weights is not None:
            # strict: a checkpoint of another architecture must fail loudly, not half-load
            try:
                net.load_state_dict(torch.load(imagenet_weights, map_location="cpu", weights_only=True), strict=True)
            except (OSError, RuntimeError, pickle.UnpicklingError) as error:
                raise InputError(imagenet_weights, f"not an ImageNet checkpoint of torchvision's {name}: "
                                                   f"{' '.join(str(error).split())[:300]}") from None
        self.name = name
        stem, stages = self._parts()
        self.stem = nn.Sequential(*(getattr(net, part) for part in stem))
        self.stages = nn.ModuleList(getattr(net, part) for part in stages)

    def _parts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The torchvision network's top-level modules that make the stem (to stride 4) and the three stages."""
        if self.name.startswith("shufflenet"):
            return ("conv1", "maxpool"), ("stage2", "stage3", "stage4")
        return ("conv1", "bn1", "relu", "maxpool", "layer1"), ("layer2", "layer3", "layer4")

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under the names of the torchvision network it was cut from, for that network
        (e.g. as the encoder of a classifier: ``torchvision:<name>``). Complete, so it loads strictly: the
        modules the detector does not have (ShuffleNetV2's conv5, the ImageNet fc) keep torchvision's
        initialisation under seed 0; cut at the stages, an encoder never runs them."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            state = BACKBONES[self.name][0](weights=None).state_dict()
        stem, stages = self._parts()
        prefixes = {f"stem.{i}.": f"{part}." for i, part in enumerate(stem)}
        prefixes.update({f"stages.{i}.": f"{part}." for i, part in enumerate(stages)})
        for key, value in self.state_dict().items():
            prefix = next(p for p in prefixes if key.startswith(p))
            state[prefixes[prefix] + key[len(prefix):]] = value.detach().clone()
        return state

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 2 (the stem's first part: its last map before pooling), 4, 8, 16 and 32."""
        pool = next(i for i, module in enumerate(self.stem) if isinstance(module, nn.MaxPool2d))
        features = [self.stem[:pool](x)]
        features.append(self.stem[pool:](features[0]))
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class PAN(nn.Module):
    """Path aggregation over three levels (strides 8, 16, 32): 1x1 laterals, top-down then bottom-up sums.

    Resizing is by interpolation, as in NanoDet's lightweight PAN, so the neck adds few parameters.
    """

    def __init__(self, in_channels: tuple[int, int, int], channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList([_conv_bn_relu(c, channels, 1) for c in in_channels])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [lateral(f) for lateral, f in zip(self.laterals, features)]
        for i in (1, 0):  # top-down
            levels[i] = levels[i] + F.interpolate(levels[i + 1], size=levels[i].shape[-2:], mode="bilinear")
        for i in (1, 2):  # bottom-up
            levels[i] = levels[i] + F.interpolate(levels[i - 1], size=levels[i].shape[-2:], mode="bilinear")
        return levels


class PointHead(nn.Module):
    """Levels resized to stride 8 and averaged, a few 3x3 convs, then 1x1 convs for logits and offsets.

    With ``stride=4`` the stride-8 map is then upsampled, the backbone's stride-4 features are added through a
    1x1 lateral, and one more 3x3 conv mixes them: anchors twice as dense for about 1.5x the compute
    (running all convs at stride 4 measured 1.8x slower in training).
    """

    def __init__(self, channels: int, num_convs: int, stride: int, stem_channels: int,
                 separable: bool = False) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"head stride must be 4 or 8, got {stride}")
        self.stride = stride
        conv = _separable_conv_bn_relu if separable else _conv_bn_relu
        self.convs = nn.Sequential(*[conv(channels) for _ in range(num_convs)])
        if stride == 4:
            self.fine_lateral = _conv_bn_relu(stem_channels, channels, 1)
            self.fine_conv = conv(channels)
        self.logits = nn.Conv2d(channels, 2, 1)
        self.offsets = nn.Conv2d(channels, 2, 1)
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)

    def forward(self, levels: list[torch.Tensor], fine: torch.Tensor) -> torch.Tensor:
        """The hidden map (at the head's stride) that ``logits_and_offsets`` reads, and other heads may read."""
        size = levels[0].shape[-2:]
        x = sum(F.interpolate(level, size=size, mode="bilinear") if level.shape[-2:] != size else level
                for level in levels) / len(levels)
        x = self.convs(x)
        if self.stride == 4:
            x = F.interpolate(x, size=fine.shape[-2:], mode="bilinear") + self.fine_lateral(fine)
            x = self.fine_conv(x)
        return x

    def logits_and_offsets(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(hidden), self.offsets(hidden)


class PointDetector(nn.Module):
    """Backbone + PAN + point head. ``forward`` returns per-anchor logits (B, A, 2) and points (B, A, 2).

    Anchors are ordered row-major over the grid. Points are in input-image pixels.
    """

    # ImageNet statistics: the usual normalisation for torchvision backbones, also when trained from scratch
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, config: DetectorConfig, imagenet_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, imagenet_weights)
        self.neck = PAN(self.backbone.channels[1:], config.neck_channels)
        self.head = PointHead(config.neck_channels, config.head_convs, config.head_stride, self.backbone.channels[0],
                              config.head_separable)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def stride(self) -> int:
        return self.config.head_stride

    def anchors(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """(A, 2) anchor coordinates (x, y) of an output grid of ``height`` x ``width`` cells."""
        s = self.stride
        ys, xs = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        return torch.stack([xs, ys], dim=-1).reshape(-1, 2) * s + (s - 1) / 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``: (B, 3, H, W) float RGB in 0-255, H and W multiples of 32."""
        return self.points(self.trunk(images)["head"])

    def trunk(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps other heads may read (the outline head does): "stride2" and "stride4", the backbone's first
        maps, and "head", the point head's last hidden map (at the head's stride). ``images`` as ``forward``'s."""
        features = self.backbone((images - self.mean) / self.std)
        return {"stride2": features[0], "stride4": features[1],
                "head": self.head(self.neck(features[2:]), features[1])}

    def points(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor logits (B, A, 2) and points (B, A, 2) from the point head's hidden map."""
        logits, offsets = self.head.logits_and_offsets(hidden)
        b, _, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(b, h * w, 2)
        offsets = offsets.permute(0, 2, 3, 1).reshape(b, h * w, 2)
        points = self.anchors(h, w, hidden.device).unsqueeze(0) + offsets * self.stride
        return logits, points


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
