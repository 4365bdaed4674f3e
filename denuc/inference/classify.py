"""The nucleus classifier: an image encoder's dense features, read at nucleus points, through a small head.

``Classifier`` holds one encoder and one head per taxonomy (e.g. BRCAM2C's and CRCHisto's classes), each head
with a last "not a nucleus" output that rejects false detections. One taxonomy is active at a time
(``use_taxonomy``); its classes are ``classifier.classes``. It is saved inside a model bundle (see
``denuc.inference.pipeline``): its tensors under ``classifier.``, its config and taxonomies in the metadata, and
the encoder either embedded (trained or small encoders) or referenced by the path of its weights file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from denuc.config import ClassifierConfig
from denuc.errors import InputError
from denuc.inference.tta import view_points, view_tiles
from denuc.models.encoders import Encoder, create_encoder
from denuc.models.feature_query import sample_features
from denuc.models.heads import create_head
from denuc.nuclei import NOT_A_NUCLEUS, NucleusClass

_ENCODER, _HEADS = "encoder.", "heads."


class Classifier(nn.Module):
    """Encoder + one head per taxonomy. Outputs per point: the taxonomy's classes, then "not a nucleus".

    Args:
        config: the architecture (encoder name, levels, head kind) and working resolution.
        encoder: the encoder ``config`` describes.
        taxonomies: class lists by taxonomy name (without "not a nucleus"), in head output order.
        embed_encoder: save the encoder's weights in the bundle (True: trained or randomly initialised
            encoders) or only the path of ``config.encoder_weights`` (False: a frozen published model).
    """

    def __init__(self, config: ClassifierConfig, encoder: Encoder, taxonomies: Mapping[str, Sequence[NucleusClass]],
                 embed_encoder: bool = True) -> None:
        super().__init__()
        if not taxonomies:
            raise ValueError("a classifier needs at least one taxonomy")
        for name, classes in taxonomies.items():
            names = [c.name for c in classes]
            if not names or NOT_A_NUCLEUS in names or len(set(names)) != len(names):
                raise ValueError(f"taxonomy {name!r}: classes must be distinct, non-empty and exclude "
                                 f"{NOT_A_NUCLEUS!r} (the head adds it), got {names}")
        if not embed_encoder and config.encoder_weights is None:
            raise ValueError("an encoder without a weights file must be embedded in the bundle")
        self.config = config
        self.encoder = encoder
        self.taxonomies = {name: list(classes) for name, classes in taxonomies.items()}
        self.heads = nn.ModuleDict({
            name: create_head(config.head_kind(name), self.feature_dim, len(classes) + 1, config.mlp_hidden)
            for name, classes in self.taxonomies.items()})
        self.taxonomy = next(iter(self.taxonomies))
        self.embed_encoder = embed_encoder
        # runs the encoder's forward pass instead of PyTorch when set (an OnnxEncoder); weights stay in encoder
        self.encoder_runtime: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
        # test-time augmentation: class probabilities averaged over this many views of each tile (1, 2, 4, 8;
        # see denuc.inference.tta.view_tiles); an inference setting, not saved in bundles
        self.test_time_views = 1

    @classmethod
    def create(cls, config: ClassifierConfig, taxonomies: Mapping[str, Sequence[NucleusClass]]) -> "Classifier":
        """A new classifier: the encoder from ``config`` (weights from its file, if any), fresh heads."""
        return cls(config, build_encoder(config), taxonomies, embed_encoder=config.encoder_weights is None)

    @property
    def feature_dim(self) -> int:
        return sum(self.encoder.channels)

    @property
    def classes(self) -> list[NucleusClass]:
        """The active taxonomy's classes (never "not a nucleus")."""
        return self.taxonomies[self.taxonomy]

    def use_taxonomy(self, name: str) -> "Classifier":
        """Make ``name`` the active taxonomy (the head ``classify_tiles`` uses)."""
        if name not in self.taxonomies:
            raise InputError(name, f"unknown taxonomy; this classifier has {sorted(self.taxonomies)}")
        self.taxonomy = name
        return self

    def point_features(self, images: torch.Tensor, points: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, the (n_b, feature_dim) encoder features at its points (x, y in image pixels), on the
        classifier's device (the images are moved there; ``sample_features`` moves the points).

        ``images``: (B, 3, H, W) float RGB in 0-255 at ``config.mpp``.
        """
        maps = (self.encoder_runtime or self.encoder)(images.to(next(self.parameters()).device))
        return sample_features(maps, self.encoder.strides, points)

    def forward(self, images: torch.Tensor, points: Sequence[torch.Tensor], taxonomy: str | None = None
                ) -> list[torch.Tensor]:
        """Per image, the (n_b, classes + 1) logits of its points under ``taxonomy`` (default: the active one)."""
        head = self.heads[taxonomy or self.taxonomy]
        return [head(f) for f in self.point_features(images, points)]

    @torch.inference_mode()
    def classify_tiles(self, tiles: np.ndarray, points: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For RGB uint8 tiles (B, H, W, 3) at ``config.mpp`` and per tile (n, 2) points in tile pixels:
        per tile the (n, classes + 1) probabilities (last column "not a nucleus") and (n, d) features."""
        device = next(self.parameters()).device
        images = torch.as_tensor(np.array(tiles), device=device)  # a writable copy
        height, width = images.shape[1:3]
        query = [torch.as_tensor(p, dtype=torch.float64, device=device).reshape(-1, 2) for p in points]
        head = self.heads[self.taxonomy]
        probs = [0.0] * len(query)
        for view in range(self.test_time_views):  # view 0 is the tile itself; its features are returned
            viewed = view_tiles(images, view).permute(0, 3, 1, 2).float().contiguous()
            features = self.point_features(viewed, [view_points(q, view, height, width) for q in query])
            probs = [p + head(f.float()).softmax(-1) for p, f in zip(probs, features)]
            if view == 0:
                identity = features
        return [((p / self.test_time_views).cpu().numpy().astype(np.float64), f.cpu().numpy())
                for p, f in zip(probs, identity)]

    # ------------------------------------------------------------------------------------------ bundle format

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a bundle stores: the heads, and the encoder when it is embedded."""
        parts = [(_HEADS, self.heads)] + ([(_ENCODER, self.encoder)] if self.embed_encoder else [])
        return {prefix + k: v for prefix, module in parts for k, v in module.state_dict().items()}

    def metadata(self) -> dict[str, str]:
        taxonomies = {name: [{"name": c.name, "color": list(c.color)} for c in classes]
                      for name, classes in self.taxonomies.items()}
        return {"denuc_classifier": self.config.to_json(), "taxonomies": json.dumps(taxonomies),
                "encoder_embedded": json.dumps(self.embed_encoder)}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   source: str | os.PathLike) -> "Classifier":
        """Rebuild a classifier from a bundle's tensors and metadata; InputError naming ``source`` if they do
        not fit each other (a head for another encoder or class list, missing or extra tensors)."""
        try:
            config = ClassifierConfig.from_json(metadata["denuc_classifier"])
            taxonomies = {name: [NucleusClass(c["name"], tuple(c["color"])) for c in classes]
                          for name, classes in json.loads(metadata["taxonomies"]).items()}
            embedded = json.loads(metadata["encoder_embedded"])
        except (KeyError, ValueError, TypeError) as error:
            raise InputError(source, f"bad classifier metadata: {error!r}") from None
        if not embedded and config.encoder_weights is None:
            raise InputError(source, "the bundle neither embeds its encoder nor names an encoder weights file")
        try:
            encoder = build_encoder(config, with_weights=not embedded)
        except InputError:  # a missing or unfitting weights file: already names the file
            raise
        except ValueError as error:  # an unknown encoder name or level
            raise InputError(source, f"cannot build encoder {config.encoder!r}: {error}") from None
        dim = sum(encoder.channels)
        for name, classes in taxonomies.items():
            prefix = f"{_HEADS}{name}."
            head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            # heads are LayerNorm (no tensors) then Linear layers: the first and last 2-D weights give the shape
            linears = sorted(((int(k.split(".")[0]), v) for k, v in head_state.items()
                              if k.endswith(".weight") and v.ndim == 2), key=lambda item: item[0])
            if not linears:
                raise InputError(source, f"no head for taxonomy {name!r}")
            first, last = linears[0][1], linears[-1][1]
            if first.shape[1] != dim:
                raise InputError(source, f"head {name!r} takes {first.shape[1]} features, but encoder "
                                         f"{config.encoder} (levels {encoder.channels}) gives {dim}")
            if last.shape[0] != len(classes) + 1:
                raise InputError(source, f"head {name!r} has {last.shape[0]} outputs for {len(classes)} classes "
                                         f"{[c.name for c in classes]} + {NOT_A_NUCLEUS!r}")
        classifier = cls(config, encoder, taxonomies, embed_encoder=embedded)
        own = classifier.state_tensors()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or extra or shapes:
            raise InputError(source, f"classifier tensors do not fit {config.encoder} with a {config.head} head: "
                                     f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {shapes[:5]}")
        classifier.heads.load_state_dict({k[len(_HEADS):]: v for k, v in state.items() if k.startswith(_HEADS)})
        if embedded:
            classifier.encoder.load_state_dict({k[len(_ENCODER):]: v for k, v in state.items()
                                                if k.startswith(_ENCODER)})
        return classifier.eval()


def build_encoder(config: ClassifierConfig, with_weights: bool = True) -> Encoder:
    """The encoder ``config`` names, with the weights of ``config.encoder_weights`` when ``with_weights``."""
    return create_encoder(config.encoder, weights=config.encoder_weights if with_weights else None,
                          layers=config.encoder_layers, **config.encoder_kwargs)

