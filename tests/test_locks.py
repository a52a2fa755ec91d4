"""The pinned environments: lock files generated from pyproject.toml, installed by the
README's set-up, and recorded with every MLflow run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from animalcam import provenance

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1).lower())] = match.group(2)
    return found


@pytest.mark.parametrize("name", ["linux-cpu", "linux-gpu"])
def test_each_lock_pins_every_direct_dependency_exactly(name):
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    locked = pins(REPO_ROOT / provenance.LOCK_FILES[name])
    direct = {"tensorflow", "keras", "dvc", "mlflow", "scikit-learn", "cleanlab", "pytest"}
    direct |= {"opencv-python-headless", "kaggle", "psycopg", "onnxruntime", "tf2onnx"}
    for package in direct:
        assert package in pyproject.lower().replace("_", "-")
        assert package in locked, f"{package} not pinned in {name}"
    text = (REPO_ROOT / provenance.LOCK_FILES[name]).read_text()
    assert "bash requirements/lock.sh" in text.splitlines()[1]  # how to refresh it
    gpu = any(p.startswith("nvidia-cudnn") for p in locked)
    assert gpu == (name == "linux-gpu")


def test_the_cpu_and_gpu_locks_agree_on_the_shared_packages():
    cpu = pins(REPO_ROOT / "requirements/linux-cpu.txt")
    gpu = pins(REPO_ROOT / "requirements/linux-gpu.txt")
    assert {k: v for k, v in gpu.items() if k in cpu} == cpu


def test_runs_record_the_lock_and_whether_this_environment_is_it(tmp_path):
    """A run's tags name the lock files' hashes and the one installed, or how far this
    environment strays from it. CI installs the CPU lock and says so
    (ANIMALCAM_EXPECT_LOCK); on the newest versions the test holds too."""
    for relative in provenance.LOCK_FILES.values():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / relative, tmp_path / relative)
    tags = provenance.lock_state(tmp_path)
    cpu = (REPO_ROOT / "requirements/linux-cpu.txt").read_bytes()
    assert tags["lock.linux-cpu.sha256"] == hashlib.sha256(cpu).hexdigest()
    strays = [
        name
        for name, version in pins(tmp_path / "requirements/linux-cpu.txt").items()
        if provenance._first_version([name]) != version
    ]
    if not strays:
        assert tags["lock.installed"] == "linux-cpu"
    expected = os.environ.get("ANIMALCAM_EXPECT_LOCK")
    if expected:
        assert tags["lock.installed"] == expected, tags["lock.installed"]

    lock = tmp_path / "requirements/linux-cpu.txt"
    lock.write_text(lock.read_text().replace("\nkeras==", "\nkeras==0.0.1\n# was keras=="))
    (tmp_path / "requirements/linux-gpu.txt").unlink()
    tags = provenance.lock_state(tmp_path)
    assert tags["lock.installed"].startswith("none: 1 package(s) differ from linux-cpu (keras")
    assert provenance.lock_state(tmp_path / "elsewhere") == {
        "lock.installed": "no lock file in the workspace"
    }


def test_ci_checks_the_locked_set_and_cannot_skip_postgresql():
    ci = (REPO_ROOT / ".ci/run").read_text()
    assert "export ANIMALCAM_EXPECT_LOCK=linux-cpu" in ci
    assert "export ANIMALCAM_REQUIRE_POSTGRES=1" in ci
