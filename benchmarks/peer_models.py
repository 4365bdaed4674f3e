"""Minimal PyTorch re-implementations of the peer architectures timed by bench_peers.py (random weights).

The peers' own packages could not be used here: tiatoolbox pins torch < 2.13 (it would downgrade this
environment's 2.14), and cellseg-models-pytorch's HoVer-Net is a generic same-padded encoder-decoder, not the
published valid-padded 270 -> 80 / 256 -> 164 network. So each architecture is re-written from its reference
code, layer for layer, with the parameter counts checked against the published ones in bench_peers.py:

- HoVer-Net: vqdang/hover_net ``models/hovernet/net_desc.py`` (pre-activation ResNet-50 encoder, three
  dense-block decoder branches; "original" 270 -> 80 with 5x5 decoder convs, "fast" 256 -> 164 with 3x3).
- CellViT-256: TIO-IKIM/CellViT ``models/segmentation/cell_segmentation/cellvit.py`` (ViT-S/16 encoder,
  skips from blocks 3, 6, 9, 12, UNETR-style decoder, three branches).
- StarDist 2D_versatile_he: stardist ``StarDist2D`` with the model's config (U-Net of depth 3, 32 base
  filters, two 3x3 convs per level, grid (2, 2), 128-channel feature conv, 32 rays), written in PyTorch.

Only compute matters for timing, so weight layouts (key names) are not kept.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5)


class _TFSamePad(nn.Module):
    """TensorFlow's "same" padding for a stride: the extra pixel goes to the bottom / right."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        total = max(self.kernel - (self.stride if size % self.stride == 0 else size % self.stride), 0)
        return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))


class _ResidualBlock(nn.Module):
    """HoVer-Net's pre-activation bottleneck stage: ``count`` units of 1x1, 3x3 (strided first), 1x1."""

    def __init__(self, cin: int, widths: tuple[int, int, int], count: int, stride: int) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = cin
        for index in range(count):
            unit_stride = stride if index == 0 else 1
            layers = [] if index == 0 else [_bn(unit_in), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(unit_in, widths[0], 1, bias=False), _bn(widths[0]), nn.ReLU(inplace=True),
                       _TFSamePad(3, unit_stride), nn.Conv2d(widths[0], widths[1], 3, unit_stride, bias=False),
                       _bn(widths[1]), nn.ReLU(inplace=True), nn.Conv2d(widths[1], widths[2], 1, bias=False)]
            self.units.append(nn.Sequential(*layers))
            unit_in = widths[2]
        self.shortcut = nn.Conv2d(cin, widths[2], 1, stride, bias=False) if cin != widths[2] or stride != 1 else None
        self.out = nn.Sequential(_bn(widths[2]), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        for unit in self.units:
            x = unit(x) + shortcut
            shortcut = x
        return self.out(x)


class _DenseBlock(nn.Module):
    """HoVer-Net's decoder dense block: valid convs, each unit's output concatenated to its cropped input."""

    def __init__(self, cin: int, kernel: int, count: int) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        for _ in range(count):
            self.units.append(nn.Sequential(
                _bn(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 128, 1, bias=False), _bn(128), nn.ReLU(inplace=True),
                nn.Conv2d(128, 32, kernel, groups=4, bias=False)))
            cin += 32
        self.out = nn.Sequential(_bn(cin), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            new = unit(x)
            x = torch.cat([_crop_to(x, new.shape[-1]), new], 1)
        return self.out(x)


def _crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    start = (x.shape[-1] - size) // 2
    return x[..., start:start + size, start:start + size]


class HoVerNet(nn.Module):
    """HoVer-Net with type, nuclear-pixel and horizontal/vertical branches; ``mode`` "original" or "fast"."""

    INPUT = {"original": 270, "fast": 256}
    OUTPUT = {"original": 80, "fast": 164}

    def __init__(self, mode: str = "fast", types: int = 6) -> None:
        super().__init__()
        self.mode = mode
        kernel = 5 if mode == "original" else 3
        stem = [nn.Conv2d(3, 64, 7, bias=False), _bn(64), nn.ReLU(inplace=True)]
        self.conv0 = nn.Sequential(*([_TFSamePad(7, 1)] if mode == "fast" else []), *stem)
        self.d0 = _ResidualBlock(64, (64, 64, 256), 3, 1)
        self.d1 = _ResidualBlock(256, (128, 128, 512), 4, 2)
        self.d2 = _ResidualBlock(512, (256, 256, 1024), 6, 2)
        self.d3 = _ResidualBlock(1024, (512, 512, 2048), 3, 2)
        self.conv_bot = nn.Conv2d(2048, 1024, 1, bias=False)
        self.branches = nn.ModuleList([self._branch(kernel, out) for out in (types, 2, 2)])

    @staticmethod
    def _branch(kernel: int, out: int) -> nn.ModuleList:
        return nn.ModuleList([
            nn.Sequential(nn.Conv2d(1024, 256, kernel, bias=False), _DenseBlock(256, kernel, 8),
                          nn.Conv2d(512, 512, 1, bias=False)),
            nn.Sequential(nn.Conv2d(512, 128, kernel, bias=False), _DenseBlock(128, kernel, 4),
                          nn.Conv2d(256, 256, 1, bias=False)),
            nn.Sequential(_TFSamePad(kernel, 1), nn.Conv2d(256, 64, kernel, bias=False)),
            nn.Sequential(_bn(64), nn.ReLU(inplace=True), nn.Conv2d(64, out, 1)),
        ])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        d0 = self.d0(self.conv0(images / 255.0))
        d1 = self.d1(d0)
        d2 = self.d2(d1)
        d3 = self.conv_bot(self.d3(d2))
        crop = (184, 72) if self.mode == "original" else (92, 36)
        d0 = _crop_to(d0, d0.shape[-1] - crop[0])
        d1 = _crop_to(d1, d1.shape[-1] - crop[1])
        outputs = []
        for u3, u2, u1, u0 in self.branches:
            x = u3(_up2(d3) + d2)
            x = u2(_up2(x) + d1)
            outputs.append(u0(u1(_up2(x) + d0)))
        return outputs


def _up2(x: torch.Tensor) -> torch.Tensor:
    # HoVer-Net's UpSample2x repeats each pixel 2 x 2: nearest-neighbour upsampling
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _bn(cout), nn.ReLU(inplace=True))


def _deconv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2), nn.Conv2d(cout, cout, 3, padding=1), _bn(cout),
                         nn.ReLU(inplace=True))


