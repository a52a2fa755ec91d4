"""A damaged or foreign embedded MLflow store (mlflow.db), and runs left RUNNING by a
process that was killed outright: one line before any work, the file untouched; stale
runs closed by the next stage, live ones never."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from animalcam import abandoned_runs, tracking_store
from animalcam.errors import TrackingError

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = {"capture_output": True, "text": True, "check": True}


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> bytes:
    """The bytes of a small, healthy MLflow store."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    experiment = client.create_experiment("runs")
    for _ in range(20):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "accuracy", 0.5)
        client.set_terminated(run.info.run_id)
    return path.read_bytes()


def foreign_database(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
        connection.execute("INSERT INTO invoices VALUES (1, 9.5)")
    connection.close()


DAMAGED = {
    "random bytes": lambda path, store: path.write_bytes(os.urandom(4096)),
    "text": lambda path, store: path.write_text("not a database\n"),
    "truncated": lambda path, store: path.write_bytes(store[: len(store) // 2]),
    "header only": lambda path, store: path.write_bytes(store[:100]),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_store_is_one_line_and_left_alone(kind, tmp_path, real_store):
    path = tmp_path / "mlflow.db"
    DAMAGED[kind](path, real_store)
    before = path.read_bytes()

    with pytest.raises(TrackingError) as caught:
        tracking_store.check_tracking_server(f"sqlite:///{path}")

    message = str(caught.value)
    assert "\n" not in message
    assert f"MLflow store {path} is not a usable SQLite database" in message
    assert f"mv {path} {path}.damaged" in message and "MLFLOW_TRACKING_URI" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no journal made


def test_another_programs_database_is_not_touched(tmp_path):
    path = tmp_path / "mlflow.db"
    foreign_database(path)
    before = path.read_bytes()

    with pytest.raises(TrackingError, match="is a SQLite database but not an MLflow store"):
        tracking_store.check_tracking_server(f"sqlite:///{path}")
    assert path.read_bytes() == before


def test_folder_in_place_of_the_store_is_reported(tmp_path):
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(TrackingError, match="is not a regular file"):
        tracking_store.check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.parametrize("content", ["healthy", "empty", "absent"])
def test_usable_stores_pass(content, tmp_path, real_store):
    path = tmp_path / "mlflow.db"
    if content == "healthy":
        path.write_bytes(real_store)
    elif content == "empty":
        path.touch()
    assert tracking_store.check_tracking_server(f"sqlite:///{path}") == f"sqlite:///{path}"


def test_stage_stops_before_any_work_on_a_damaged_store(tmp_path):
    (tmp_path / "params.yaml").write_text(json.dumps({"prepare": {"min_side": 16}}))
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"SQLite format 3\x00" + os.urandom(2000))
    before = store.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}

    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py")],
        cwd=tmp_path,
        env=env,  # the default store: mlflow.db in the working directory
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"animalcam prepare: error: MLflow store {store} is not a usable")
    assert store.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "params.yaml"]


# --- Runs left RUNNING ------------------------------------------------------------------


def test_runs_of_a_dead_process_are_closed_and_live_ones_kept(tmp_path, real_store):
    path = tmp_path / "mlflow.db"
    path.write_bytes(real_store)
    client = MlflowClient(f"sqlite:///{path}")
    experiment = client.get_experiment_by_name("runs").experiment_id
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **TEXT)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = abandoned_runs.process_tags()
        alive.update(
            {abandoned_runs.PID_TAG: str(sleeper.pid), abandoned_runs.PID_STARTED_TAG: "0"}
        )
        dead = {**alive, abandoned_runs.PID_TAG: gone.stdout.strip()}
        other_host = {**dead, abandoned_runs.HOST_TAG: "another-host"}
        runs = {
            name: client.create_run(experiment, tags=tags).info.run_id
            for name, tags in {
                "dead": dead,
                "live": alive,  # pid reused by a Python process: maybe ours, kept
                "this process": abandoned_runs.process_tags(),
                "other host": other_host,
                "untagged": {},
            }.items()
        }

        closed = abandoned_runs.close_abandoned_runs(client, experiment)
    finally:
        sleeper.kill()
        sleeper.wait()

    assert closed == [runs["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {
        "dead": "KILLED",
        "live": "RUNNING",
        "this process": "RUNNING",
        "other host": "RUNNING",
        "untagged": "RUNNING",
    }
