"""benchmarks/common.py: every benchmark result records how it was made (command, commit, date, models)."""

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from denuc import hub

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_result_records_command_commit_date_and_each_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(common.REPOSITORY / "benchmarks" / "bench_x.py"), "--note", "a b"])
    out = tmp_path / "study" / "x.json"
    common.write_result(out, {"f1": 0.5}, models=["fast", "default", "fast"], kind="bundle")

    result = json.loads(out.read_text())
    assert result["f1"] == 0.5
    made = result["provenance"]
    assert made["command"] == "python benchmarks/bench_x.py --note 'a b'"
    assert made["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", made["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", made["date"])
    # "default" run as a Pipeline is the default bundle; a model named twice is described once
    assert [m["name"] for m in made["models"]] == ["fast", "default"]
    assert [m["tag"] for m in made["models"]] == [hub.shipped("fast").tag, hub.shipped("default-bundle").tag]
    assert [m["sha256"] for m in made["models"]] == [sha256(hub.resolve("fast")),
                                                     sha256(hub.resolve("default", kind="bundle"))]


def test_a_checkout_is_dirty_by_its_code_not_by_its_results(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    assert common.git_state(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"f1": 1}')  # an earlier run's output
    (tmp_path / "benchmarks" / "results" / "b.json").write_text("{}")
    assert common.git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    state = common.git_state(tmp_path)
    assert state["dirty"] is True and len(state["commit"]) == 40


def test_a_weights_file_the_hub_cannot_describe_keeps_its_sha256(tmp_path):
    checkpoint = tmp_path / "joint.safetensors"  # e.g. a joint baseline's checkpoint: no detector or bundle
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(checkpoint), metadata={"format": "denuc-joint"})
    described = common.describe_model(checkpoint)
    assert described["sha256"] == sha256(checkpoint)
    assert "not a denuc detector or bundle" in described["error"]
