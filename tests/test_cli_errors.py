"""The command line under bad input and faults: one clear line and a non-zero exit, never a traceback; an earlier
run's outputs never replaced silently; a full disk named, with the resumable state kept and the next input run."""

from __future__ import annotations

import errno
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_IMAGE, SAMPLE_POINTS, SHARED
from PIL import Image

from denuc.cli import main
from denuc.config import DetectorConfig
from denuc.inference.detect import Detector
from denuc.models.detector import PointDetector

BROKEN_SLIDE = SHARED / "slides" / "broken.svs"

torch.set_num_threads(1)  # the suite shares two cores; more threads only contend


def run_cli(argv: list, capsys) -> tuple[int, str]:
    """``denuc ARGV`` in this process: the exit status and stderr (an uncaught exception fails the test)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs: a tiny untrained detector (fast; finds about 1% of anchors), two different images of the same
    name in two folders and a third, a corrupt image, a file, folders, and a points file."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    Detector(PointDetector(DetectorConfig(head_stride=4, score_threshold=0.53))).save(root / "tiny.safetensors")
    sample = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    for folder, pixels in (("a", sample), ("b", sample[::-1])):
        (root / folder).mkdir()
        Image.fromarray(pixels).save(root / folder / "img.png")
    Image.fromarray(sample[:, ::-1]).save(root / "other.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    (root / "a_file").write_text("not a folder")
    (root / "no_slides").mkdir()
    (root / "folder.safetensors").mkdir()
    (root / "brcam2c").mkdir()  # a BRCA-M2C copy's split list: points, no outlines
    (root / "brcam2c" / "brca_ds_train.txt").write_text("img.png\n")
    return {"model": root / "tiny.safetensors", "a": root / "a" / "img.png", "b": root / "b" / "img.png",
            "other": root / "other.png", "corrupt": root / "corrupt.png", "file": root / "a_file",
            "empty": root / "no_slides", "folder": root / "folder.safetensors", "points": SAMPLE_POINTS, "root": root,
            "brcam2c": root / "brcam2c"}


def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """``folder`` as a tmpfs mounted with ``options`` while the test runs; the test is skipped where mounting
    is not permitted (it needs root)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "ro", "ro,size=64k")


def predict(f: dict, *inputs, out: str = "out") -> list:
    return ["predict", *inputs, "--out", f["root"] / out, "--model", f["model"], "--runtime", "torch", "--quiet"]


