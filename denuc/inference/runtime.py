"""Networks through ONNX Runtime: the same contracts, a faster CPU forward pass.

``Detector.from_pretrained(name, runtime="onnx")`` returns a ``Detector`` whose backend is an ``OnnxBackend``:
the PyTorch model is exported once to an in-memory ONNX graph (dynamic batch, height and width) and run by an
ONNX Runtime CPU session. Tiling, score threshold and point NMS are the ``Detector``'s own, so only the
network's forward pass differs. ``Pipeline.from_pretrained(..., runtime="onnx")`` also runs a convolutional classifier
encoder this way (``OnnxEncoder``; a transformer encoder stays in PyTorch); the feature query and the head
stay in PyTorch. Outputs match PyTorch's within float32 rounding (tests/test_onnx.py states the tolerances).
ONNX Runtime folds batch norms into the convolutions and fuses activations: fewer, larger operators, which on
CPU measured 2-20x faster than eager PyTorch (docs/benchmarks.md).

Exporting takes seconds, so exported graphs are kept in a cache folder (``$DENUC_CACHE/onnx``, default
``~/.cache/denuc/onnx``) under a digest of the weights, the architecture and the software versions; a later
run with the same model loads its graph from there. A cache that cannot be written or read is skipped.

The default runtime of the ``denuc`` commands on a CPU (``--runtime auto``).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from denuc import __version__
from denuc.io.atomic import atomic_path
from denuc.models.detector import PointDetector
from denuc.models.encoders import Encoder, pad_to_multiple
from denuc.models.outline import MAPS

OPSET = 18


def export_onnx(model: PointDetector, target: str | os.PathLike | io.BytesIO) -> None:
    """Write ``model`` as an ONNX graph: input ``images`` (B, 3, H, W) float32 0-255, outputs ``scores`` (B, A)
    (nucleus probability) and ``points`` (B, A, 2); batch, height and width are dynamic."""
    model = model.eval()
    example = torch.zeros(1, 3, 64, 64)
    # the legacy (TorchScript) exporter: it needs no onnxscript and gives one plain graph for this small model.
    # Its warnings are silenced: the deprecation notice, and a tracer note on the neck's "resize unless already
    # at stride 8" test, which takes the same branch for every input whose sides are multiples of 32 (ALIGN)
    # (tests/test_onnx.py checks other sizes against PyTorch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        _export(model, example, target)


def _export(model: PointDetector, example: torch.Tensor, target: str | os.PathLike | io.BytesIO) -> None:
    torch.onnx.export(
        _ScoresAndPoints(model), (example,), target, dynamo=False, opset_version=OPSET,
        input_names=["images"], output_names=["scores", "points"],
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                      "scores": {0: "batch", 1: "anchors"}, "points": {0: "batch", 1: "anchors"}},
    )


class _ScoresAndPoints(torch.nn.Module):
    """The detector with the softmax inside the graph, so the session hands back probabilities directly."""

    def __init__(self, model: PointDetector) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, points = self.model(images)
        return logits.softmax(-1)[..., 1], points


class OnnxBackend:
    """A detector network's forward pass in ONNX Runtime (CPU), the backend of a ``Detector``
    (``denuc.inference.detect.Backend``). ``threads``: intra-op threads, default torch's. ``graph``: an ONNX
    graph of ``model`` to run instead of its own export (e.g. a quantised one)."""

    runtime = "onnx"

    def __init__(self, model: PointDetector, threads: int | None = None, graph: bytes | None = None) -> None:
        if graph is None:
            self.session = _cached_session(model, model.config.to_json(), lambda buffer: export_onnx(model, buffer),
                                           threads)
        else:
            self.session = _session(graph, threads)

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.ascontiguousarray(np.asarray(tiles).transpose(0, 3, 1, 2), dtype=np.float32)
        scores, points = self.session.run(None, {"images": images})
        return torch.from_numpy(scores), torch.from_numpy(points)


class OnnxEncoder:
    """A convolutional ``Encoder``'s forward pass (normalisation and feature maps) in ONNX Runtime (CPU): called
    like the encoder, on (B, 3, H, W) float RGB 0-255, it returns the same maps. The graph is exported at a
    size that needs no padding; inputs that do are padded first, exactly as the encoder pads them (padding
    and the per-channel normalisation commute)."""

    def __init__(self, encoder: Encoder, threads: int | None = None) -> None:
        if encoder.patch_size is not None:
            raise ValueError(f"{encoder.name}: transformer encoders run in PyTorch (their position embeddings "
                             "are resized by input size, which the exported graph would fix)")
        self.strides, self.channels, self.multiple = encoder.strides, encoder.channels, encoder.multiple
        names = [f"level{i}" for i in range(len(encoder.strides))]
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        axes |= {name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in names}

        def export(buffer: io.BytesIO) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                example = torch.zeros(1, 3, 2 * encoder.multiple, 2 * encoder.multiple)
                torch.onnx.export(encoder.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                                  input_names=["images"], output_names=names, dynamic_axes=axes)

        architecture = f"{encoder.name} {encoder.strides} {encoder.channels} {encoder.mean} {encoder.std}"
        self.session = _cached_session(encoder, architecture, export, threads)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = pad_to_multiple(images.float().cpu(), self.multiple)
        return [torch.from_numpy(m) for m in self.session.run(None, {"images": images.contiguous().numpy()})]


class OnnxOutlineFeatures:
    """An outline head's detector and the maps the head reads, in one ONNX Runtime (CPU) graph: (B, 3, H, W) float
    RGB 0-255, H and W multiples of 32, -> the detector's nucleus probability (B, A) and points (B, A, 2) (as
    ``OnnxBackend`` gives them) and the detector's maps the head reads (``OutlineHead.features``, names ``MAPS``)."""

    def __init__(self, head: torch.nn.Module, threads: int | None = None) -> None:
        module = DetectorWithOutlineMaps(head).eval()
        names = ["scores", "points", *MAPS]

        def export(buffer: io.BytesIO) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=DeprecationWarning)
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                axes = {"images": {0: "batch", 2: "height", 3: "width"},
                        "scores": {0: "batch", 1: "anchors"}, "points": {0: "batch", 1: "anchors"}}
                axes |= {name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in MAPS}
                torch.onnx.export(module, (torch.zeros(1, 3, 64, 64),), buffer, dynamo=False, opset_version=OPSET,
                                  input_names=["images"], output_names=names, dynamic_axes=axes)

        # "trunk maps": since 0.11 the graph returns the detector's maps, not the head's convs of them (a new cache key)
        self.session = _cached_session(module, f"outline trunk maps {head.config.to_json()}", export, threads)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        scores, points, *maps = self.session.run(None, {"images": images.float().cpu().contiguous().numpy()})
        return torch.from_numpy(scores), torch.from_numpy(points), dict(zip(MAPS, map(torch.from_numpy, maps)))


