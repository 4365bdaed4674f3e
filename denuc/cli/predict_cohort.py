"""`denuc predict --cluster/--manifest`: the slides as a cohort (``denuc.inference.cohort``), one Dask task per
slide, with a cohort table; docs/cohorts.md."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

from denuc.cli.options import number
from denuc.inference.cohort import parse_cluster


def cluster_address(text: str) -> str:
    """An argparse ``type``: ``local:N`` or ``tcp://HOST:PORT``."""
    try:
        return parse_cluster(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path,
                   help="a CSV listing slides, with a header row: path (relative to the CSV's folder), and "
                        "optionally mpp (um/px, or auto: estimated from the slide) and out_name (stem of the "
                        "outputs); runs as a cohort")
    p.add_argument("--cluster", type=cluster_address, metavar="local:N|tcp://HOST:PORT",
                   help="one Dask task per slide: local:N starts N worker processes here, tcp://HOST:PORT joins a "
                        "running scheduler (e.g. dask-jobqueue on SLURM); writes cohort.parquet/.csv; interrupted "
                        "slides always resume unless --overwrite (docs/cohorts.md; needs `pip install "
                        "denuc[cluster]`)")
    p.add_argument("--retries", type=number(int, 0), default=2,
                   help="with --cluster: times a slide whose worker died (killed, out of memory) is retried from "
                        "its saved chunks before it is marked failed (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from denuc.cli.detect import SAMPLE
    from denuc.cli.predict import collect_inputs
    from denuc.errors import InputError
    from denuc.hub import describe, resolve
    from denuc.inference.cohort import Job, ModelSpec, SlideSettings, expand_globs, read_manifest, run_cohort

    jobs = [Job(path) for path in collect_inputs(expand_globs(args.inputs))]
    if args.manifest:
        jobs += read_manifest(args.manifest)
    if args.mpp is not None:  # for every slide the manifest gives no pixel size
        jobs = [job if job.mpp else replace(job, mpp=args.mpp) for job in jobs]
    if args.sample:
        sample = Path(str(resources.files("denuc") / "data" / SAMPLE[0]))
        jobs.append(Job(sample, SAMPLE[1], f"bundled sample image ({SAMPLE[1]} um/px)"))
    if not jobs:
        raise InputError("", "no slides given (pass slide files, folders, a --manifest, or --sample)")
    name = args.model or ("default" if args.detector_only else "default-bundle")
    described = describe(resolve(name, kind=None if args.detector_only else "bundle"))
    if args.embeddings and (args.detector_only or described["kind"] != "bundle"):
        raise InputError(name, "--embeddings saves the classifier's features, and this model has no classifier")
    provenance = {"model": {k: described[k] for k in ("tag", "file", "sha256", "kind", "denuc_version")},
                  "detector_only": args.detector_only, "command": args.command_line}
    rows = run_cohort(
        jobs, ModelSpec(name, args.detector_only, args.device, args.runtime, args.tta), args.out,
        cluster=args.cluster, retries=args.retries, provenance=provenance, progress=not args.quiet,
        settings=SlideSettings(not args.no_tissue_mask, args.batch_size, args.workers, args.embeddings,
                               args.chunk_tiles or SlideSettings.chunk_tiles, args.overwrite))
    for row in rows:
        if row["status"] == "done" and (row.get("mpp_source") or "").startswith("estimated") and not args.quiet:
            print(f"{row['slide']}: pixel size estimated from the image: {row['mpp']:.2f} um/px "
                  f"(confidence {row['mpp_confidence']:.2f})")
        if row.get("warnings"):
            print(f"denuc predict: warning: {row['warnings']}", file=sys.stderr)
        if row["status"] == "failed":
            print(f"denuc predict: error: {row['error']}", file=sys.stderr)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "skipped", "failed")}
    if not args.quiet or counts["failed"]:
        print(f"denuc predict: {len(rows)} slides: {counts['done']} done, {counts['skipped']} already done (kept), "
              f"{counts['failed']} failed; table: {args.out / 'cohort.csv'}", file=sys.stderr)
    return 2 if counts["failed"] else 0
