"""A team's tracking set-up, for real: PostgreSQL, an `mlflow server` on it, and two
experiments queued with `dvc queue start -j 2` recording into it at once.

README's "Team tracking" section is what this test does by hand. The database password
lives in a pgpass file only; the test checks that it shows up in no output, log, file or
run record.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from postgres_server import postgres_server
from test_queue import pipeline_runs, run_queue, stage_children, tiny_project
from test_serving import free_port, local_server, subprocess_env

from animalcam import run_grouping


@pytest.fixture
def team_server(tmp_path):
    """(tracking URL, the database's password, files a leak could hide in)."""
    with postgres_server(free_port()) as database:
        root = tmp_path / "server"
        root.mkdir()
        args = [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", database.uri),
            *("--artifacts-destination", str(root / "artifacts")),
        ]
        env = {
            **subprocess_env(""),
            **database.client_env,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        with local_server(args, env, "/health", root / "server.log") as url:
            yield url, database.password, root


def test_two_queued_experiments_record_into_a_postgresql_backed_server(tmp_path, team_server):
    url, password, server_root = team_server
    project = tiny_project(tmp_path, url, "images")
    experiments = {
        "lr-high": ["-S", "train.learning_rate=0.01"],
        "lr-low": ["-S", "train.learning_rate=0.003"],
    }
    run_queue(project, experiments, "evaluate")

    client, parents = pipeline_runs(url)
    assert set(experiments) <= set(parents), sorted(parents)
    train_runs = {}
    for name in experiments:
        parent = parents[name]
        assert parent.info.status == "FINISHED"
        assert float(parent.data.params["train.learning_rate"]) in (0.01, 0.003)
        by_stage = stage_children(client, parent)
        assert {"train", "evaluate"} <= set(by_stage), by_stage.keys()
        assert all(len(runs) == 1 for runs in by_stage.values())
        assert all(r.info.status == "FINISHED" for runs in by_stage.values() for r in runs)
        train_runs[name] = by_stage["train"][0].info.run_id
        evaluate = by_stage["evaluate"][0]
        assert evaluate.data.tags[run_grouping.MODEL_RUN_TAG] == train_runs[name]
        assert "accuracy" in evaluate.data.metrics
        # Artifacts went through the server into its artifact root.
        logged = {a.path for a in client.list_artifacts(evaluate.info.run_id, "plots/evaluate")}
        assert "plots/evaluate/predictions.csv" in logged
    versions = client.search_model_versions("name='animalcam-classifier'")
    assert sorted(v.run_id for v in versions) == sorted(train_runs.values())

    # The password: in no output, log, file or record.
    texts = [project.run("dvc", "queue", "logs", name, check=False).stdout for name in experiments]
    texts.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
    for run in client.search_runs([parents[name].info.experiment_id for name in experiments]):
        texts += [str(run.data.params), str(run.data.tags)]
    assert not any(password in text for text in texts)
    for folder in (project.root, server_root):
        leaks = [p for p in folder.rglob("*") if p.is_file() and _holds(p, password)]
        assert leaks == []


def _holds(path: Path, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False
