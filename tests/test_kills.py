"""Kills: stage scripts stopped by SIGTERM or SIGKILL in the middle of their work.

Each test runs a real ``python stages/<name>.py`` in a throwaway project, slowed down by
a wrapper (tests only) so that the signal lands while the stage writes its outputs, and
checks what a user would see: the exit code and the one line, the previous outputs intact
(or absent), no temporary files left after the next run, and the stage's MLflow runs
ended KILLED, not RUNNING.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_data
from conftest import REPO_ROOT, make_class_tree
from mlflow.tracking import MlflowClient

from animalcam import resume

STAGES = REPO_ROOT / "stages"
EXPERIMENT = "kills"

# Runs a stage script as __main__ with a pause in its work loop: each item a tqdm
# progress bar yields (prepare's image checks, download's copies) or each finished
# training epoch waits DELAY seconds. Nothing of this is in the library.
SLOW_STAGE = """
import runpy, sys, time

stage, mode, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "tqdm":
    import tqdm

    iterate = tqdm.tqdm.__iter__

    def slowly(self):
        for item in iterate(self):
            time.sleep(delay)
            yield item

    tqdm.tqdm.__iter__ = slowly
elif mode == "epoch":
    from animalcam import resume_store

    epoch_end = resume_store.ResumeCallback.on_epoch_end

    def slowly(self, epoch, logs=None):
        epoch_end(self, epoch, logs)
        time.sleep(delay)

    resume_store.ResumeCallback.on_epoch_end = slowly
sys.argv = [stage]
runpy.run_path(stage, run_name="__main__")
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An empty MLflow store, made once: creating its tables takes seconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def project(root: Path, store: Path, **sections) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(store, root / "mlflow.db")
    params = {"mlflow": {"experiment": EXPERIMENT, "registered_model": "kills-model"}}
    (root / "params.yaml").write_text(json.dumps({**params, **sections}))  # JSON is YAML
    return root


def stage_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.pop("ANIMALCAM_PIPELINE_RUN_ID", None)
    env.update(
        ANIMALCAM_LOG_LEVEL="WARNING",
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
    )
    return env


