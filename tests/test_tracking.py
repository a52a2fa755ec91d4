"""MLflow tracking: one parent run per pipeline execution, a child per stage, with params,
curves, artifacts, tags and the registered model; against the embedded sqlite store and a
real `mlflow server` on localhost (started here, one per module)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient
from test_serving import (
    BLUE,
    RED,
    free_port,
    image_bytes,
    local_server,
    save_color_model,
    subprocess_env,
)

from animalcam import (
    dvc_files,
    model_registry,
    provenance,
    run_grouping,
    tracking,
    tracking_store,
)
from animalcam.errors import AnimalcamError, SourceNotFoundError, TrackingError
from animalcam.flat_params import flatten_params
from animalcam.params import params_from_dict
from animalcam.tracking_secrets import public_uri

EPOCHS = 3
MODEL_RUN = "models/mlflow_run.json"


# --- Fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_color_model(tmp_path_factory.mktemp("model") / "model.keras")


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One embedded store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory):
    """A real `mlflow server` on a free localhost port, proxying artifacts to tmp."""
    root = tmp_path_factory.mktemp("server")
    args = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{root / 'server.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    # No background job runner: the tests need only the REST API and artifacts.
    env = {**subprocess_env(""), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with local_server(args, env, "/health", root / "server.log") as url:
        yield url


@pytest.fixture
def workspace(tmp_path, monkeypatch, model_file) -> Path:
    """A repository as the stages see it: dvc.yaml, a dvc.lock matching the data on disk,
    data/raw, data/prepared (manifests + images) and a trained model."""
    for name, color in (("cat", RED), ("dog", BLUE)):
        raw = tmp_path / "data/raw" / name
        raw.mkdir(parents=True)
        (raw / "1.png").write_bytes(image_bytes(color))
    prepared = tmp_path / "data/prepared"
    (prepared / "images").mkdir(parents=True)
    (prepared / "images/a.png").write_bytes(image_bytes(RED))
    (prepared / "train.csv").write_text("path,label\ndata/prepared/images/a.png,cat\n")
    (prepared / "val.csv").write_text("path,label\ndata/prepared/images/a.png,cat\n")
    (prepared / "classes.json").write_text('["cat", "dog"]\n')
    (tmp_path / "models").mkdir()
    shutil.copy(model_file, tmp_path / "models/model.keras")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/train.py").write_text("print('train')\n")
    stages = {
        "download": {"cmd": "python stages/download.py", "params": ["data"], "outs": ["data/raw"]},
        "prepare": {"cmd": "x", "deps": ["data/raw"], "params": ["prepare"]},
        "train": {
            "cmd": "x",
            "deps": ["stages/train.py", "data/prepared", "data/raw"],
            "params": ["train"],
            "outs": ["models"],
        },
        "evaluate": {"cmd": "x", "deps": ["models/model.keras", "data/prepared"]},
        "explain": {
            "cmd": "x",
            "deps": ["models/model.keras", "data/prepared"],
            "params": ["explain"],
        },
    }
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": stages}))
    lock = {
        "schema": "2.0",
        "stages": {
            "download": {"outs": [dir_entry(tmp_path, "data/raw", "aaaa1111.dir")]},
            "prepare": {"outs": [dir_entry(tmp_path, "data/prepared", "bbbb2222.dir")]},
        },
    }
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dir_entry(root: Path, path: str, md5: str) -> dict:
    files = [p for p in (root / path).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return {"path": path, "hash": "md5", "md5": md5, "size": size, "nfiles": len(files)}


def fresh_params(**sections):
    name = uuid.uuid4().hex[:8]
    raw = {"mlflow": {"experiment": f"exp-{name}", "registered_model": f"clf-{name}"}}
    raw.update(sections)
    return params_from_dict(raw)


def fit_with_resume(model_path: Path, callback) -> None:
    """Fit for EPOCHS epochs in two sessions, the second resumed with initial_epoch."""
    import keras

    model = keras.saving.load_model(model_path)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    labels = np.array([0, 1, 0, 1])
    model.fit(images, labels, epochs=EPOCHS - 1, verbose=0, callbacks=[callback])
    model.fit(
        images, labels, initial_epoch=EPOCHS - 1, epochs=EPOCHS, verbose=0, callbacks=[callback]
    )


def children(client: MlflowClient, parent) -> dict[str, list]:
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags[tracking.STAGE_TAG], []).append(run)
    return by_stage


# --- A pipeline execution, then explain rerun alone ---------------------------------------


def test_execution_groups_stages_under_one_parent(sqlite_uri, workspace):
    store_uri = sqlite_uri
    params = fresh_params(explain={"alpha": 0.4})
    kwargs = {"tracking_uri": store_uri, "execution": "exec-1"}
    with tracking.stage_run("download", params, **kwargs) as run:
        run.log_metrics({"n_images": 2})
    with tracking.stage_run("prepare", params, **kwargs) as run:
        run.log_artifact("data/prepared/classes.json")
        run.log_artifact("data/prepared/images")
    with tracking.stage_run("train", params, **kwargs) as run:
        fit_with_resume(workspace / "models/model.keras", run.keras_callback())
        run.log_metrics({"val_accuracy": 0.75})
        model = model_registry.log_trained_model(
            run, "models/model.keras", params.mlflow.registered_model, val_accuracy=0.75
        )
        run.record_model_run("models/mlflow_run.json", model)
        run.set_headline({"val_accuracy": 0.75})
        train_id, parent_id = run.run_id, run.parent_run_id
    for stage, headline in (
        ("evaluate", {"macro_f1": 0.5}),
        ("explain", {"faithfulness": 0.2, "faithfulness_ratio": None}),
    ):
        with tracking.stage_run(stage, params, model_run_file=MODEL_RUN, **kwargs) as run:
            run.set_headline(headline)
    # `dvc repro` after changing explain.alpha: a new execution runs explain alone.
    rerun_params = params_from_dict({"mlflow": vars(params.mlflow), "explain": {"alpha": 0.5}})
    with tracking.stage_run(
        "explain",
        rerun_params,
        tracking_uri=store_uri,
        execution="exec-2",
        model_run_file=MODEL_RUN,
    ) as run:
        assert run.parent_run_id == parent_id
        rerun_id = run.run_id

    client = MlflowClient(store_uri)
    parent = client.get_run(parent_id)
    assert parent.data.tags[run_grouping.EXECUTION_TAG] == "exec-1"
    assert parent.data.tags[run_grouping.KIND_TAG] == "pipeline"
    assert parent.info.status == "FINISHED"
    by_stage = children(client, parent)
    assert {k: len(v) for k, v in by_stage.items()} == {
        "download": 1,
        "prepare": 1,
        "train": 1,
        "evaluate": 1,
        "explain": 2,
    }
    assert all(r.info.status == "FINISHED" for runs in by_stage.values() for r in runs)
    experiment = parent.info.experiment_id
    pipelines = client.search_runs([experiment], "tags.`animalcam.kind` = 'pipeline'")
    assert [p.info.run_id for p in pipelines] == [parent_id]  # no orphan for the rerun

    # Params: the parent has all of params.yaml and the training data's DVC md5; each
    # child its own section and the version of the data it read.
    assert parent.data.params["train.augment.rotation"] == "20.0"
    assert parent.data.params["train.augment.horizontal_flip"] == "true"
    assert parent.data.params["explain.layer"] == "null"
    assert parent.data.params["explain.alpha"] == "0.4"
    assert parent.data.params["data_version"] == "bbbb2222.dir"
    train = client.get_run(train_id)
    assert train.data.params["train.epochs"] == "15"
    assert train.data.params["data_version"] == "bbbb2222.dir"
    assert not any(key.startswith("explain.") for key in train.data.params)
    prepare = by_stage["prepare"][0]
    assert prepare.data.params["data_version"] == "aaaa1111.dir"
    assert by_stage["download"][0].data.params["data.source"] == "kaggle"

    # Curves: one point per epoch (step = 1-based epoch, continuing after the resume),
    # on the child and on the parent.
    for run_id in (train_id, parent_id):
        history = client.get_metric_history(run_id, "epoch/loss")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert len(client.get_metric_history(run_id, "epoch/learning_rate")) == EPOCHS
    assert parent.data.metrics["val_accuracy"] == 0.75
    assert parent.data.metrics["macro_f1"] == 0.5
    assert parent.data.metrics["faithfulness"] == 0.2
    assert "faithfulness_ratio" not in parent.data.metrics  # None: not measured

    # Tags on every run: git, DVC hashes of the inputs, versions, devices.
    rerun = client.get_run(rerun_id)
    assert rerun.data.tags[run_grouping.MODEL_RUN_TAG] == train_id
    assert rerun.data.tags["animalcam.params_differ_from_parent"] == "explain.alpha"
    assert rerun.data.params["explain.alpha"] == "0.5"
    for run in (parent, train, prepare, rerun):
        tags = run.data.tags
        assert {"git.commit", "git.dirty", "versions.tensorflow", "versions.keras"} <= set(tags)
    assert "devices" in train.data.tags
    assert train.data.tags["dvc.deps.data/prepared"] == "bbbb2222.dir"
    assert len(train.data.tags["dvc.deps.stages/train.py"]) == 32  # md5 of the file
    assert prepare.data.tags["dvc.deps.data/raw"] == "aaaa1111.dir"

    # Artifacts, under their repository paths.
    names = [a.path for a in client.list_artifacts(prepare.info.run_id, "data/prepared")]
    assert names == ["data/prepared/classes.json", "data/prepared/images"]
    assert [a.path for a in client.list_artifacts(prepare.info.run_id, "data/prepared/images")] == [
        "data/prepared/images/a.png"
    ]

    # The registered version records the validation accuracy; the record points back.
    version = client.get_model_version(params.mlflow.registered_model, "1")
    assert version.tags["val_accuracy"] == "0.750000"
    assert "0.7500" in version.description
    assert version.run_id == train_id
    record = json.loads(Path("models/mlflow_run.json").read_text())
    assert record["run_id"] == train_id and record["parent_run_id"] == parent_id
    assert record["model_version"] == "1" and record["model_uri"] == model.model_uri


@pytest.fixture(scope="module")
def server_pipeline(server_uri, model_file, tmp_path_factory):
    """Against the real server: train (curves, artifact, registered model), then explain
    rerun alone in another execution."""
    root = tmp_path_factory.mktemp("server-workspace")
    shutil.copy(model_file, root / "model.keras")
    (root / "classes.json").write_text('["cat", "dog"]\n')
    params = fresh_params()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with tracking.stage_run("train", params, tracking_uri=server_uri, execution="s1") as run:
            fit_with_resume(root / "model.keras", run.keras_callback())
            run.log_artifact("classes.json")
            model = model_registry.log_trained_model(
                run, "model.keras", params.mlflow.registered_model, val_accuracy=0.5
            )
            run.record_model_run("mlflow_run.json", model)
            train = run
        with tracking.stage_run(
            "explain",
            params,
            tracking_uri=server_uri,
            execution="s2",
            model_run_file="mlflow_run.json",
        ) as run:
            run.set_headline({"faithfulness": 0.3})
            explain = run
        mlflow.set_tracking_uri(None)
    return {"params": params, "train": train, "explain": explain}


def test_real_server_records_the_execution(server_uri, server_pipeline):
    params, train = server_pipeline["params"], server_pipeline["train"]
    parent_id = train.parent_run_id
    client = MlflowClient(server_uri)
    parent = client.get_run(parent_id)
    assert server_pipeline["explain"].parent_run_id == parent_id
    explain = client.get_run(server_pipeline["explain"].run_id)
    assert explain.data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(train.run_id).data.tags["mlflow.parentRunId"] == parent_id
    assert parent.data.params["train.image_size"] == "224"
    assert parent.data.metrics["faithfulness"] == 0.3
    history = client.get_metric_history(parent_id, "epoch/loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert [a.path for a in client.list_artifacts(train.run_id)] == ["classes.json"]
    version = client.get_model_version(params.mlflow.registered_model, "1")
    assert version.tags["val_accuracy"] == "0.500000" and version.run_id == train.run_id


def test_model_serve_answers_rest_invocations_with_an_image(server_uri, server_pipeline, tmp_path):
    """`mlflow models serve -m models:/<name>/1 --env-manager local`, model fetched
    through the tracking server, answers POST /invocations with base64 images."""
    name = server_pipeline["params"].mlflow.registered_model
    args = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/1"),
        *("--env-manager", "local"),
    ]
    with local_server(args, subprocess_env(server_uri), "/ping", tmp_path / "serve.log") as url:
        images = [image_bytes(BLUE), image_bytes(RED, fmt="JPEG")]
        payload = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(image).decode()] for image in images],
            }
        }
        response = requests.post(f"{url}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert [row["label"] for row in rows] == ["dog", "cat"]
        assert set(rows[0]) == {"label", "confidence", "prob_cat", "prob_dog"}
        assert rows[0]["prob_dog"] == pytest.approx(rows[0]["confidence"])
        not_an_image = {"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8="]]}}
        assert requests.post(f"{url}/invocations", json=not_an_image, timeout=60).status_code == 400


# --- Parents outside a DVC execution, forced parents, failures -----------------------------


def test_without_execution_each_stage_gets_its_own_parent(sqlite_uri, workspace):
    params = fresh_params()
    ids = []
    for _ in range(2):
        with tracking.stage_run("prepare", params, tracking_uri=sqlite_uri, execution=None) as run:
            ids.append(run.parent_run_id)
    assert ids[0] != ids[1]
    parent = MlflowClient(sqlite_uri).get_run(ids[0])
    assert parent.info.run_name == "prepare (standalone)"
    assert run_grouping.EXECUTION_TAG not in parent.data.tags


def test_pipeline_run_id_env_forces_the_parent(sqlite_uri, workspace, monkeypatch):
    params = fresh_params()
    with tracking.stage_run("prepare", params, tracking_uri=sqlite_uri, execution=None) as run:
        parent_id = run.parent_run_id
    monkeypatch.setenv(run_grouping.PIPELINE_RUN_ENV, parent_id)
    with tracking.stage_run("evaluate", params, tracking_uri=sqlite_uri, execution="other") as run:
        assert run.parent_run_id == parent_id
    monkeypatch.setenv(run_grouping.PIPELINE_RUN_ENV, "0" * 32)
    with (
        pytest.raises(TrackingError, match=r"ANIMALCAM_PIPELINE_RUN_ID=0+ is not"),
        tracking.stage_run("evaluate", params, tracking_uri=sqlite_uri),
    ):
        pytest.fail("the block must not run")


def test_missing_model_record_falls_back_to_the_execution(sqlite_uri, workspace):
    params = fresh_params()
    kwargs = {"tracking_uri": sqlite_uri, "execution": "exec-x"}
    with tracking.stage_run("train", params, **kwargs) as run:
        parent_id = run.parent_run_id
    with tracking.stage_run("evaluate", params, model_run_file="models/none.json", **kwargs) as run:
        assert run.parent_run_id == parent_id


def test_an_error_in_the_block_fails_both_runs_and_propagates(sqlite_uri, workspace):
    params = fresh_params()
    with (
        pytest.raises(ValueError, match="boom"),
        tracking.stage_run("train", params, tracking_uri=sqlite_uri, execution="e") as run,
    ):
        raise ValueError("boom")
    client = MlflowClient(sqlite_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.parent_run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_logging_a_missing_artifact_is_an_error(sqlite_uri, workspace):
    with (
        pytest.raises(SourceNotFoundError, match=r"plots/none\.png does not exist"),
        tracking.stage_run("evaluate", fresh_params(), tracking_uri=sqlite_uri) as run,
    ):
        run.log_artifact("plots/none.png")


def test_log_history_adds_only_the_epochs_not_logged_yet(sqlite_uri, workspace):
    """After a resume the callback logged epochs 3-4; the history fills in 1-2 once."""
    with tracking.stage_run("train", fresh_params(), tracking_uri=sqlite_uri) as run:
        run.log_epoch(3, {"loss": 0.5, "lr": 1e-4})
        history = [{"epoch": 1, "loss": 0.9, "lr": ""}, {"epoch": "2", "loss": "0.7"}]
        run.log_history([*history, {"epoch": 3, "loss": 0.1, "note": "x"}])
    client = MlflowClient(sqlite_uri)
    for run_id in (run.run_id, run.parent_run_id):
        losses = client.get_metric_history(run_id, "epoch/loss")
        assert sorted((m.step, m.value) for m in losses) == [(1, 0.9), (2, 0.7), (3, 0.5)]
        rates = client.get_metric_history(run_id, "epoch/learning_rate")
        assert [(m.step, m.value) for m in rates] == [(3, 1e-4)]


# --- Unreachable servers ------------------------------------------------------------------


def test_unreachable_server_fails_fast_with_one_line(workspace):
    uri = f"http://user:secret@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        tracking_store.check_tracking_server(uri)
    message = str(caught.value)
    assert isinstance(caught.value, AnimalcamError) and isinstance(caught.value, ConnectionError)
    assert "\n" not in message and "cannot be reached" in message
    assert "127.0.0.1" in message and "secret" not in message
    # MLflow's defaults would retry for minutes; the probe must not.
    assert time.monotonic() - started < 30
    with (
        pytest.raises(TrackingError, match="cannot be reached"),
        tracking.stage_run("train", fresh_params(), tracking_uri=uri),
    ):
        pytest.fail("the block must not run")


def test_credentials_in_the_uri_stay_out_of_runs_files_and_output(
    server_uri, workspace, capfd, caplog, monkeypatch
):
    """A run against a server given as http://user:password@host records normally; the
    password is in no log line, no output (MLflow's "View run" link), no tag or param,
    and not in the record next to the model."""
    password = "Pw-in-uri-7d1e"
    uri = server_uri.replace("http://", f"http://alice:{password}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    params = fresh_params()
    with caplog.at_level("DEBUG"), tracking.stage_run("train", params, execution="c1") as run:
        run.log_metrics({"val_accuracy": 0.5})
        run.record_model_run(MODEL_RUN)
        run.set_headline({"val_accuracy": 0.5})
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    out, err = capfd.readouterr()
    assert password not in out + err + caplog.text
    record = json.loads(Path(MODEL_RUN).read_text())
    assert record["tracking_uri"] == server_uri and record["run_id"] == run.run_id
    client = MlflowClient(server_uri)
    for run_id in (run.run_id, run.parent_run_id):
        data = client.get_run(run_id).data
        assert password not in json.dumps([data.tags, data.params])
        assert "alice" not in json.dumps([data.tags, data.params])


def test_server_that_is_not_mlflow_is_reported(workspace, server_uri):
    with pytest.raises(TrackingError, match="answered HTTP 404"):
        tracking_store.check_tracking_server(server_uri + "/not-mlflow")


def test_reachable_server_and_default_store(server_uri, workspace, monkeypatch):
    assert tracking_store.check_tracking_server(server_uri) == server_uri
    assert requests.get(f"{server_uri}/health", timeout=5).status_code == 200
    assert tracking_store.resolve_tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/somewhere/else")
    assert tracking_store.resolve_tracking_uri() == "sqlite:////somewhere/else/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    assert tracking_store.resolve_tracking_uri() == server_uri


# --- Execution keys, versions, git --------------------------------------------------------


def test_stages_under_one_dvc_process_share_a_key(tmp_path):
    """Two 'stages' below one fake `dvc` process get its key; another `dvc`, another key;
    a process without a dvc ancestor none."""
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text("#!/bin/sh\nsleep 30 &\nsleep 30 &\nwait\n")
    fake_dvc.chmod(fake_dvc.stat().st_mode | stat.S_IEXEC)
    runs = [subprocess.Popen([str(fake_dvc)], start_new_session=True) for _ in range(2)]
    try:
        stages = [wait_for_children(run.pid, 2) for run in runs]
        keys = [[provenance.dvc_ancestor_key(child) for child in pair] for pair in stages]
        assert keys[0][0] == keys[0][1] and keys[0][0].startswith("dvc-")
        assert keys[1][0] == keys[1][1] != keys[0][0]
    finally:
        for run in runs:
            os.killpg(run.pid, 9)
            run.wait(timeout=10)
    assert provenance.dvc_ancestor_key(os.getpid()) is None
    assert provenance.execution_key() is None  # not run by DVC


def wait_for_children(pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = psutil.Process(pid).children()
        if len(found) >= count:
            return [p.pid for p in found]
        time.sleep(0.05)
    pytest.fail(f"process {pid} did not start {count} children")


def test_path_version_uses_the_lock_while_it_matches_the_disk(workspace):
    assert provenance.path_version("data/prepared") == "bbbb2222.dir"
    (workspace / "data/prepared/images/b.png").write_bytes(b"new")  # lock now stale
    fallback = provenance.path_version("data/prepared")
    assert fallback.startswith("manifest:")
    (workspace / "data/prepared/val.csv").write_text("path,label\n")
    assert provenance.path_version("data/prepared") not in (fallback, "bbbb2222.dir")
    (workspace / "data/raw/cat/2.png").write_bytes(b"more")
    assert provenance.path_version("data/raw").startswith("listing:")
    script = workspace / "stages/train.py"
    assert (
        provenance.path_version("stages/train.py") == hashlib.md5(script.read_bytes()).hexdigest()
    )
    assert provenance.path_version("nothing/here") == "missing"


def test_flatten_params_spells_values_as_params_yaml():
    flat = flatten_params(fresh_params(), ["train", "explain"])
    assert flat["train.augment.horizontal_flip"] == "true"
    assert flat["train.learning_rate"] == "0.0001"
    assert flat["explain.layer"] == "null"
    assert not any(key.startswith("prepare.") for key in flat)
    dotted = flatten_params(fresh_params(), ["train.image_size", "train.augment"])
    assert dotted["train.image_size"] == "224" and dotted["train.augment.rotation"] == "20.0"
    assert not any(key.startswith(("train.epochs", "train.image_size_")) for key in dotted)
    assert flatten_params(fresh_params(), []) == {}


# --- Params and data a stage logs: what dvc.yaml declares ----------------------------------


def test_declared_stage_reads_params_and_data_deps(tmp_path):
    stages = {
        "one": {
            "deps": ["stages/one.py", "src/animalcam/x.py", "data/prepared", "data/raw"],
            "params": [
                "train.image_size",
                "images",
                {"params.yaml": ["speed.xla"]},
                {"o.yaml": ["k"]},
            ],
        },
        "all": {"deps": ["models/model.keras"], "params": [{"params.yaml": None}]},
    }
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": stages}))
    one = dvc_files.declared_stage("one", tmp_path)
    assert one.params == ("train.image_size", "images", "speed.xla")
    assert one.data_deps == ("data/prepared", "data/raw") and one.data == "data/prepared"
    assert dvc_files.declared_stage("all", tmp_path).params is None  # all of params.yaml
    assert dvc_files.declared_stage("all", tmp_path).data is None
    assert dvc_files.declared_stage("none", tmp_path) == dvc_files.DeclaredStage()
    (tmp_path / "dvc.yaml").write_text("stages: [unclosed\n")
    assert dvc_files.declared_stage("one", tmp_path) == dvc_files.DeclaredStage()
    (tmp_path / "dvc.yaml").unlink()
    assert dvc_files.declared_stage("one", tmp_path) == dvc_files.DeclaredStage()


def test_a_stage_logs_the_params_and_data_its_dvc_yaml_entry_lists(sqlite_uri, workspace):
    """Dotted keys and whole sections, as listed; the first data dep is the data read, and
    being the train stage's data its version goes on the parent too."""
    dvc_yaml = json.loads((workspace / "dvc.yaml").read_text())
    dvc_yaml["stages"]["images"] = {
        "cmd": "x",
        "deps": ["stages/train.py", "data/prepared", "data/raw"],
        "params": ["train.image_size", "explain"],
    }
    (workspace / "dvc.yaml").write_text(json.dumps(dvc_yaml))
    params = fresh_params()
    with tracking.stage_run("images", params, tracking_uri=sqlite_uri, execution=None) as run:
        pass
    client = MlflowClient(sqlite_uri)
    logged = client.get_run(run.run_id).data.params
    expected = {**flatten_params(params, ["explain"]), "train.image_size": "224"}
    expected |= {"data_path": "data/prepared", "data_version": "bbbb2222.dir"}
    assert logged == expected
    parent = client.get_run(run.parent_run_id).data.params
    assert parent == {**flatten_params(params), "data_version": "bbbb2222.dir"}


@pytest.mark.parametrize("dvc_yaml", [None, "stages: {train: [broken\n", "just text\n"])
def test_outside_a_dvc_repository_a_stage_logs_no_params_of_its_own(
    dvc_yaml, sqlite_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    if dvc_yaml is not None:
        (tmp_path / "dvc.yaml").write_text(dvc_yaml)
    params = fresh_params()
    with tracking.stage_run("train", params, tracking_uri=sqlite_uri, execution=None) as run:
        pass
    client = MlflowClient(sqlite_uri)
    assert client.get_run(run.run_id).data.params == {}
    assert client.get_run(run.parent_run_id).data.params == flatten_params(params)
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_git_state_ignores_dvc_lock(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "dvc.lock").write_text("x\n")
    (tmp_path / ".gitignore").write_text("\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "c")
    state = provenance.git_state(tmp_path)
    assert len(state["git.commit"]) == 40 and state["git.dirty"] == "false"
    (tmp_path / "dvc.lock").write_text("y\n")  # DVC rewrites these during a run
    (tmp_path / ".gitignore").write_text("/outs\n")
    assert provenance.git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    state = provenance.git_state(tmp_path)
    assert state["git.dirty"] == "true" and state["git.dirty_files"] == "params.yaml"


def test_versions_and_devices_do_not_import_tensorflow():
    code = (
        "import sys; from animalcam import provenance, tracking; "
        "v = provenance.package_versions(); print(provenance.devices_used()); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split("\n")
    assert out[0].startswith("cpu-only stage") and out[1] == "False"


def test_numeric_metrics_flattens_numbers_only():
    tree = {"accuracy": 0.9, "macro_avg": {"f1": 0.8}, "per_class": {"cat": {"support": 3}}}
    tree |= {"most_confused": [["cat", "dog"]], "note": "x", "ok": True}
    assert tracking.numeric_metrics(tree) == {
        "accuracy": 0.9,
        "macro_avg.f1": 0.8,
        "per_class.cat.support": 3.0,
    }


def test_public_uri_drops_credentials():
    assert public_uri("https://u:p@host:5000/x?token=1") == "https://host:5000/x"
    assert public_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
