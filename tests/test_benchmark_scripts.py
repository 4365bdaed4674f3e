"""Every benchmark script still imports and parses its options against today's library.

Benchmarks are not run by CI (they take minutes to hours), so a library change that breaks one goes unnoticed until
someone reruns it: `bench_stain_shift.py` and `bench_tta.py` were found broken that way. This runs each script's
module-level code and its ``--help`` (argparse exits before any work), which catches a removed or renamed import,
a module-level use of a changed constant, and a broken parser; what a script's ``main`` does after parsing is not run.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
BENCH_EXTRAS = {"torchstain", "cv2", "openvino"}  # the `bench` extra, which the test install leaves out


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_imports_and_parses_its_options(script: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    parses_options = "argparse" in script.read_text()
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    try:
        if parses_options:
            with pytest.raises(SystemExit) as stopped:
                runpy.run_path(str(script), run_name="__main__")
            assert stopped.value.code == 0
            assert "usage:" in capsys.readouterr().out
        else:  # a helper module, or a script without options: its module-level code only
            runpy.run_path(str(script), run_name="imported")
    except ModuleNotFoundError as missing:
        if missing.name not in BENCH_EXTRAS:
            raise
        pytest.skip(f"needs the bench extra ({missing.name})")


def test_every_benchmark_script_is_found() -> None:
    assert len(SCRIPTS) >= 20 and BENCHMARKS / "bench_detection.py" in SCRIPTS


@pytest.mark.parametrize("name", ["TCGA-NH-A8F7-01A-01-TS1", "TCGA-AR-A1AK-01Z-00-DX1"])
def test_the_device_copy_of_monuseg_keeps_every_centroid(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`pack_detection_datasets.minimal_outlines` drops only vertices on a straight run of an outline, so the
    MoNuSeg reader places every nucleus where it does on the original (one file has no pixel size; the other has
    outlines that turn back on themselves, and tiny ones read as the mean of their vertices)."""
    import warnings

    from conftest import SHARED, shared_or_skip

    from denuc.datasets.monuseg import read_annotation_file

    xml = shared_or_skip(SHARED / "datasets" / "monuseg" / "MoNuSegTrainingData" / "Annotations" / f"{name}.xml")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from pack_detection_datasets import minimal_outlines

    copy = tmp_path / xml.name
    copy.write_text(minimal_outlines(xml), encoding="utf-8")
    assert copy.stat().st_size < 0.6 * xml.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original, packed = read_annotation_file(xml, (1000, 1000)), read_annotation_file(copy, (1000, 1000))
    assert original.mpp == packed.mpp and len(original) == len(packed) > 100
    np.testing.assert_allclose(packed.xy, original.xy, atol=1e-9)