# (what, argv from the files, what stderr must say)
USER_ERRORS: list[tuple[str, Callable[[dict], list], str]] = [
    ("no command", lambda f: [], "required: COMMAND"),
    ("unknown command", lambda f: ["frobnicate"], "invalid choice"),
    ("predict --batch-size 0", lambda f: predict(f, f["a"]) + ["--batch-size", "0"], "argument --batch-size"),
    ("predict --workers -1", lambda f: predict(f, f["a"]) + ["--workers", "-1"], "argument --workers"),
    ("predict --mpp 0", lambda f: predict(f, f["a"]) + ["--mpp", "0"], "argument --mpp: must be a number > 0"),
    ("predict --mpp nan", lambda f: predict(f, f["a"]) + ["--mpp", "nan"], "argument --mpp"),
    ("predict --device gpu", lambda f: predict(f, f["a"]) + ["--device", "gpu"], "the devices here: cpu"),
    ("predict --tta 3", lambda f: predict(f, f["a"]) + ["--tta", "3"], "argument --tta"),
    ("predict --resume --overwrite", lambda f: predict(f, f["a"]) + ["--resume", "--overwrite"],
     "not allowed with argument"),
    ("predict without inputs", lambda f: predict(f), "error: no slides given"),
    ("predict --cluster without inputs", lambda f: predict(f) + ["--cluster", "local:1"], "error: no slides given"),
    ("predict --outlines --cluster", lambda f: predict(f, f["a"]) + ["--cluster", "local:1", "--outlines"],
     "--outlines: not supported with --manifest or --cluster"),
    ("predict --detector --detector-only", lambda f: predict(f, f["a"]) + ["--detector", "precise", "--detector-only"],
     "--detector: replaces a bundle's detector"),
    ("predict --detector with a detector model",
     lambda f: predict(f, f["a"], "--mpp", "0.5") + ["--detector", "precise"], "this model has no classifier"),
    ("predict --threshold 2", lambda f: predict(f, f["a"]) + ["--threshold", "2"],
     "argument --threshold: must be a number in [0, 1]"),
    ("predict --threshold --cluster", lambda f: predict(f, f["a"]) + ["--cluster", "local:1", "--threshold", "0.2"],
     "--threshold: not supported with --manifest or --cluster"),
    ("predict --normalise-stain --cluster",
     lambda f: predict(f, f["a"]) + ["--cluster", "local:1", "--normalise-stain"],
     "--normalise-stain: not supported with --manifest or --cluster"),
    ("predict --normalise-stain a missing reference",
     lambda f: predict(f, f["a"], "--mpp", "0.5") + ["--normalise-stain", f["root"] / "missing.png"], "missing.png"),
    ("predict --keep-rejected with a detector model",
     lambda f: predict(f, f["a"], "--mpp", "0.5") + ["--keep-rejected"], "this model has no classifier"),
    ("predict --out an existing file", lambda f: ["predict", f["a"], "--out", f["file"]], "is a file; --out takes"),
    ("predict --out under a file", lambda f: ["predict", f["a"], "--out", f["file"] / "out"], "is a file, so"),
    ("predict a missing file", lambda f: predict(f, f["root"] / "missing.svs", "--mpp", "0.5"), "file not found"),
    ("predict a corrupt image", lambda f: predict(f, f["corrupt"], "--mpp", "0.5"), "corrupt.png"),
    ("predict a folder without slides", lambda f: predict(f, f["empty"]), "folder holds no slides"),
    ("predict a plain image without --mpp", lambda f: predict(f, f["a"]), "pixel size"),
    ("predict an unknown model", lambda f: ["predict", f["a"], "--out", f["root"] / "x", "--model", "nope"],
     "no such model file or shipped model name"),
    ("detect --batch-size 0", lambda f: ["detect", f["a"], "--out", f["root"] / "d", "--batch-size", "0"],
     "argument --batch-size"),
    ("detect --threshold 2", lambda f: ["detect", f["a"], "--out", f["root"] / "d", "--threshold", "2"],
     "argument --threshold: must be a number in [0, 1]"),
    ("detect --mpp 0", lambda f: ["detect", f["a"], "--out", f["root"] / "d", "--mpp", "0"], "argument --mpp"),
    ("detect --device gpu", lambda f: ["detect", f["a"], "--out", f["root"] / "d", "--device", "gpu"],
     "argument --device"),
    ("detect without inputs", lambda f: ["detect", "--out", f["root"] / "d"], "error: no images given"),
    ("detect without --mpp", lambda f: ["detect", f["a"], "--out", f["root"] / "d"], "pixel size unknown"),
    ("detect --out an existing file", lambda f: ["detect", f["a"], "--mpp", "0.5", "--out", f["file"]], "is a file"),
    ("detect a corrupt image", lambda f: ["detect", f["corrupt"], "--mpp", "0.5", "--out", f["root"] / "d",
                                          "--model", f["model"], "--runtime", "torch"], "cannot read image"),
    ("evaluate --out a folder", lambda f: ["evaluate", "--pred", f["points"], "--gt", f["points"], "--mpp", "0.5",
                                          "--out", f["root"]], "is a folder; --out takes a file name"),
    ("evaluate --out an existing file", lambda f: ["evaluate", "--pred", f["points"], "--gt", f["points"], "--mpp",
                                                   "0.5", "--out", f["file"]], "pass --overwrite"),
    ("evaluate --radius-um 0", lambda f: ["evaluate", "--pred", f["points"], "--gt", f["points"], "--radius-um", "0"],
     "argument --radius-um"),
    ("evaluate --bootstrap -1", lambda f: ["evaluate", "--pred", f["points"], "--gt", f["points"], "--bootstrap",
                                           "-1"], "argument --bootstrap"),
    ("evaluate missing ground truth", lambda f: ["evaluate", "--pred", f["points"], "--gt", f["root"] / "missing"],
     "no such file or folder"),
    ("models of an unknown name", lambda f: ["models", "nope"], "no such model file"),
    ("export-backbone --out a folder", lambda f: ["export-backbone", f["model"], "--out", f["folder"]],
     "is a folder; --out takes a file name"),
    ("export-backbone --out not .safetensors", lambda f: ["export-backbone", f["model"], "--out", f["root"] / "b.pt"],
     "the output must be a .safetensors file"),
    ("export-backbone --out an existing file", lambda f: ["export-backbone", f["model"], "--out", f["model"]],
     "pass --overwrite"),
    ("export-backbone of an unknown model", lambda f: ["export-backbone", "nope", "--out", f["root"] / "x.safetensors"],
     "no such model file"),
    ("tune-offsets --out an existing file", lambda f: ["tune-offsets", "default-bundle", "--dataset", "x=/nowhere",
                                                       "--out", f["file"]], "pass --overwrite"),
    ("tune-offsets a malformed --dataset", lambda f: ["tune-offsets", "default-bundle", "--dataset", "x",
                                                      "--out", f["root"] / "t.safetensors"], "--dataset"),
    ("train-outlines a dataset without outlines", lambda f: ["train-outlines", "--dataset", f"brcam2c={f['brcam2c']}",
                                                               "--run-dir", f["root"] / "outlines"],
     "brcam2c has no instance outlines"),
]
if not torch.cuda.is_available():
    USER_ERRORS.append(("predict --device cuda without a GPU", lambda f: predict(f, f["a"]) + ["--device", "cuda"],
                        "argument --device: 'cuda' is not available on this machine; the devices here: cpu"))
