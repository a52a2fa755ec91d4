"""Experiments queued with `dvc exp run --queue` and run two at a time with
`dvc queue start -j 2`: each gets its own MLflow pipeline run with complete children and
its own headline metrics, against a real `mlflow server` and against the embedded store."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import make_class_tree
from dvc_project import DvcProject
from mlflow.tracking import MlflowClient
from test_serving import subprocess_env
from test_tracking import local_server

from animalcam import run_grouping, tracking

# The tiniest pipeline that still trains, evaluates and explains.
TINY = {
    "prepare": {"class_set": "folders", "min_side": 16, "min_per_class": 4},
    "train": {
        "weights": "none",
        "image_size": 32,
        "epochs": 1,
        "warmup_epochs": 0,
        "batch_size": 8,
        "dense_units": 8,
        "top_k": 2,
    },
    "evaluate": {"top_k": 2, "gallery_size": 2},
    "explain": {"n_correct": 1, "n_incorrect": 1},
    # A tiny net after a few steps has near-tied outputs that int8 (and float16) may
    # flip: the parity bars are tested on a trained tiny model in test_export.py.
    "export": {
        "representative_images": 16,
        "min_agreement": 0.0,
        "int8_min_agreement": 0.0,
        "int8_max_accuracy_drop": 1.0,
    },
    "speed": {"evaluate_batch_size": 8, "explain_batch_size": 2},
}
QUEUE_TIMEOUT_S = 300


def tiny_project(tmp_path, tracking_uri: str | None, *baseline: str) -> DvcProject:
    """A project on a 3-class folder of 6 images each, committed; with ``baseline``
    targets, those stages run first (``dvc repro``) and dvc.lock is committed too, so
    that experiments share them."""
    source = tmp_path / "source"
    make_class_tree(source, per_class=6, classes=("cat", "dog", "fox"), size=(40, 36))
    project = DvcProject.create(tmp_path / "repo")
    project.set_params(data={"source": str(source)}, **TINY)
    if tracking_uri:
        project.env["MLFLOW_TRACKING_URI"] = tracking_uri
    else:  # the embedded default, sqlite:///mlflow.db at the repository root
        project.env.pop("MLFLOW_TRACKING_URI")
    if baseline:
        project.repro(*baseline)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny baseline")
    return project


def run_queue(project: DvcProject, experiments: dict[str, list[str]], *targets: str) -> None:
    """Queue ``{name: ["-S", "k=v", ...]}``, run them with two workers, wait until done."""
    for name, settings in experiments.items():
        project.run("dvc", "exp", "run", "--queue", "-n", name, *settings, *targets)
    project.run("dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            status = project.run("dvc", "queue", "status").stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            time.sleep(2)
        else:
            pytest.fail(f"queue not done after {QUEUE_TIMEOUT_S} s:\n{status}")
    finally:
        project.run("dvc", "queue", "stop", "--kill", check=False)
    if "Failed" in status or not all(name in status for name in experiments):
        logs = [
            project.run("dvc", "queue", "logs", name, check=False).stdout for name in experiments
        ]
        pytest.fail(status + "\n".join(logs))


def experiment_results(project: DvcProject) -> dict[str, dict]:
    """``{experiment name: {"params": flat params, "metrics": {file: values}}}``."""
    shown = json.loads(project.run("dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                data = revision.get("data") or {}
                if revision.get("name"):
                    found[revision["name"]] = {
                        "params": data["params"]["params.yaml"]["data"],
                        "metrics": {k: v["data"] for k, v in (data.get("metrics") or {}).items()},
                    }
    return found


def pipeline_runs(uri: str, experiment: str = "animalcam") -> tuple[MlflowClient, dict]:
    """The pipeline (parent) runs of ``experiment``, by DVC experiment name (or run id)."""
    client = MlflowClient(uri)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        f"tags.`{run_grouping.KIND_TAG}` = 'pipeline'",
    )
    return client, {run.data.tags.get("dvc.exp_name", run.info.run_id): run for run in found}


def stage_children(client: MlflowClient, parent) -> dict[str, list]:
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags[tracking.STAGE_TAG], []).append(run)
    return by_stage


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    args = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{root / 'server.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    env = {**subprocess_env(""), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with local_server(args, env, "/health", root / "server.log") as url:
        yield url


def test_two_queued_experiments_against_a_server_keep_their_own_runs(tmp_path, mlflow_server):
    """One experiment retrains (prepare and cache shared with the baseline), the other
    changes explain.* only (the baseline's model shared from the cache): each gets its own
    pipeline run, and the baseline's run keeps its metrics."""
    project = tiny_project(tmp_path, mlflow_server, "report")  # the whole pipeline
    client, parents = pipeline_runs(mlflow_server)
    (baseline,) = parents.values()
    baseline_train = stage_children(client, baseline)["train"][0].info.run_id
    experiments = {
        "retrain": ["-S", "train.learning_rate=0.01"],
        "alpha": ["-S", "explain.alpha=0.7"],
    }
    run_queue(project, experiments)

    results = experiment_results(project)
    client, parents = pipeline_runs(mlflow_server)
    assert set(parents) == {baseline.info.run_id, *experiments}, sorted(parents)
    assert client.get_run(baseline.info.run_id).data.metrics == baseline.data.metrics
    keys = {parents[name].data.tags[run_grouping.EXECUTION_TAG] for name in experiments}
    assert len(keys) == 2 and baseline.data.tags[run_grouping.EXECUTION_TAG] not in keys
    ran = {
        "retrain": {"download", "train", "evaluate", "explain", "export", "report"},
        "alpha": {"download", "explain", "report"},
    }
    for name in experiments:
        parent = parents[name]
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        by_stage = stage_children(client, parent)
        assert set(by_stage) == ran[name], by_stage.keys()
        assert all(len(runs) == 1 for runs in by_stage.values())
        assert all(r.info.status == "FINISHED" for runs in by_stage.values() for r in runs)
        # Params and headline metrics of the parent are this experiment's own.
        params = results[name]["params"]
        for key in ("train.learning_rate", "explain.alpha"):
            section, field = key.split(".")
            assert float(parent.data.params[key]) == params[section][field]
        faithfulness = results[name]["metrics"]["metrics/explain.json"]["faithfulness"]
        if faithfulness["gradcam_drop"] is not None:
            assert parent.data.metrics["faithfulness"] == pytest.approx(
                faithfulness["gradcam_drop"]
            )
    retrain = stage_children(client, parents["retrain"])
    train_id = retrain["train"][0].info.run_id
    for stage in ("evaluate", "explain"):
        assert retrain[stage][0].data.tags[run_grouping.MODEL_RUN_TAG] == train_id
    evaluate = results["retrain"]["metrics"]["metrics/evaluate.json"]
    assert parents["retrain"].data.metrics["macro_f1"] == pytest.approx(evaluate["macro_avg"]["f1"])
    explain = stage_children(client, parents["alpha"])["explain"][0]
    assert explain.data.tags[run_grouping.MODEL_RUN_TAG] == baseline_train


def test_two_queued_experiments_share_the_embedded_store(tmp_path):
    """No tracking server: two experiments, run at once, both record into the default
    sqlite:///mlflow.db at the repository root, which neither has created yet."""
    project = tiny_project(tmp_path, None)
    experiments = {
        "seed-1": ["-S", "prepare.seed=1"],
        "seed-2": ["-S", "prepare.seed=2"],
    }
    run_queue(project, experiments, "prepare")

    uri = f"sqlite:///{project.root / 'mlflow.db'}"
    client, parents = pipeline_runs(uri)
    assert set(parents) == set(experiments)
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        by_stage = stage_children(client, parent)
        assert set(by_stage) == {"download", "prepare"}
        assert all(r.info.status == "FINISHED" for runs in by_stage.values() for r in runs)
        seed = by_stage["prepare"][0].data.params["prepare.seed"]
        assert seed == parent.data.params["prepare.seed"] == name.split("-")[1]


def test_stages_creating_the_embedded_store_at_once_all_succeed(tmp_path):
    """Three stages open a store no one has created yet at the same moment (MLflow creates
    its tables on first use): each waits for the one creating it, none fails."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from animalcam import tracking; from animalcam.params import "
        "params_from_dict; p = params_from_dict({'mlflow': {'experiment': 'race'}}); "
        "r = tracking.stage_run('download', p, tracking_uri=sys.argv[1], execution=None); "
        "r.__enter__(); r.__exit__(None, None, None)"
    )
    stages = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [stage.communicate(timeout=180)[1] for stage in stages]
    assert [stage.returncode for stage in stages] == [0, 0, 0], errors
    _, parents = pipeline_runs(uri, "race")
    assert len(parents) == 3
