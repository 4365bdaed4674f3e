"""Two checkouts of denuc side by side: same commands, interleaved, outputs compared and wall times measured.

    python benchmarks/bench_versions.py OLD_TREE [NEW_TREE] [--rounds 3] [--images 10]
        [--out benchmarks/results/versions/versions.json]

Each round runs, once per tree (PYTHONPATH=<tree>, a fresh process each): `denuc detect` on BRCAM2C test images
(the `default` detector) and `denuc predict` of the CMU-1 region slide (the `default` bundle: detection and
classification), in the same order. Reported: median wall seconds per command and tree, and whether the two
trees' point tables are identical (a restructure must not change a result).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_result

SHARED = Path(os.environ.get("DENUC_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def commands(images: list[Path], out: Path) -> dict[str, list[str]]:
    slide = SHARED / "slides" / "CMU-1-Small-Region.svs"
    return {"detect_brcam2c_test": ["detect", *map(str, images), "--mpp", "0.5", "--out", str(out / "detect")],
            "predict_cmu1_bundle": ["predict", str(slide), "--out", str(out / "predict"), "--quiet"]}


def run(tree: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "denuc.cli", *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def tables(folder: Path) -> dict[str, list[str]]:
    """Per command, the sha256 of each point table it wrote, sorted (file names may differ between versions:
    the old `detect` cut dotted names short)."""
    return {c.name: sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in c.rglob("*.csv"))
            for c in sorted(folder.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "versions" / "versions.json")
    args = parser.parse_args()
    names = (SHARED / "datasets" / "brcam2c" / "brca_ds_test.txt").read_text().split()[:args.images]
    images = [next((SHARED / "datasets" / "brcam2c" / "images").glob(f"{n}*")) for n in names]
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    seconds = {t: {c: [] for c in commands(images, Path("."))} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for tree, path in trees.items():
                out = Path(tmp) / tree / str(round_)
                for name, argv in commands(images, out).items():
                    seconds[tree][name].append(run(path, argv))
        old, new = tables(Path(tmp) / "old" / "0"), tables(Path(tmp) / "new" / "0")
        identical = {name: bool(old[name]) and old[name] == new.get(name) for name in old}
    result = {"trees": {t: str(p) for t, p in trees.items()}, "rounds": args.rounds, "images": [p.name for p in images],
              "median_wall_s": {t: {c: statistics.median(v) for c, v in s.items()} for t, s in seconds.items()},
              "wall_s": seconds, "tables_identical": identical, "all_identical": all(identical.values())}
    for command in seconds["old"]:
        o, n = result["median_wall_s"]["old"][command], result["median_wall_s"]["new"][command]
        print(f"{command}: old {o:.2f} s, new {n:.2f} s (new/old {n / o:.2f})")
    print(f"point tables identical: {sum(identical.values())} of {len(identical)}")
    write_result(args.out, result, models=["default", "default-bundle"])


if __name__ == "__main__":
    main()