def run_stage(root: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGES / f"{name}.py")],
        cwd=root,
        env=stage_env(root),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_slow_stage(root: Path, name: str, mode: str, delay: float) -> subprocess.Popen:
    args = [sys.executable, "-c", SLOW_STAGE, str(STAGES / f"{name}.py"), mode, str(delay)]
    return subprocess.Popen(
        args,
        cwd=root,
        env=stage_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            _, err = process.communicate()
            raise AssertionError(f"stage ended ({process.returncode}) too early:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the stage never reached the point to kill it at")
        time.sleep(0.05)


def kill(process: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Send ``signum`` to the stage alone (not its group); (exit code, stderr)."""
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def temps(folder: Path) -> list[str]:
    """What outputs (and download) leave beside their targets while they work."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def listing(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def runs_by_status(root: Path, stage: str) -> list[str]:
    """Statuses of ``stage``'s child runs, oldest first."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`animalcam.stage` = '{stage}'",
        order_by=["attributes.start_time ASC"],
    )
    return [run.info.status for run in runs]


def parents_status(root: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`animalcam.kind` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )
    return [run.info.status for run in runs]


def assert_one_line(err: str, expected: str) -> None:
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == expected, err[-3000:]


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory, store) -> Path:
    """data/raw with three classes and a data/prepared from a finished prepare run."""
    root = tmp_path_factory.mktemp("prepared") / "repo"
    project(root, store, prepare={"class_set": "folders", "min_side": 16})
    make_class_tree(root / "data" / "raw", per_class=12, classes=("cat", "dog", "owl"))
    done = run_stage(root, "prepare")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.fixture
def prepared_project(prepared_template, tmp_path) -> Path:
    return Path(shutil.copytree(prepared_template, tmp_path / "repo", symlinks=True))


def test_sigterm_during_prepare_keeps_the_previous_outputs(prepared_project):
    root, data = prepared_project, prepared_project / "data"
    before = listing(data / "prepared")
    (root / "data/raw/owl/extra.jpg").write_bytes((root / "data/raw/cat/img_0.jpg").read_bytes())

    stage = start_slow_stage(root, "prepare", "tqdm", 0.2)
    wait_for(lambda: any(name.startswith(".prepared.") for name in temps(data)), stage)
    code, err = kill(stage, signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert_one_line(err, "animalcam prepare: stopped by SIGTERM")
    assert listing(data / "prepared") == before
    assert temps(data) == []  # cleaned up on the way out
    assert runs_by_status(root, "prepare") == ["FINISHED", "KILLED"]
    assert parents_status(root) == ["FINISHED", "KILLED"]


def test_after_a_sigkill_the_next_run_cleans_up_and_closes_the_runs(prepared_project):
    root, data = prepared_project, prepared_project / "data"
    stage = start_slow_stage(root, "prepare", "tqdm", 0.2)
    wait_for(lambda: any(name.startswith(".prepared.") for name in temps(data)), stage)
    code, _ = kill(stage, signal.SIGKILL)

    assert code == -signal.SIGKILL
    assert len(temps(data)) == 1  # nothing could clean up after a SIGKILL
    assert runs_by_status(root, "prepare") == ["FINISHED", "RUNNING"]

    again = run_stage(root, "prepare")
    assert again.returncode == 0, again.stderr[-3000:]
    assert temps(data) == []
    assert runs_by_status(root, "prepare") == ["FINISHED", "KILLED", "FINISHED"]
    assert parents_status(root) == ["FINISHED", "KILLED", "FINISHED"]
    assert "left RUNNING by process" in again.stderr


def test_sigterm_during_download_keeps_data_raw(tmp_path, store):
    source = tmp_path / "animals"
    make_class_tree(source / "raw-img", per_class=8, classes=("cane", "gatto", "ragno"))
    root = project(tmp_path / "repo", store, data={"source": str(source)})
    first = run_stage(root, "download")
    assert first.returncode == 0, first.stderr[-3000:]
    data = root / "data"
    before = listing(data / "raw")
    (source / "raw-img/cane/new.jpg").write_bytes((source / "raw-img/cane/img_0.jpg").read_bytes())

    stage = start_slow_stage(root, "download", "tqdm", 0.2)
    wait_for(lambda: any(name.startswith(".raw.") for name in temps(data)), stage)
    code, err = kill(stage, signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert_one_line(err, "animalcam download: stopped by SIGTERM")
    assert listing(data / "raw") == before
    assert temps(data) == []
    assert runs_by_status(root, "download") == ["FINISHED", "KILLED"]


def test_sigterm_during_training_keeps_the_resume_state(tmp_path, store):
    root = project(
        tmp_path / "repo",
        store,
        train={
            "weights": "none",
            "image_size": 32,
            "batch_size": 4,
            "dense_units": 8,
            "epochs": 6,
            "input": "files",
            "trainable": "head",  # small weights files: quick epochs and saves
        },
    )
    tiny_data.write_prepared(root, train_per_class=2, val_per_class=1)
    state = root / ".train_state" / resume.STATE_FILE

    stage = start_slow_stage(root, "train", "epoch", 1.0)
    wait_for(state.is_file, stage, timeout=90)
    code, err = kill(stage, signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert_one_line(err, "animalcam train: stopped by SIGTERM")
    assert not (root / "models").exists()  # no model, no half-written one
    saved = json.loads(state.read_text())
    assert saved["epochs_done"] >= 1  # the next run resumes from here
    assert temps(state.parent) == []
    assert runs_by_status(root, "train") == ["KILLED"]
    assert parents_status(root) == ["KILLED"]


UNWIND = """
import os, signal, time
from animalcam.stage import run_stage

def main():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: the clean-up still finishes
        time.sleep(0.2)
        print("cleaned up", flush=True)

run_stage(main, "demo")
"""


def test_sigterm_unwinds_the_stage_like_ctrl_c():
    done = subprocess.run(
        [sys.executable, "-c", UNWIND], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stdout == "cleaned up\n"
    assert done.stderr == "animalcam demo: stopped by SIGTERM\n"
