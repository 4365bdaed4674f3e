"""Feature vectors of an encoder's maps at nucleus points, by bilinear interpolation.

Points are (x, y) in input-image pixels with denuc's pixel-centre convention (see denuc.nuclei): x is the
column and the centre of the top-left pixel is at (0, 0). A cell (i, j) of a stride-s map covers pixels
[j*s, (j+1)*s) (the encoder pads on the right and bottom only), so its centre is at x = j*s + (s-1)/2 - the
detector's anchors. ``grid_sample`` with ``align_corners=False`` puts cell j's centre at the normalised
coordinate (j + 0.5) / W_i * 2 - 1, hence gx = (x + 0.5) / (W_i * s) * 2 - 1, W_i * s being the padded
input width (and likewise for y). A point at a cell centre gets exactly that cell's vector; between centres
the four nearest cells are mixed bilinearly; beyond the outermost centres the border cells are extended.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def sample_features_padded(
    feature_maps: Sequence[torch.Tensor], strides: Sequence[int], points: torch.Tensor
) -> torch.Tensor:
    """(B, N, sum C_i) features at ``points`` (B, N, 2), the levels' vectors concatenated in order."""
    _check_levels(feature_maps, strides)
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] != feature_maps[0].shape[0]:
        raise ValueError(f"points must be (B, N, 2) with B = {feature_maps[0].shape[0]}, got {tuple(points.shape)}")
    samples = []
    for fmap, stride in zip(feature_maps, strides):
        # at least float32: a half-precision grid misplaces points by pixels on large maps
        dtype = torch.promote_types(fmap.dtype, torch.float32)
        height, width = fmap.shape[-2:]
        extent = torch.tensor([width * stride, height * stride], dtype=dtype, device=fmap.device)
        grid = (points.to(fmap.device, dtype) + 0.5) / extent * 2 - 1
        sampled = F.grid_sample(fmap.to(dtype), grid.unsqueeze(1), mode="bilinear", padding_mode="border",
                                align_corners=False)  # (B, C, 1, N)
        samples.append(sampled[:, :, 0].transpose(1, 2))
    return torch.cat(samples, dim=-1)


def sample_features(
    feature_maps: Sequence[torch.Tensor], strides: Sequence[int], points: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per image b, the (n_b, sum C_i) features at its ``points[b]`` (n_b, 2); one grid_sample per level."""
    _check_levels(feature_maps, strides)
    batch = feature_maps[0].shape[0]
    if len(points) != batch:
        raise ValueError(f"{len(points)} point sets for a batch of {batch}")
    for p in points:
        if p.ndim != 2 or p.shape[-1] != 2:
            raise ValueError(f"each point set must be (n, 2), got {tuple(p.shape)}")
    longest = max(len(p) for p in points)
    padded = torch.zeros(batch, longest, 2, dtype=torch.float64, device=feature_maps[0].device)
    for b, p in enumerate(points):
        padded[b, : len(p)] = p.to(padded)
    features = sample_features_padded(feature_maps, strides, padded)
    return [features[b, : len(p)] for b, p in enumerate(points)]


def _check_levels(feature_maps: Sequence[torch.Tensor], strides: Sequence[int]) -> None:
    if not feature_maps or len(feature_maps) != len(strides):
        raise ValueError(f"{len(feature_maps)} feature maps for {len(strides)} strides")
    if any(f.ndim != 4 or f.shape[0] != feature_maps[0].shape[0] for f in feature_maps):
        raise ValueError(f"feature maps must be (B, C, H, W) with one B, got {[tuple(f.shape) for f in feature_maps]}")
