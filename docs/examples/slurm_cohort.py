"""A cohort of slides on a SLURM cluster with dask-jobqueue: one Dask worker per SLURM job (one GPU each).

Run it on the login (or a submit) node, in the environment denuc is installed in, with the slides and the output
folder on a file system the compute nodes share:

    pip install "denuc[cluster]" dask-jobqueue
    python slurm_cohort.py cohort.csv /shared/results --jobs 8 --partition gpu --account my_lab

This process holds the Dask scheduler and submits the SLURM jobs; each job starts one worker process that loads
the model once and then predicts one slide at a time, writing its outputs itself. Keep this process alive for
the whole cohort (run it in tmux/screen, or submit it as a small CPU job of its own). A job that ends (walltime,
pre-emption, out of memory) takes down only the slide it was on: that slide is retried on another job from its
saved chunks (``--retries``), and jobs are submitted again while slides remain (``adapt``). Run the same command
again after a stop: finished slides are skipped, unfinished ones resume. See docs/cohorts.md.

Not run in denuc's tests (no SLURM there); the cluster settings below are the ones to adapt to your site.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dask_jobqueue import SLURMCluster

from denuc.inference.cohort import ModelSpec, read_manifest, run_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="CSV: path[,mpp][,out_name] with a header row")
    parser.add_argument("out", type=Path, help="output folder (on the shared file system)")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (= workers = GPUs) at most at once")
    parser.add_argument("--partition", default="gpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="04:00:00", help="per job; a job that reaches it is replaced")
    parser.add_argument("--cpu", action="store_true", help="CPU nodes: 16 single-thread workers per job, no GPU")
    parser.add_argument("--model", default="default-bundle", help="shipped name, or a weights file on the shared "
                                                                 "file system")
    parser.add_argument("--retries", type=int, default=2)
    args = parser.parse_args()

    jobs = read_manifest(args.manifest)  # bad rows fail here, naming the line, before anything is submitted
    if args.cpu:
        # one worker process per core, one thread each: 16 slides at a time per job, each on one core
        resources = {"cores": 16, "processes": 16, "memory": "64GB", "job_extra_directives": []}
        model = ModelSpec(args.model, device="cpu")
    else:
        # one worker per job, one thread (a slide at a time) holding the job's GPU; SLURM sets
        # CUDA_VISIBLE_DEVICES for the job, so the worker's "cuda" is its own GPU. job_cpu books CPUs for the
        # tile-reading threads and the tissue mask, which the one Dask thread does not count.
        resources = {"cores": 1, "processes": 1, "job_cpu": 8, "memory": "32GB",
                     "job_extra_directives": ["--gres=gpu:1"]}
        model = ModelSpec(args.model, device="cuda")
    cluster = SLURMCluster(
        queue=args.partition, account=args.account, walltime=args.walltime, log_directory="dask-logs",
        # the environment the workers start in: load your site's modules and activate denuc's environment here
        job_script_prologue=["source ~/venvs/denuc/bin/activate"],
        # the scheduler hands a dead worker's slide straight back (run_cohort counts the retries), and its
        # dashboard is on port 8787 of this node (ssh -L 8787:localhost:8787 login-node; needs bokeh)
        scheduler_options={"allowed_failures": 0, "dashboard_address": ":8787"},
        **resources,
    )
    cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)  # submits jobs while slides wait, ends idle ones
    try:
        rows = run_cohort(jobs, model, args.out, cluster=cluster.scheduler_address, retries=args.retries)
    finally:
        cluster.close()
    failed = [row for row in rows if row["status"] == "failed"]
    for row in failed:
        print(f"failed: {row['error']}")
    print(f"{len(rows) - len(failed)} of {len(rows)} slides done; table: {args.out / 'cohort.csv'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
