"""Image encoders for the classifier: an image batch in, dense feature maps with known strides out.

``create_encoder(name, weights=PATH)`` builds the published architecture of a pathology foundation model (or
any timm / torchvision network), loads its weights from a local file with a strict key check, and wraps it so
that ``encoder(images)`` takes (B, 3, H, W) float RGB in 0-255 and returns a list of (B, C_i, H_i, W_i) maps.
The encoder normalises with the model's own constants and pads the image on the right and bottom (reflect)
to a multiple of ``encoder.multiple``, so the cell (i, j) of a stride-s map covers pixels [j*s, (j+1)*s) of
the input; ``denuc.models.feature_query`` samples these maps at nucleus points. Nothing is ever downloaded.

The configurations of the built-in models and where they come from are in docs/encoders.md.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import SwiGLUPacked
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from denuc.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """A published model: the timm architecture and keyword arguments its released weights were saved from."""

    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


ENCODERS: dict[str, EncoderSpec] = {
    # Every spec sets dynamic_img_size=True: it changes no weight, and lets any multiple of the patch size in
    # by interpolating the position embeddings (H-optimus-0's card uses False, at 224 x 224 only).
    "uni2-h": EncoderSpec("vit_giant_patch14_224", dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
        reg_tokens=8, dynamic_img_size=True)),
    "uni": EncoderSpec("vit_large_patch16_224", dict(
        img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
    "virchow2": EncoderSpec("vit_huge_patch14_224", dict(
        img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
        mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, dynamic_img_size=True)),
    "h-optimus-0": EncoderSpec("vit_giant_patch14_reg4_dinov2", dict(
        img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334,
        mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=4, no_embed_class=True, num_classes=0,
        dynamic_img_size=True),
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
}
"""Built-in encoders by name; ``create_encoder`` also takes ``timm:<model>`` and ``torchvision:<model>``."""

# timm modules whose transformers accept dynamic_img_size (the others either need no such switch or reject it)
_DYNAMIC_SIZE_MODULES = ("vision_transformer", "deit", "eva")
# square probe input used to measure the strides of torchvision feature nodes; a multiple of every usual stride
_PROBE_SIZE = 256
_LISTED_KEYS = 5


def create_network(name: str, **kwargs: Any) -> nn.Module:
    """The bare architecture behind ``name``, randomly initialised: the module a published checkpoint fits.

    ``kwargs`` override the architecture's arguments, e.g. ``depth=2`` for a fast test variant with the same
    key layout apart from the number of blocks.
    """
    if "pretrained" in kwargs:
        raise ValueError("encoder weights come only from a local file: pass weights=PATH to create_encoder")
    if name.startswith("timm:"):
        architecture = name[len("timm:"):]
        if not timm.is_model(architecture):
            raise ValueError(f"unknown timm model {architecture!r}")
        if timm.models.is_model_in_modules(timm.models.get_arch_name(architecture), _DYNAMIC_SIZE_MODULES):
            kwargs.setdefault("dynamic_img_size", True)
        return timm.create_model(architecture, pretrained=False, **kwargs)
    if name.startswith("torchvision:"):
        architecture = name[len("torchvision:"):]
        if architecture not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model {architecture!r}")
        return torchvision.models.get_model(architecture, weights=None, **kwargs)
    spec = _spec(name)
    return timm.create_model(spec.architecture, pretrained=False, **{**spec.kwargs, **kwargs})


def create_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    layers: Sequence[int] | Sequence[str] | None = None,
    **kwargs: Any,
) -> Encoder:
    """An encoder by name: a key of ``ENCODERS``, ``timm:<model>`` or ``torchvision:<model>``.

    Args:
        weights: a local .safetensors, .bin, .pth or .pt file of the network's state dict (possibly wrapped in
            ``{'state_dict': ...}`` or ``{'model': ...}``), loaded strictly; None keeps the random init.
        layers: which outputs to return. timm models: indices into the model's feature levels (transformer
            blocks for a ViT; negative counts from the end), default the last block for a ViT and the last four
            levels for a CNN. torchvision models: feature-extraction node names, default layer1-layer4 for
            the ResNet family.
        kwargs: architecture overrides passed to ``create_network``.
    """
    if weights is None:
        network = create_network(name, **kwargs)
    else:
        network = _network_with_weights(name, weights, kwargs)
    if name.startswith("torchvision:"):
        return TorchvisionEncoder(name, network, layers)
    if name.startswith("timm:"):
        config = network.pretrained_cfg
        mean, std = config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)
    else:
        mean, std = _spec(name).mean, _spec(name).std
    return TimmEncoder(name, network, layers, mean, std)


def _network_with_weights(name: str, weights: str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
    """The network built on the meta device, its tensors then taken from the file.

    Skipping the random init saves a copy of the model in memory and, for UNI2-h on CPU, 35 s.
    """
    try:
        with torch.device("meta"):
            network = create_network(name, **kwargs)
    except (RuntimeError, NotImplementedError):  # an init that reads tensor values cannot run on meta
        network = create_network(name, **kwargs)
    persistent = network.state_dict().keys()
    if any(buffer not in persistent for buffer, _ in network.named_buffers()):
        # a non-persistent buffer (a position index, an attention mask) is computed at init, not stored
        network = create_network(name, **kwargs)
    described = name + (f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else "")
    load_weights(network, weights, f"{described} ({type(network).__name__})")
    return network


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file, unwrapped from ``{'state_dict': ...}`` or ``{'model': ...}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such weights file")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".bin", ".pth", ".pt"):
        raise InputError(path, f"unknown weights format {suffix!r}: expected .safetensors, .bin, .pth or .pt")
    try:
        if suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            # weights_only: a checkpoint is data, it must not be able to run code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (safetensors.SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise InputError(path, f"cannot read weights: {error}") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "not a state dict of tensors (nor one wrapped in 'state_dict' or 'model')")
    return dict(state)


def load_weights(network: nn.Module, path: str | os.PathLike, architecture: str) -> None:
    """Load a weights file into ``network``, every key and shape matching, else an InputError that lists them.

    A network built on the meta device takes the file's tensors (cast to its dtypes) instead of copies.
    """
    state = read_weights(path)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = [_listing(label, keys) for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise InputError(path, f"the weights do not fit the expected architecture {architecture}: "
                               + "; ".join(problems))
    on_meta = any(v.is_meta for v in own.values())
    if on_meta:
        state = {k: v.to(own[k].dtype) for k, v in state.items()}
    network.load_state_dict(state, strict=True, assign=on_meta)


class Encoder(nn.Module):
    """Normalises, pads and runs a network; subclasses say which feature maps come out.

    Attributes:
        name: the name it was created by.
        strides: input pixels per feature cell of each returned map.
        channels: channels of each returned map.
        mean, std: the per-channel normalisation constants, on the 0-1 scale the model cards use.
        multiple: the input is padded (reflect, right and bottom) to a multiple of this.
        patch_size: the patch size of a transformer, None for a CNN.
    """

    def __init__(
        self,
        name: str,
        strides: Sequence[int],
        channels: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        patch_size: int | None,
    ) -> None:
        super().__init__()
        self.name = name
        self.strides = list(strides)
        self.channels = list(channels)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.multiple = max(self.strides)
        self.patch_size = patch_size
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images``: (B, 3, H, W) float RGB in 0-255. Returns one (B, C_i, ceil(H/m)*m/s_i, ...) map per level."""
        return self.features(pad_to_multiple((images - self.pixel_mean) / self.pixel_std, self.multiple))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) padded right and bottom to multiples of ``multiple``: reflected, which keeps tissue
    statistics at the border (replicated where the pad is not smaller than the image, as reflect needs)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class TimmEncoder(Encoder):
    """A timm model's intermediate outputs (``forward_intermediates``), prefix tokens dropped for ViTs.

    A ViT's class and register tokens (``num_prefix_tokens``) are removed and its patch tokens reshaped to a
    (B, C, H/p, W/p) grid, each block's output passed through the final norm as the published forward does
    for the last one. Strides and channels come from the model's ``feature_info``.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        layers: Sequence[int] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        info = model.feature_info
        count = len(info)
        isotropic = len({level["reduction"] for level in info}) == 1
        if layers is None:
            layers = [-1] if isotropic else range(max(0, count - 4), count)
        if any(not isinstance(i, int) or not -count <= i < count for i in layers):
            raise ValueError(f"{name}: layers must be integers in [{-count}, {count}), got {list(layers)}")
        # forward_intermediates returns levels in network order, so keep them sorted
        resolved = sorted({i % count for i in layers})
        super().__init__(
            name,
            strides=[info[i]["reduction"] for i in resolved],
            channels=[info[i]["num_chs"] for i in resolved],
            mean=mean,
            std=std,
            patch_size=info[0]["reduction"] if isotropic else None,
        )
        self.model = model
        self.layers = resolved
        self.norm = isotropic

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.layers, norm=self.norm, stop_early=True, intermediates_only=True
        )


class TorchvisionEncoder(Encoder):
    """Named nodes of a torchvision network (``create_feature_extractor``); strides measured on a probe image."""

    def __init__(self, name: str, model: nn.Module, layers: Sequence[str] | None) -> None:
        if layers is None:
            if not all(hasattr(model, f"layer{i}") for i in range(1, 5)):
                raise ValueError(f"{name}: pass layers= (node names, see "
                                 "torchvision.models.feature_extraction.get_graph_node_names)")
            layers = [f"layer{i}" for i in range(1, 5)]
        nodes = list(layers)
        extractor = create_feature_extractor(model, return_nodes={node: node for node in nodes})
        strides, channels = _probe(name, extractor, nodes)
        super().__init__(name, strides, channels, IMAGENET_MEAN, IMAGENET_STD, patch_size=None)
        self.extractor = extractor
        self.nodes = nodes

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.extractor(x)
        return [outputs[node] for node in self.nodes]


def _spec(name: str) -> EncoderSpec:
    if name.lower() not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}, timm:<model> or "
                         "torchvision:<model>")
    return ENCODERS[name.lower()]


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS]) + (", ..." if len(keys) > _LISTED_KEYS else "")
    return f"{len(keys)} {label} ({shown})"


def _probe(name: str, extractor: nn.Module, nodes: list[str]) -> tuple[list[int], list[int]]:
    """Strides and channels of the extractor's nodes, from one pass in eval mode (batch norm stats untouched)."""
    was_training = extractor.training
    extractor.eval()
    with torch.no_grad():
        outputs = extractor(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    extractor.train(was_training)
    strides, channels = [], []
    for node in nodes:
        out = outputs[node]
        if out.ndim != 4 or _PROBE_SIZE % out.shape[-1] or out.shape[-1] != out.shape[-2]:
            raise ValueError(f"{name}: node {node!r} gives {tuple(out.shape)} for a {_PROBE_SIZE}-pixel square, "
                             "not a feature map with a whole stride")
        strides.append(_PROBE_SIZE // out.shape[-1])
        channels.append(out.shape[1])
    return strides, channels