if BROKEN_SLIDE.exists():
    USER_ERRORS.append(("predict a broken slide", lambda f: predict(f, BROKEN_SLIDE), "unreadable slide format"))


@pytest.mark.parametrize("argv, expected", [case[1:] for case in USER_ERRORS], ids=[case[0] for case in USER_ERRORS])
def test_user_error_is_one_clear_line(files: dict, capsys, argv: Callable[[dict], list], expected: str) -> None:
    code, err = run_cli(argv(files), capsys)
    assert code not in (0, None) and "Traceback" not in err
    assert expected in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "error: denuc" not in lines[0], err  # not "denuc predict: error: denuc predict: ..."


def test_read_only_out_is_refused_before_any_work(files: dict, read_only_folder: Path, capsys) -> None:
    for argv in (predict(files, files["a"], "--mpp", "0.5", out=read_only_folder / "out"),
                 ["evaluate", "--pred", files["points"], "--gt", files["points"], "--mpp", "0.5",
                  "--out", read_only_folder / "report.json"],
                 ["export-backbone", files["model"], "--out", read_only_folder / "b.safetensors"]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and "Traceback" not in err
        assert f"{read_only_folder}" in err and "read-only file system" in err, err


def test_faults_and_interrupts_reaching_main_are_one_line(monkeypatch, capsys) -> None:
    import denuc.cli.models

    def raising(error: BaseException) -> Callable:
        def run(args) -> int:
            raise error
        return run

    monkeypatch.setattr(denuc.cli.models, "run", raising(PermissionError(errno.EACCES, "Permission denied", "/x/y")))
    assert run_cli(["models"], capsys) == (1, "denuc models: error: /x/y: Permission denied\n")
    monkeypatch.setattr(denuc.cli.models, "run", raising(KeyboardInterrupt()))
    assert run_cli(["models"], capsys) == (130, "denuc models: interrupted\n")


def test_user_error_prints_no_traceback_from_the_command(files: dict, tmp_path: Path) -> None:
    """The real entry point, in a fresh process: what a user sees (one run: starting one costs seconds)."""
    argv = predict(files, files["corrupt"], "--mpp", "0.5", out=tmp_path)
    done = subprocess.run([sys.executable, "-m", "denuc.cli", *map(str, argv)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"denuc predict: error: {files['corrupt']}: cannot read image"), done.stderr


def test_top_level_help_is_a_users_overview(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert "Find the nuclei" in out and "documentation:" in out and "denuc predict --sample" in out
    commands = out.split("commands:")[1].split("examples:")[0]
    assert commands.index("predict") < commands.index("train-detector")  # using the models comes first
    assert "sub-command per module" not in out


# --- existing outputs: refused unless --overwrite; --resume continues ------------------------------------------


def test_predict_refuses_another_inputs_outputs_and_keeps_its_own(files: dict, capsys) -> None:
    first = predict(files, files["a"], "--mpp", "0.5", out="same")
    assert run_cli(first, capsys)[0] == 0
    summary = files["root"] / "same" / "img_summary.json"
    kept = summary.read_bytes()

    code, err = run_cli(predict(files, files["b"], "--mpp", "0.5", out="same"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{summary}: holds the results of another input, {files['a']}" in err and "--overwrite" in err
    assert summary.read_bytes() == kept  # a's results untouched

    assert run_cli(first[:-1], capsys)[0] == 0  # the same input, model and settings again: kept, not recomputed
    assert summary.read_bytes() == kept
    code, err = run_cli(predict(files, files["a"], "--mpp", "0.5", "--batch-size", "4", out="same"), capsys)
    assert code == 2 and "results with other settings or another model" in err

    assert run_cli(predict(files, files["b"], "--mpp", "0.5", "--overwrite", out="same"), capsys)[0] == 0
    assert json.loads(summary.read_text())["slide"]["path"] == str(files["b"])


def test_detect_refuses_existing_outputs_unless_overwrite(files: dict, capsys) -> None:
    argv = ["detect", files["a"], "--mpp", "0.5", "--out", files["root"] / "det", "--model", files["model"],
            "--runtime", "torch"]
    assert run_cli(argv, capsys)[0] == 0
    csv = files["root"] / "det" / "img.csv"
    code, err = run_cli(argv[:1] + [files["b"]] + argv[2:], capsys)
    assert code == 2 and f"{csv}: exists" in err and "--overwrite" in err
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0


def test_rerun_without_resume_keeps_saved_chunks(files: dict, monkeypatch, capsys) -> None:
    """Ctrl-C in `predict` (here in this process): the resume command and status 130; a rerun without --resume is
    refused rather than discarding the saved chunks; the printed command finishes the run."""
    import denuc.inference.slide as engine

    write_shard, saved = engine.write_shard, []

    def interrupt_after_one(*args, **kwargs) -> None:
        if saved:
            raise KeyboardInterrupt
        write_shard(*args, **kwargs)
        saved.append(args[0])

    argv = predict(files, files["a"], files["other"], "--mpp", "0.5", "--chunk-tiles", "1", out="cut")
    monkeypatch.setattr(engine, "write_shard", interrupt_after_one)
    code, err = run_cli(argv, capsys)
    monkeypatch.undo()
    partial = files["root"] / "cut" / ".img.partial"
    assert code == 130 and "Traceback" not in err
    assert f"interrupted while processing {files['a']}: 1 of its" in err and f"saved in {partial}" in err
    assert f"not done: {files['a']}, {files['other']}" in err
    resume = err.splitlines()[-1].split("denuc predict: to continue: ")[1]
    assert saved and saved[0].parent == partial and not list(partial.parent.glob("img*"))

    code, err = run_cli(argv, capsys)
    assert code == 2 and f"{partial}: holds 1 of" in err and "pass --resume to continue it" in err
    assert saved[0].is_file()
    assert resume == shlex.join(["denuc", *map(str, argv), "--resume"])
    assert run_cli(shlex.split(resume)[1:], capsys)[0] == 0
    summary = json.loads((partial.parent / "img_summary.json").read_text())
    assert summary["tiles"]["chunks_reused"] == 1 and not partial.exists()
    assert (partial.parent / "other_summary.json").is_file()


# --- a full disk --------------------------------------------------------------------------------------------


def test_disk_full_names_the_file_keeps_the_chunks_and_runs_the_next_input(files: dict, monkeypatch,
                                                                          capsys) -> None:
    """ENOSPC while writing the first input's Parquet table (simulated): one line naming it, with the space
    free and needed; nothing of it that looks complete; its chunks kept; the second input done; status 2."""
    first, second = files["root"] / "full" / "first.png", files["root"] / "full" / "second.png"
    first.parent.mkdir()
    first.write_bytes(files["a"].read_bytes())
    second.write_bytes(files["b"].read_bytes())
    write_table = pq.ParquetWriter.write_table

    def disk_full_for_first(self, *args, **kwargs) -> None:
        if Path(self.where).name.startswith(".first.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write_table(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full_for_first)
    out = files["root"] / "full_out"
    argv = predict(files, first, second, "--mpp", "0.5", out="full_out")
    code, err = run_cli(argv, capsys)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if ": error: " in line)
    assert line.startswith(f"denuc predict: error: {out / 'first.parquet'}: no space left on the device")
    assert " free; the outputs need about " in line
    assert f"1 of 2 inputs not done: {first}; the chunks saved for 1 of them are kept: add --resume" in err
    assert not list(out.glob("first*")), "nothing of the first input may look complete"
    partial = out / ".first.partial"
    assert list(partial.glob("chunk_*.parquet")) and not list(partial.glob("first*")), "chunks kept, no staged outputs"
    assert json.loads((out / "second_summary.json").read_text())["nuclei"] > 0

    assert run_cli(argv + ["--resume"], capsys)[0] == 0
    assert json.loads((out / "first_summary.json").read_text())["tiles"]["chunks_reused"] >= 1


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from mounted_tmpfs(tmp_path / "small", "size=300k")


def test_real_full_disk(files: dict, small_disk: Path, capsys) -> None:
    """The same on a file system that really fills up (the outputs need about three times its size): whichever
    file it hits is named, and nothing looks complete."""
    code, err = run_cli(predict(files, files["a"], "--mpp", "0.5", out=small_disk / "out"), capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{small_disk / 'out'}/" in err and "no space left on the device while writing this file" in err, err
    assert not list((small_disk / "out").glob("img*")), "its outputs need more than the disk holds"


def test_embeddings_on_a_full_disk_are_an_error_naming_the_file(small_disk: Path) -> None:
    """Not a crash: written through a memory map, they would end the process with SIGBUS."""
    from denuc.errors import DiskFullError
    from denuc.io.tables import EmbeddingWriter

    with pytest.raises(DiskFullError, match="e.npy: no space left"), EmbeddingWriter(small_disk / "e.npy", 1000,
                                                                                    1000) as writer:
        writer.write(np.arange(1000), np.ones((1000, 1000)))
    assert not list(small_disk.iterdir())