class DetectorWithOutlineMaps(torch.nn.Module):
    """The detector's probabilities and points and the maps the outline head reads from one pass of the detector's
    trunk, as a module ONNX export can trace (and PyTorch runs as it is)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trunk = self.head.detector.trunk(images)
        logits, points = self.head.detector.points(trunk["head"])
        return (logits.softmax(-1)[..., 1], points, *(trunk[name] for name in MAPS))


def cache_folder() -> Path:
    """Where exported graphs are kept: ``$DENUC_CACHE/onnx``, else ``$XDG_CACHE_HOME/denuc/onnx``, else
    ``~/.cache/denuc/onnx``."""
    if os.environ.get("DENUC_CACHE"):
        return Path(os.environ["DENUC_CACHE"]) / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "denuc" / "onnx"


def _cached_session(module: torch.nn.Module, architecture: str, export: Callable[[io.BytesIO], None],
                    threads: int | None):
    """A session of ``module``'s graph, from the cache when the same module was exported before, else exported
    now (and cached). The key digests ``architecture``, every tensor of the module's state and the versions of
    denuc, torch and the opset: any change gives a new export."""
    digest = hashlib.sha256(f"{architecture}|{repr(module)}|{OPSET}|{torch.__version__}|{__version__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    path = cache_folder() / f"{digest.hexdigest()[:32]}.onnx"
    try:
        return _session(path.read_bytes(), threads)
    except ImportError:
        raise
    except Exception:  # not cached, unreadable, or damaged (ONNX Runtime raises its own types): export again
        pass
    buffer = io.BytesIO()
    export(buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError:  # a read-only or full cache location only costs the next run an export
        pass
    return _session(buffer.getvalue(), threads)


def _session(graph: bytes, threads: int | None):
    """An ONNX Runtime CPU session of ``graph`` with all graph optimisations; ``threads`` default torch's."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError('runtime="onnx" needs onnxruntime (a dependency of denuc): pip install onnxruntime; '
                          'or use runtime="torch"') from None

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would busy-wait for the next batch, taking cores from the tile-reading threads
    # and the other session's or PyTorch's threads; on a 2-core CPU they have none to spare.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
