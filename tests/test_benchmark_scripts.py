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
