"""Outline cost of two denuc checkouts side by side, on one machine in one run: what ``--outlines`` adds to
``predict --detector-only`` on a slide, measured as ``bench_outlines.time_slide`` does (a plain run and an outlined
run; the outlined run's seconds in the network and in outlining less the plain run's in the network, over the
latter), in a fresh process of each checkout, the checkouts alternated round by round (A, B, A, B, ...) so that both
see the same machine state. Each process times two passes and keeps the second (the first pays for loading).

For a design change that an older checkout's code cannot run (the outline head of denuc 0.5 had a stem of its own;
today's reads its detector's maps), e.g.:

    git worktree add /tmp/v05 <commit>
    python benchmarks/compare_outline_cost.py --tree v05=/tmp/v05 --tree now=. \
        --slide ../shared/slides/CMU-1-Small-Region.svs

Two heads of one checkout behind another detector: ``--tree a=. --tree b=. --outlines b=HEAD --detector precise``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import RESULTS, git_state, write_result

# the measurement of bench_outlines.time_slide, written out here: an older checkout's bench measures otherwise
TIMER = """
import json, sys, tempfile, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from denuc.inference.detect import Detector
from denuc.inference.outline import Outliner
from denuc.inference.pipeline import Pipeline
from denuc.inference.slide import predict_slide
from denuc.io.slides import open_slide
detector = Detector.from_pretrained(sys.argv[3], runtime="auto")
outliner = Outliner.from_pretrained(sys.argv[2], runtime="auto")
with tempfile.TemporaryDirectory() as out, open_slide(Path(sys.argv[1])) as slide:
    for _ in range(2):
        plain = predict_slide(slide, Pipeline(detector), out, overwrite=True, progress=False)
        run = predict_slide(slide, Pipeline(detector), out, overwrite=True, progress=False, outliner=outliner)
print(json.dumps({"nuclei": run["nuclei"], "detect_s": plain["timing_s"]["model"],
                  "outlined_model_s": run["timing_s"]["model"], "outline_s": run["timing_s"]["outlines"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a denuc checkout (repeat)")
    parser.add_argument("--outlines", action="append", default=[],
                        help="NAME=MODEL: the outline head a checkout runs (default: its default-outlines)")
    parser.add_argument("--detector", default="default",
                        help="the detector both checkouts run before outlining (default: %(default)s)")
    parser.add_argument("--slide", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "outlines" / "outline_cost_versions.json"))
    args = parser.parse_args()
    trees = dict(spec.split("=", 1) for spec in args.tree)
    heads = {name: "default-outlines" for name in trees} | dict(spec.split("=", 1) for spec in args.outlines)
    slide = str(Path(args.slide).resolve())
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            tree = Path(tree).resolve()
            done = subprocess.run([sys.executable, "-c", TIMER, slide, heads[name], args.detector], cwd=tree,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)},
                                  check=True)
            rows[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, rows[name][-1], flush=True)
    summary = {}
    for name, runs in rows.items():
        ratio = [(r["outlined_model_s"] + r["outline_s"] - r["detect_s"]) / r["detect_s"] for r in runs]
        summary[name] = {"tree": trees[name], "outlines": heads[name],
                         "checkout": git_state(Path(trees[name]).resolve()), "nuclei": runs[0]["nuclei"],
                         **{key: [r[key] for r in runs] for key in ("detect_s", "outlined_model_s", "outline_s")},
                         "outline_over_detect_median": float(np.median(ratio))}
        print(name, "outline / detection, median:", round(summary[name]["outline_over_detect_median"], 3))
    write_result(Path(args.out), {"slide": args.slide, "detector": args.detector, "rounds": args.rounds,
                                   "trees": summary})


if __name__ == "__main__":
    main()
