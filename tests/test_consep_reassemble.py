"""Rebuilding CoNSeP's whole train images from the project's crops (benchmarks/consep_reassemble.py): every crop is
where the rebuild says, and every nucleus of a crop is one nucleus of the rebuilt image."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from conftest import SHARED, shared_or_skip

from denuc.datasets import get_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import consep_reassemble  # noqa: E402


def test_rebuilt_image_holds_every_crop_and_joins_cut_nuclei(tmp_path: Path) -> None:
    root = shared_or_skip(SHARED / "datasets" / "consep")
    source = "train_5"  # 16 crops, few nuclei: quick
    image, label = consep_reassemble.reassemble(root, source)
    inst = label["inst_map"]
    assert image.shape == (1000, 1000, 3) and inst.shape == (1000, 1000)
    crop_instances = 0
    placed_after = np.zeros((16, 1000, 1000), bool)  # where a later crop overwrites crop c's pixels
    for c in range(16):
        for x, y in consep_reassemble.ORIGINS[c + 1:]:
            placed_after[c, y:y + 256, x:x + 256] = True
    for c, (x, y) in enumerate(consep_reassemble.ORIGINS):
        crop, crop_label = consep_reassemble.read_crop(root, f"{source}_{c:03d}")
        assert np.abs(image[y:y + 256, x:x + 256].astype(float) - crop).mean() < consep_reassemble.MAX_SEAM_DIFFERENCE
        part = crop_label["inst_map"]
        crop_instances += int(part.max())
        rebuilt = inst[y:y + 256, x:x + 256]
        own = ~placed_after[c, y:y + 256, x:x + 256]
        assert own.mean() > 0.8 and np.array_equal(rebuilt[own] > 0, part[own] > 0)  # its nuclei, where it shows
        for k in range(1, int(part.max()) + 1):  # a crop's nucleus is one rebuilt nucleus (where that crop was placed)
            ids = np.unique(rebuilt[part == k])
            assert len(ids[ids > 0]) <= 1
    n = int(label["inst_type"].shape[0])
    assert 0 < n < crop_instances
    # nuclei cut by the seams between abutting crops (rows 255 | 256 and 511 | 512) are joined: one id either side
    across = np.intersect1d(inst[255], inst[256]), np.intersect1d(inst[511], inst[512])
    assert sum(int((ids > 0).sum()) for ids in across) == 2
    assert np.array_equal(np.unique(inst), np.arange(n + 1))
    # written in the release's layout, the consep reader reads it with the split by source image
    consep_reassemble.write(tmp_path, source, image, label)
    sample = get_dataset("consep", tmp_path).sample(source)
    assert len(sample.nuclei) == n and sample.nuclei.image_size == (1000, 1000)
    assert np.allclose(sample.nuclei.xy, label["inst_centroid"])
