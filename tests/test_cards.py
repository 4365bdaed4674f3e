"""Tables in the model cards that a script prints from saved results are that script's output (no figure typed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["default", "precise"])
def test_detector_card_holds_the_threshold_tables_of_the_saved_sweeps(model: str) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_thresholds

    table = bench_thresholds.table(bench_thresholds.RESULTS / "detection" / f"thresholds_val_{model}.json")
    card = (ROOT / "denuc" / "weights" / "DETECTOR_CARD.md").read_text()
    assert table in card, f"DETECTOR_CARD.md: the {model} threshold table differs from bench_thresholds.py --table"
