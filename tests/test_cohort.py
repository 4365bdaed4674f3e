"""Cohorts on Dask: manifests, a LocalCluster of 2 workers against the sequential run, dead workers, failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_MPP, SHARED, shared_or_skip

from denuc.cli import main
from denuc.errors import InputError
from denuc.inference.cohort import Job, ModelSpec, SlideSettings, expand_globs, parse_cluster, read_manifest, run_cohort

distributed = pytest.importorskip("distributed", reason="the cluster extra: pip install denuc[cluster]")

SLIDES = SHARED / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
BROKEN = SLIDES / "broken.svs"
# TCGA's file has no pixel size. Its nuclei (about 3 px across) say about 2 um/px, but at that size the model's
# 0.5 um/px grid is 16 times its area (about a minute here); 0.25 reads its 2x level as it is, in few tiles.
# The outputs are compared with the sequential run's at the same value, so which value it is does not matter.
TCGA_MPP = 0.25
MODEL = ["--detector-only", "--model", "fast", "--batch-size", "4", "--quiet"]
TABLES = (".csv", ".parquet")

torch.set_num_threads(1)  # like each worker of the 2 on this 2-core machine (local_cluster): bit-identical scores


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The sequential command's outputs (no --cluster) for the three inputs."""
    out = tmp_path_factory.mktemp("sequential")
    shared_or_skip(CMU), shared_or_skip(TCGA)
    assert main(["predict", str(CMU), "--sample", "--out", str(out), *MODEL]) == 0
    assert main(["predict", str(TCGA), "--mpp", str(TCGA_MPP), "--out", str(out), *MODEL]) == 0
    return out


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a LocalCluster of 2 worker processes (``local_cluster``: a dead worker's task comes back
    to ``run_cohort`` at once); the tests join it as `--cluster tcp://...` would."""
    from denuc.inference.cohort import local_cluster

    with local_cluster(2, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def manifest(path: Path, *rows: str) -> Path:
    path.write_text("\n".join(["path,mpp,out_name", *rows]) + "\n")
    return path


def assert_same_outputs(left: Path, right: Path) -> None:
    """Byte-identical tables; the same GeoJSON features but for their ids (random UUIDs with the row id)."""
    for suffix in TABLES:
        assert left.with_name(left.name + suffix).read_bytes() == right.with_name(right.name + suffix).read_bytes()
    features = [json.loads(p.with_name(p.name + ".geojson").read_text())["features"] for p in (left, right)]
    assert len(features[0]) == len(features[1]) > 0
    assert [{**f, "id": f["id"][-12:]} for f in features[0]] == [{**f, "id": f["id"][-12:]} for f in features[1]]


def test_manifest_rows_become_jobs(tmp_path: Path) -> None:
    (tmp_path / "a.svs").touch()
    jobs = read_manifest(manifest(tmp_path / "m.csv", "a.svs,,", "/data/b.svs, 0.25 ,b2", "", "c.tif,0.5,"))
    assert jobs == [Job(tmp_path / "a.svs"), Job(Path("/data/b.svs"), 0.25, "manifest m.csv line 3", "b2"),
                    Job(tmp_path / "c.tif", 0.5, "manifest m.csv line 5")]
    assert [job.name for job in jobs] == ["a", "b2", "c"]
    only_paths = tmp_path / "only.csv"
    only_paths.write_text("path\na.svs\n")
    assert read_manifest(only_paths) == [Job(tmp_path / "a.svs")]


@pytest.mark.parametrize(("rows", "problem"), [
    (["path,mpp,out_name", "a.svs,-1,"], "line 2: mpp must be a positive number"),
    (["path,mpp,out_name", "a.svs,0.5,", "b.svs,abc,"], "line 3: mpp must be a positive number of um/px, got 'abc'"),
    (["path,mpp,out_name", "a.svs,0.5"], "line 2: 2 fields where the header has 3"),
    (["path,mpp,out_name", ",0.5,x"], "line 2: empty path"),
    (["path,mpp,out_name", "a.svs,,../x"], "line 2: out_name is a file stem"),
    (["path,mpp,out_name", "x/a.svs,,", "y/a.svs,,"], "line 3: output name 'a' is also line 2's"),
    (["path,pixel_size", "a.svs,0.5"], "line 1: expected a header row"),
    (["a.svs,0.5,"], "line 1: expected a header row"),
    (["path,mpp,out_name"], "lists no slides"),
])
def test_bad_manifest_rows_name_the_file_and_line(tmp_path: Path, rows: list[str], problem: str) -> None:
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")) as error:
        read_manifest(path)
    assert error.value.source == str(path)


def test_cluster_and_glob_arguments_are_checked(tmp_path: Path, capsys) -> None:
    assert parse_cluster("local:2") == "local:2" and parse_cluster("tcp://10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    for bad in ("local:0", "local:", "local:two", "tcp://host", "10.0.0.5:8786", "slurm"):
        with pytest.raises(ValueError, match="expected local:N"):
            parse_cluster(bad)
    with pytest.raises(SystemExit):
        main(["predict", "x.svs", "--out", str(tmp_path), "--cluster", "local:0"])
    assert "--cluster: expected local:N" in capsys.readouterr().err
    for name in ("b.svs", "a.svs", "c.png"):
        (tmp_path / name).touch()
    assert expand_globs([tmp_path / "*.svs", tmp_path / "c.png"]) == [tmp_path / "a.svs", tmp_path / "b.svs",
                                                                      tmp_path / "c.png"]
    with pytest.raises(InputError, match="matches no files"):
        expand_globs([tmp_path / "*.ndpi"])
    assert main(["predict", "--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "none.csv: manifest not found" in capsys.readouterr().err


def test_manifest_without_cluster_runs_in_this_process(tmp_path: Path, capsys) -> None:
    """No --cluster: the cohort runs here. Outputs of other settings are refused (the slide fails) unless
    --overwrite."""
    command = ["predict", "--manifest", str(manifest(tmp_path / "m.csv", f"{SAMPLE_IMAGE},{SAMPLE_MPP},sample")),
               "--out", str(tmp_path / "out"), *MODEL]
    assert main(command) == 0
    table = pq.read_table(tmp_path / "out" / "cohort.parquet").to_pylist()
    assert [(row["name"], row["status"], row["worker"]) for row in table] == [("sample", "done", "")]
    assert table[0]["nuclei"] == json.loads((tmp_path / "out" / "sample_summary.json").read_text())["nuclei"] > 100
    other = [*command, "--batch-size", "2"]
    assert main(other) == 2
    assert "sample_summary.json: holds results with other settings" in capsys.readouterr().err
    assert main([*other, "--overwrite"]) == 0
    assert pq.read_table(tmp_path / "out" / "cohort.parquet")["status"].to_pylist() == ["done"]


def test_cluster_matches_the_sequential_run_and_isolates_a_broken_slide(reference: Path, scheduler: str,
                                                                        tmp_path: Path) -> None:
    """Three inputs and a broken file through the command on 2 workers: the same outputs as the sequential
    run, the broken slide failed (exit code 2) while the rest finish; run again, finished slides are kept."""
    broken = shared_or_skip(BROKEN)
    rows = manifest(tmp_path / "cohort.csv", f"{CMU},,", f"{TCGA},{TCGA_MPP},tcga", f"{broken},,",
                    f"{SAMPLE_IMAGE},{SAMPLE_MPP},")
    out = tmp_path / "out"
    command = ["predict", "--manifest", str(rows), "--out", str(out), "--cluster", scheduler, *MODEL]
    assert main(command) == 2
    for stem, name in ((CMU.stem, CMU.stem), (TCGA.stem, "tcga"), (SAMPLE_IMAGE.stem, SAMPLE_IMAGE.stem)):
        assert_same_outputs(reference / stem, out / name)
    table = pq.read_table(out / "cohort.parquet").to_pylist()
    assert [(row["name"], row["status"]) for row in table] == [
        (CMU.stem, "done"), ("tcga", "done"), ("broken", "failed"), (SAMPLE_IMAGE.stem, "done")]
    assert "unsupported or unreadable slide format" in table[2]["error"]
    assert len({row["worker"] for row in table}) == 2  # both workers took slides
    summaries = {row["name"]: json.loads((out / f"{row['name']}_summary.json").read_text())
                 for row in table if row["status"] == "done"}
    for row in table[:2] + table[3:]:
        summary = summaries[row["name"]]
        assert row["nuclei"] == summary["nuclei"] == row["nuclei_unlabelled"] > 0
        assert (row["tissue_mm2"], row["mpp"], row["mpp_source"]) == (
            summary["tissue"]["area_mm2"], summary["mpp"], summary["mpp_source"])
        assert row["model_tag"] == "detector/shufflenet_v2_x0_5.e20_randstainna_ft12" and row["error"] is None
    assert table[1]["mpp_source"] == "manifest cohort.csv line 3"
    assert (out / "cohort.csv").read_text().count("\n") == 5

    assert main(command) == 2  # again: nothing is recomputed, the broken slide still fails
    again = pq.read_table(out / "cohort.parquet").to_pylist()
    assert [row["status"] for row in again] == ["skipped", "skipped", "failed", "skipped"]
    assert [row["nuclei"] for row in again] == [row["nuclei"] for row in table]


def kill_worker_in_first_attempt(job: Job, attempt: int, chunks_done: int) -> None:
    """``on_chunk`` hook: the worker process dies (as if killed, or out of memory) once attempt 0 has saved a
    chunk."""
    if attempt == 0:
        os._exit(1)


def stop_after_first_chunk(job: Job, attempt: int, chunks_done: int) -> None:
    raise KeyboardInterrupt


def assert_same_table(left: Path, right: Path) -> None:
    """CSV byte-identical, Parquet equal as tables (its row groups follow the chunks)."""
    assert left.with_suffix(".csv").read_bytes() == right.with_suffix(".csv").read_bytes()
    assert pq.read_table(left.with_suffix(".parquet")).equals(pq.read_table(right.with_suffix(".parquet")))


SMALL_CHUNKS = SlideSettings(batch_size=4, chunk_tiles=16)  # CMU's 83 tiles: 6 chunks
FAST = ModelSpec("fast", detector_only=True)


def test_dead_worker_slide_is_retried_from_its_chunks_to_identical_tables(reference: Path, scheduler: str,
                                                                         tmp_path: Path) -> None:
    rows = run_cohort([Job(CMU)], FAST, tmp_path, cluster=scheduler, retries=1, settings=SMALL_CHUNKS,
                      progress=False, on_chunk=kill_worker_in_first_attempt)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("done", 2)
    summary = json.loads((tmp_path / f"{CMU.stem}_summary.json").read_text())
    assert summary["tiles"]["chunks"] == 6 and summary["tiles"]["chunks_reused"] == 1
    assert_same_table(tmp_path / CMU.name, reference / CMU.name)
    assert not (tmp_path / f".{CMU.stem}.partial").exists()


def test_slide_whose_retries_are_spent_fails_and_a_rerun_resumes_it(reference: Path, scheduler: str,
                                                                   tmp_path: Path) -> None:
    rows = run_cohort([Job(CMU)], FAST, tmp_path, cluster=scheduler, retries=0, settings=SMALL_CHUNKS,
                      progress=False, on_chunk=kill_worker_in_first_attempt)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("failed", 1)
    assert "1 attempt(s), each ended by its worker's death" in rows[0]["error"]
    assert len(list(tmp_path.glob(f".{CMU.stem}.partial/chunk_*.parquet"))) == 1
    rows = run_cohort([Job(CMU)], FAST, tmp_path, cluster=scheduler, settings=SMALL_CHUNKS, progress=False)
    assert rows[0]["status"] == "done"
    assert json.loads((tmp_path / f"{CMU.stem}_summary.json").read_text())["tiles"]["chunks_reused"] == 1
    assert_same_table(tmp_path / CMU.name, reference / CMU.name)


def test_interrupted_cohort_resumes_when_run_again(reference: Path, tmp_path: Path) -> None:
    """In this process (no cluster): stopped after a chunk, the same call again resumes from it."""
    with pytest.raises(KeyboardInterrupt):
        run_cohort([Job(CMU)], FAST, tmp_path, settings=SMALL_CHUNKS, progress=False,
                   on_chunk=stop_after_first_chunk)
    rows = run_cohort([Job(CMU)], FAST, tmp_path, settings=SMALL_CHUNKS, progress=False)
    assert (rows[0]["status"], rows[0]["attempts"], rows[0]["worker"]) == ("done", 1, "")
    assert json.loads((tmp_path / f"{CMU.stem}_summary.json").read_text())["tiles"]["chunks_reused"] == 1
    assert_same_table(tmp_path / CMU.name, reference / CMU.name)