class CellViT256(nn.Module):
    """CellViT with a ViT-S/16 encoder (CellViT-256) and its three decoder branches (binary, HV, types)."""

    def __init__(self, types: int = 6) -> None:
        super().__init__()
        self.encoder = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                         dynamic_img_size=True)
        dim, skip11, skip12, bottleneck = 384, 256, 128, 312  # CellViT's widths for embed_dim < 512
        self.decoder0 = nn.Sequential(_conv_block(3, 32), _conv_block(32, 64))
        self.decoder1 = nn.Sequential(_deconv_block(dim, skip11), _deconv_block(skip11, skip12),
                                      _deconv_block(skip12, 128))
        self.decoder2 = nn.Sequential(_deconv_block(dim, skip11), _deconv_block(skip11, 256))
        self.decoder3 = _deconv_block(dim, bottleneck)
        self.branches = nn.ModuleList([self._branch(dim, bottleneck, out) for out in (2, 2, types)])

    @staticmethod
    def _branch(dim: int, bottleneck: int, out: int) -> nn.ModuleList:
        return nn.ModuleList([
            nn.ConvTranspose2d(dim, bottleneck, 2, 2),
            nn.Sequential(_conv_block(2 * bottleneck, bottleneck), _conv_block(bottleneck, bottleneck),
                          _conv_block(bottleneck, bottleneck), nn.ConvTranspose2d(bottleneck, 256, 2, 2)),
            nn.Sequential(_conv_block(512, 256), _conv_block(256, 256), nn.ConvTranspose2d(256, 128, 2, 2)),
            nn.Sequential(_conv_block(256, 128), _conv_block(128, 128), nn.ConvTranspose2d(128, 64, 2, 2)),
            nn.Sequential(_conv_block(128, 64), _conv_block(64, 64), nn.Conv2d(64, out, 1)),
        ])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images / 255.0 - 0.5) / 0.5
        z1, z2, z3, z4 = self.encoder.forward_intermediates(x, indices=[2, 5, 8, 11], intermediates_only=True)
        b0, b1, b2, b3 = self.decoder0(x), self.decoder1(z1), self.decoder2(z2), self.decoder3(z3)
        outputs = []
        for up4, up3, up2, up1, head in self.branches:
            y = up3(torch.cat([b3, up4(z4)], 1))
            y = up2(torch.cat([b2, y], 1))
            y = up1(torch.cat([b1, y], 1))
            outputs.append(head(torch.cat([b0, y], 1)))
        return outputs


def _relu_conv(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(inplace=True))


class StarDistUNet(nn.Module):
    """StarDist 2D_versatile_he: 2x2 grid stem, csbdeep U-Net (depth 3, 32 filters), 128-ch features, 32 rays."""

    def __init__(self, depth: int = 3, base: int = 32, rays: int = 32) -> None:
        super().__init__()
        # grid (2, 2): two convs at full resolution, then one 2x2 pooling before the U-Net
        self.stem = nn.Sequential(_relu_conv(3, base), _relu_conv(base, base), nn.MaxPool2d(2))
        self.down = nn.ModuleList()
        cin = base
        for level in range(depth):
            self.down.append(nn.Sequential(_relu_conv(cin, base * 2 ** level), _relu_conv(base * 2 ** level,
                                                                                      base * 2 ** level)))
            cin = base * 2 ** level
        self.middle = nn.Sequential(_relu_conv(cin, base * 2 ** depth),
                                    _relu_conv(base * 2 ** depth, base * 2 ** max(0, depth - 1)))
        self.up = nn.ModuleList()
        cin = base * 2 ** max(0, depth - 1)
        for level in reversed(range(depth)):
            self.up.append(nn.Sequential(_relu_conv(cin + base * 2 ** level, base * 2 ** level),
                                         _relu_conv(base * 2 ** level, base * 2 ** max(0, level - 1))))
            cin = base * 2 ** max(0, level - 1)
        self.features = _relu_conv(cin, 128)
        self.prob = nn.Conv2d(128, 1, 1)
        self.dist = nn.Conv2d(128, rays, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(images / 255.0)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], 1))
        x = self.features(x)
        return torch.sigmoid(self.prob(x)), self.dist(x)
