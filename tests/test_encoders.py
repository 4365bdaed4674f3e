"""Encoders (architectures, weight loading, padding, feature levels) and the point feature query."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from denuc.errors import InputError
from denuc.models.encoders import ENCODERS, create_encoder, create_network, read_weights
from denuc.models.feature_query import sample_features, sample_features_padded

# Published sizes (docs/encoders.md): UNI2-h 681M, UNI 304M, Virchow2 632M (arXiv 2408.00738), H-optimus-0 1.13B
PUBLISHED_PARAMETERS = {"uni2-h": 681e6, "uni": 304e6, "virchow2": 632e6, "h-optimus-0": 1.13e9}
PATCH = {"uni2-h": 14, "uni": 16, "virchow2": 14, "h-optimus-0": 14}
PREFIX_TOKENS = {"uni2-h": 9, "uni": 1, "virchow2": 5, "h-optimus-0": 5}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def _images(height: int, width: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_builtin_spec_loads_from_file_and_drops_prefix_tokens(name: str, tmp_path: Path) -> None:
    net = create_network(name, depth=1)
    assert net.num_prefix_tokens == PREFIX_TOKENS[name]
    path = _save(net.state_dict(), tmp_path / "w.safetensors")
    encoder = create_encoder(name, weights=path, depth=1).eval()
    for (key, theirs), ours in zip(net.state_dict().items(), encoder.model.state_dict().values()):
        assert torch.equal(theirs, ours), key

    p = PATCH[name]
    assert encoder.strides == [p] and encoder.patch_size == p and encoder.multiple == p
    images = _images(4 * p, 3 * p)
    with torch.inference_mode():
        (features,) = encoder(images)
        mean = torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(encoder.std).view(1, 3, 1, 1) * 255
        tokens = net.eval().forward_features((images - mean) / std)  # the published forward: all tokens, normed
    patches = tokens[:, net.num_prefix_tokens:].reshape(1, 4, 3, -1).permute(0, 3, 1, 2)
    assert features.shape == (1, encoder.channels[0], 4, 3)
    torch.testing.assert_close(features, patches)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_reduced_depth_keeps_the_published_key_layout(name: str) -> None:
    with torch.device("meta"):  # shapes only: the full models would take up to 4.5 GB
        full = create_network(name).state_dict()
        small = create_network(name, depth=1).state_dict()
    expected = {k: v.shape for k, v in full.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    assert {k: v.shape for k, v in small.items()} == expected
    count = sum(v.numel() for v in full.values())
    assert abs(count / PUBLISHED_PARAMETERS[name] - 1) < 0.01


def test_h_optimus_uses_its_own_normalisation() -> None:
    assert ENCODERS["h-optimus-0"].mean == (0.707223, 0.578729, 0.703617)
    assert ENCODERS["h-optimus-0"].std == (0.211883, 0.230117, 0.177517)
    assert ENCODERS["uni2-h"].mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(("suffix", "wrapper"), [
    (".safetensors", None), (".bin", None), (".pth", None), (".pt", None),
    (".pth", "state_dict"), (".pt", "model"),  # training checkpoints; safetensors holds flat tensors only
])
def test_weight_formats_and_wrappers(suffix: str, wrapper: str | None, tmp_path: Path) -> None:
    net = create_network("timm:vit_tiny_patch16_224", depth=1)
    state = net.state_dict()
    if wrapper is not None:
        state = {wrapper: state, "epoch": 3}
    path = _save(state, tmp_path / f"w{suffix}")
    encoder = create_encoder("timm:vit_tiny_patch16_224", weights=path, depth=1)
    assert torch.equal(encoder.model.pos_embed, net.pos_embed)


def test_half_precision_weights_load_into_float32(tmp_path: Path) -> None:
    net = create_network("timm:vit_tiny_patch16_224", depth=1)
    path = _save({k: v.half() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    encoder = create_encoder("timm:vit_tiny_patch16_224", weights=path, depth=1)
    assert encoder.model.pos_embed.dtype == torch.float32
    assert torch.equal(encoder.model.pos_embed, net.pos_embed.half().float())


def test_non_persistent_buffers_are_computed_not_loaded(tmp_path: Path) -> None:
    # EVA-02's rotary tables are buffers left out of the state dict: the network must be built for real
    net = create_network("timm:eva02_tiny_patch14_224", depth=1).eval()
    path = _save(net.state_dict(), tmp_path / "w.safetensors")
    encoder = create_encoder("timm:eva02_tiny_patch14_224", weights=path, depth=1).eval()
    assert not any(b.is_meta for b in encoder.buffers())
    with torch.inference_mode():
        (features,) = encoder(_images(28, 42))
    assert features.shape == (1, 192, 2, 3) and torch.isfinite(features).all()


def test_mismatched_weights_list_keys_and_architecture(tmp_path: Path) -> None:
    path = _save(create_network("timm:vit_tiny_patch16_224", depth=2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(InputError) as caught:
        create_encoder("timm:vit_tiny_patch16_224", weights=path, depth=1)
    message = str(caught.value)
    assert str(path) in message and "timm:vit_tiny_patch16_224 with depth=1" in message
    assert "12 unexpected keys (blocks.1." in message and ", ..." in message and "missing" not in message

    path = _save(create_network("uni", depth=1).state_dict(), tmp_path / "uni.safetensors")
    with pytest.raises(InputError) as caught:
        create_encoder("virchow2", weights=path, depth=1)
    message = str(caught.value)
    assert "virchow2" in message and "VisionTransformer" in message
    assert "1 missing keys (reg_token)" in message
    assert "20 shape mismatches (cls_token: file (1, 1, 1024) vs model (1, 1, 1280), pos_embed: " in message


def test_unreadable_weights_are_input_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "w.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights"):
        read_weights(garbage)
    broken = tmp_path / "w.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="cannot read weights"):
        read_weights(broken)
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(InputError, match="unknown weights format"):
        read_weights(tmp_path / "w.npz")
    with pytest.raises(InputError, match="no such weights file"):
        read_weights(tmp_path / "missing.safetensors")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1)}, tmp_path / "meta.pt")
    with pytest.raises(InputError, match="not a state dict"):
        read_weights(tmp_path / "meta.pt")


def test_unknown_names_and_downloads_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("uni3")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_encoder("timm:not_a_model")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        create_encoder("torchvision:not_a_model")
    with pytest.raises(ValueError, match="local file"):
        create_encoder("timm:resnet18", pretrained=True)


def test_padding_is_reflect_on_right_and_bottom() -> None:
    encoder = create_encoder("uni", depth=1).eval()
    images = _images(30, 45)
    with torch.inference_mode():
        (features,) = encoder(images)
        (by_hand,) = encoder(F.pad(images, (0, 3, 0, 2), mode="reflect"))
    assert features.shape[-2:] == (2, 3)
    torch.testing.assert_close(features, by_hand)
    with torch.inference_mode():
        (tiny,) = encoder(_images(5, 7))  # smaller than the pad: replicated instead of reflected
    assert tiny.shape[-2:] == (1, 1)


def test_several_vit_blocks() -> None:
    encoder = create_encoder("uni", depth=2, layers=[-1, 0]).eval()
    assert encoder.layers == [0, 1] and encoder.strides == [16, 16] and encoder.channels == [1024, 1024]
    single = create_encoder("uni", depth=2).eval()
    single.load_state_dict(encoder.state_dict())
    images = _images(32, 48)
    with torch.inference_mode():
        first, last = encoder(images)
        (only_last,) = single(images)
    assert first.shape == last.shape == (1, 1024, 2, 3)
    torch.testing.assert_close(last, only_last)
    assert not torch.allclose(first, last)
    with pytest.raises(ValueError, match="layers"):
        create_encoder("uni", depth=2, layers=[2])


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_cnn_stage_outputs(name: str, tmp_path: Path) -> None:
    net = create_network(name)
    path = _save(net.state_dict(), tmp_path / "w.pth")  # the classification checkpoint, head included
    encoder = create_encoder(name, weights=path).eval()
    assert encoder.strides == [4, 8, 16, 32] and encoder.channels == [64, 128, 256, 512]
    assert encoder.multiple == 32 and encoder.patch_size is None
    images = _images(70, 100)
    with torch.inference_mode():
        features = encoder(images)
        x = F.pad((images - encoder.pixel_mean) / encoder.pixel_std, (0, 28, 0, 26), mode="reflect")
        act = net.act1 if name.startswith("timm") else net.relu  # the two libraries name the stem ReLU apart
        x = net.eval().maxpool(act(net.bn1(net.conv1(x))))
        expected = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            expected.append(x)
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    for ours, theirs in zip(features, expected):
        torch.testing.assert_close(ours, theirs)


def test_torchvision_needs_layers_outside_the_resnet_family() -> None:
    with pytest.raises(ValueError, match="layers="):
        create_encoder("torchvision:mobilenet_v3_small")
    encoder = create_encoder("torchvision:mobilenet_v3_small", layers=["features.3", "features.12"])
    assert encoder.strides == [8, 32] and encoder.channels == [24, 576]


# ---- feature query ----------------------------------------------------------------------------------------


def test_sampling_matches_hand_computed_bilinear_values() -> None:
    # a 2x2 map at stride 4 (an 8x8 padded input): cell centres at x, y = 1.5 and 5.5
    fmap = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    points = torch.tensor([
        [1.5, 1.5],  # centre of cell (0, 0)
        [5.5, 5.5],  # centre of cell (1, 1)
        [3.5, 1.5],  # halfway between (0, 0) and (0, 1)
        [2.5, 4.5],  # wx = 0.25, wy = 0.75: (1*.75 + 2*.25)*.25 + (3*.75 + 4*.25)*.75
        [-0.5, -0.5],  # image corner, outside the centres: border cell (0, 0)
        [7.5, 3.5],  # right edge: border column, halfway between rows
    ])
    (values,) = sample_features([fmap], [4], [points])
    assert values.shape == (6, 1)
    torch.testing.assert_close(values[:, 0], torch.tensor([1.0, 4.0, 1.5, 2.75, 1.0, 3.0]))


def test_cell_centres_give_exact_cells_and_levels_concatenate() -> None:
    generator = torch.Generator().manual_seed(1)
    fine = torch.randn(2, 3, 6, 8, generator=generator)  # stride 4 over a 24 x 32 input
    coarse = torch.randn(2, 5, 3, 4, generator=generator)  # stride 8
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    centres = torch.stack([cols, rows], -1).reshape(-1, 2) * 4 + 1.5  # the detector's anchors: j*s + (s-1)/2
    points = [centres, centres[:5]]
    features = sample_features([fine, coarse], [4, 8], points)
    assert [f.shape for f in features] == [(48, 8), (5, 8)]
    torch.testing.assert_close(features[0][:, :3], fine[0].reshape(3, -1).T)
    torch.testing.assert_close(features[1][:, :3], fine[1].reshape(3, -1).T[:5])
    # the centre of the stride-8 cell (row 1, column 2): x = 2*8 + 3.5, y = 1*8 + 3.5
    at_centre, nothing = sample_features([coarse], [8], [torch.tensor([[19.5, 11.5]]), torch.zeros(0, 2)])
    torch.testing.assert_close(at_centre[0], coarse[0, :, 1, 2])
    assert nothing.shape == (0, 5)
    padded = sample_features_padded([fine, coarse], [4, 8], torch.stack([centres[:5], centres[:5]]))
    torch.testing.assert_close(padded[1], features[1])


def test_sampling_edge_cases() -> None:
    fmap = torch.arange(4.0).view(1, 1, 2, 2).to(torch.bfloat16)
    (empty,) = sample_features([fmap], [4], [torch.zeros(0, 2)])
    assert empty.shape == (0, 1)
    (value,) = sample_features([fmap], [4], [torch.tensor([[5.5, 5.5]], dtype=torch.float64)])
    assert value.dtype == torch.float32 and value.item() == 3.0
    with pytest.raises(ValueError, match="strides"):
        sample_features([fmap], [4, 8], [torch.zeros(1, 2)])
    with pytest.raises(ValueError, match="point sets"):
        sample_features([fmap], [4], [torch.zeros(1, 2), torch.zeros(1, 2)])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        sample_features([fmap], [4], [torch.zeros(1, 3)])


# ---- the full UNI2-h layout ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_uni2h_loads_strictly_and_runs(tmp_path: Path) -> None:
    start = time.perf_counter()
    net = create_network("uni2-h")
    assert 680e6 < sum(p.numel() for p in net.parameters()) < 683e6
    path = _save(net.state_dict(), tmp_path / "uni2-h.safetensors")
    reference = net.blocks[23].mlp.fc2.weight[:3, :3].clone()
    del net
    encoder = create_encoder("uni2-h", weights=path).eval()
    torch.testing.assert_close(encoder.model.blocks[23].mlp.fc2.weight[:3, :3], reference, rtol=0, atol=0)
    with torch.inference_mode():
        (features,) = encoder(_images(224, 224))
    assert features.shape == (1, 1536, 16, 16) and torch.isfinite(features).all()
    print(f"full UNI2-h: {time.perf_counter() - start:.1f} s")
