"""Ctrl-C during `denuc predict`: a clean stop with the command that resumes, the saved chunks kept, and no set of
outputs without its summary, even when the interrupt comes while the outputs are renamed into place."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP
from PIL import Image

from denuc.cli import main
from denuc.config import DetectorConfig
from denuc.inference.detect import Detector
from denuc.inference.pipeline import Pipeline
from denuc.inference.slide import OUTPUT_SUFFIXES, predict_slide
from denuc.io.slides import open_slide, write_pyramidal_tiff
from denuc.models.detector import PointDetector

torch.set_num_threads(1)  # as the command below (OMP_NUM_THREADS=1): bit-identical scores


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A 1860 x 1395 pyramidal TIFF (the bundled sample and its mirror image, three rows of them: about 60
    tiles, so that a run outlasts the signal sent after its first chunk even on a fast, idle machine) and a tiny
    untrained detector (fast; finds about 1% of anchors)."""
    root = tmp_path_factory.mktemp("interrupt")
    sample = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    row = np.concatenate([sample, sample[:, ::-1], sample, sample[:, ::-1]], axis=1)
    write_pyramidal_tiff(root / "slide.tif", np.concatenate([row, row[::-1], row], axis=0), SAMPLE_MPP)
    torch.manual_seed(0)
    Detector(PointDetector(DetectorConfig(head_stride=4, score_threshold=0.53))).save(root / "tiny.safetensors")
    return root / "slide.tif", root / "tiny.safetensors"


def test_sigint_stops_cleanly_and_the_printed_command_resumes_to_the_same_table(inputs, tmp_path: Path) -> None:
    slide, model = inputs
    # one tile per saved chunk and two test-time views per tile: the run lasts long enough to be interrupted
    options = ["--model", str(model), "--runtime", "torch", "--chunk-tiles", "1", "--tta", "2", "--quiet"]
    out = tmp_path / "out"
    # Ctrl-C as a terminal delivers it, even where this test process ignores SIGINT (a background job of a shell
    # without job control does): the command then starts with Python's handler
    process = subprocess.Popen([sys.executable, "-m", "denuc.cli", "predict", str(slide), "--out", str(out), *options],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob(".slide.partial/chunk_*.parquet")) and process.poll() is None:
        assert time.monotonic() < deadline, "no chunk saved within 2 minutes"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130, f"the run ended by itself before it could be interrupted: {err}"
    assert "Traceback" not in err and f"denuc predict: interrupted while processing {slide}: " in err, err
    assert f"chunks are saved in {out / '.slide.partial'}" in err
    assert list(out.glob(".slide.partial/chunk_*.parquet")) and not list(out.glob("slide*"))

    resume = shlex.split(err.splitlines()[-1].split("denuc predict: to continue: ")[1])
    assert resume[:2] == ["denuc", "predict"] and resume[-1] == "--resume"
    assert main(resume[1:]) == 0
    assert main(["predict", str(slide), "--out", str(tmp_path / "reference"), *options]) == 0
    resumed, reference = (pq.read_table(folder / "slide.parquet") for folder in (out, tmp_path / "reference"))
    assert reference.num_rows > 100 and resumed.equals(reference)


def test_interrupt_while_outputs_are_renamed_into_place_waits_until_all_are_there(inputs, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    slide, model = inputs
    replace = os.replace

    def interrupted_at_the_table(source, target) -> None:
        if Path(target) == tmp_path / "slide.parquet":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C among the renames into place
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_at_the_table)
    # Python's Ctrl-C handler, even where this test process ignores SIGINT (a background job of a shell without
    # job control does)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open_slide(slide) as opened, pytest.raises(KeyboardInterrupt):
            predict_slide(opened, Pipeline.from_pretrained(model), tmp_path, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("slide*")) == sorted(
        f"slide{suffix}" for suffix in OUTPUT_SUFFIXES if suffix != "_embeddings.npy")
    with open_slide(slide) as opened:  # complete: the next run keeps them
        assert predict_slide(opened, Pipeline.from_pretrained(model), tmp_path, progress=False)["skipped"]
    assert not (tmp_path / ".slide.partial").exists()
