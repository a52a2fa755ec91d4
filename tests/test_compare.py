"""`animalcam compare A B`: two predictions.csv (files, MLflow runs or experiments) joined
on path, accuracy of each, B - A with a paired interval, McNemar's exact p-value, and one
clear line with exit code 2 for everything that cannot be compared."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from animalcam import cli
from animalcam.comparison import compare_predictions, format_comparison
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.evaluation import PREDICTIONS_HEADER
from animalcam.prediction_sources import PREDICTIONS_ARTIFACT, load_predictions
from animalcam.run_grouping import KIND_TAG
from animalcam.tracking import STAGE_TAG

CLASSES = ("cat", "dog", "horse")


def write_predictions(path: Path, right: np.ndarray, n_classes: int = 3) -> Path:
    """A predictions.csv as the evaluate stage writes it: image i is of class i % 3, and
    predicted right where ``right[i]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTIONS_HEADER)
        for i, ok in enumerate(right):
            actual = CLASSES[i % n_classes]
            predicted = actual if ok else CLASSES[(i + 1) % n_classes]
            writer.writerow([f"data/raw/{actual}/img_{i:04d}.jpg", actual, predicted, 0.9])
    return path


def answers(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A right on 70% of ``n`` images; B right wherever A is and on 60% of the rest."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.7
    return a, a | (rng.random(n) < 0.6)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", *args])
    return stop.value.code


def test_b_clearly_better(tmp_path, capsys):
    a, b = answers()
    code = run_cli(
        [
            str(write_predictions(tmp_path / "a.csv", a)),
            str(write_predictions(tmp_path / "b.csv", b)),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "images      300 (the same in A and B, joined on path)"
    assert out[1].startswith(f"accuracy A  {a.mean():.4f}  ")
    assert out[2].startswith(f"accuracy B  {b.mean():.4f}  ")
    assert out[3].startswith(f"B - A       {b.mean() - a.mean():+.4f}  95% interval [+0.")
    assert "2000 resamples, seed 0" in out[3]
    assert f"only A right on 0 images, only B right on {np.sum(b & ~a)}" in out[4]
    assert out[5].startswith("verdict     B is better (p=")


def test_identical_predictions_are_within_the_noise(tmp_path, capsys):
    a, _ = answers()
    path = write_predictions(tmp_path / "a.csv", a)
    assert run_cli([str(path), str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["difference"] == 0.0 and report["difference_ci95"] == [0.0, 0.0]
    assert report["mcnemar"] == {"only_a_right": 0, "only_b_right": 0, "p_value": 1.0}
    assert report["better"] is None
    assert report["verdict"] == "the difference is within the noise (p=1)"
    assert report["a"]["accuracy"] == round(a.mean(), 4)


def test_mcnemar_p_value_by_hand_and_a_noisy_difference(tmp_path):
    # 10 images differ, all in B's favour: p = 2 * (1/2)^10 = 0.00195.
    a = np.zeros(30, dtype=bool)
    b = np.arange(30) < 10
    result = compare_predictions(
        load_predictions(str(write_predictions(tmp_path / "a.csv", a))),
        load_predictions(str(write_predictions(tmp_path / "b.csv", b))),
        n_resamples=1000,
        seed=0,
    )
    assert result.p_value == pytest.approx(2 * 0.5**10)
    assert result.better == "B" and result.difference == pytest.approx(1 / 3)
    # 6 to 4 the other way: p = 2 * P(X <= 4 | 10, 1/2) = 0.754; within the noise.
    a = np.arange(30) < 6
    b = (np.arange(30) >= 6) & (np.arange(30) < 10)
    result = compare_predictions(
        load_predictions(str(write_predictions(tmp_path / "a2.csv", a))),
        load_predictions(str(write_predictions(tmp_path / "b2.csv", b))),
        n_resamples=1000,
        seed=0,
    )
    assert result.p_value == pytest.approx(0.75390625)
    assert result.better is None
    low, high = result.difference_ci95
    assert low < result.difference < high and low < 0 < high
    assert format_comparison(result).endswith("the difference is within the noise (p=0.75)")


def test_same_seed_same_report_and_rows_in_any_order(tmp_path):
    a, b = answers()
    path_a = write_predictions(tmp_path / "a.csv", a)
    rows = path_a.read_text().splitlines()
    shuffled = tmp_path / "a_shuffled.csv"
    shuffled.write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    path_b = write_predictions(tmp_path / "b.csv", b)

    def report(first):
        result = compare_predictions(
            load_predictions(str(first)), load_predictions(str(path_b)), n_resamples=1000, seed=3
        )
        return result.difference_ci95, result.p_value

    assert report(path_a) == report(shuffled)


def test_a_folder_holding_predictions_csv_is_accepted(tmp_path):
    a, _ = answers()
    write_predictions(tmp_path / "plots" / "evaluate" / "predictions.csv", a)
    assert len(load_predictions(str(tmp_path / "plots" / "evaluate")).actual) == 300


@pytest.mark.parametrize(
    "b_rows, message",
    [
        (slice(0, 250), r"50 only in A \(.*\), 0 only in B \(.*\), 250 in both"),
        (slice(0, 0), "lists no images"),
    ],
)
def test_other_images_stop_with_one_line_and_exit_2(tmp_path, capsys, b_rows, message):
    a, b = answers()
    path_a = write_predictions(tmp_path / "a.csv", a)
    path_b = write_predictions(tmp_path / "b.csv", b[b_rows])
    assert run_cli([str(path_a), str(path_b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("animalcam compare: error: ")
    assert re.search(message, err[0])


def test_no_image_in_common(tmp_path, capsys):
    a, _ = answers()
    path_a = write_predictions(tmp_path / "a.csv", a)
    path_b = tmp_path / "b.csv"
    path_b.write_text(path_a.read_text().replace("img_", "other_"))
    assert run_cli([str(path_a), str(path_b)]) == 2
    err = capsys.readouterr().err
    assert "300 only in A (" in err and "300 only in B (" in err and " 0 in both " in err


def test_different_true_classes_are_refused(tmp_path):
    a, _ = answers(n=30)
    path_a = write_predictions(tmp_path / "a.csv", a)
    path_b = tmp_path / "b.csv"
    path_b.write_text(path_a.read_text().replace(",cat,", ",lion,", 1))
    with pytest.raises(DataError, match=r"1 image\(s\) have a different true class.*'lion' in B"):
        compare_predictions(
            load_predictions(str(path_a)), load_predictions(str(path_b)), n_resamples=1000, seed=0
        )


def test_not_a_predictions_csv(tmp_path):
    path = tmp_path / "predict.csv"  # what `animalcam predict` writes: no true class
    path.write_text("path,predicted,confidence\nx.jpg,cat,0.9\n")
    with pytest.raises(DataError, match=r"has no column actual .*path,actual,predicted"):
        load_predictions(str(path))
    twice = tmp_path / "twice.csv"
    twice.write_text("path,actual,predicted\nx.jpg,cat,cat\nx.jpg,cat,dog\n")
    with pytest.raises(DataError, match="lists 1 image"):
        load_predictions(str(twice))


def test_missing_file_and_bad_numbers(tmp_path, capsys):
    a, _ = answers()
    path_a = str(write_predictions(tmp_path / "a.csv", a))
    assert run_cli([path_a, str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"animalcam compare: error: {tmp_path / 'nope.csv'} not found; pass the evaluate "
        "stage's predictions.csv, an MLflow run id or an experiment name."
    ]
    assert run_cli([path_a, path_a, "--resamples", "999"]) == 2
    assert "expected a whole number in [1000, 100000], got '999'" in capsys.readouterr().err


def test_no_store_to_look_a_name_up_in(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    with pytest.raises(SourceNotFoundError, match=r"no MLflow store at .*absent/mlflow\.db"):
        load_predictions("my-experiment")
    assert not (tmp_path / "absent").exists()  # looking created nothing


# A real MLflow store ------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An embedded store with experiment "exp": a pipeline run whose evaluate child logged
    A's predictions, then a later evaluate run with B's, a train run and a failed evaluate
    run; plus an experiment with no evaluate run."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(root / "artifacts").as_uri())
    client.create_experiment("empty", artifact_location=(root / "artifacts2").as_uri())
    a, b = answers()
    ids = {}

    def stage_run(name, right=None, status="FINISHED", parent=None, start=0):
        tags = {KIND_TAG: "stage", STAGE_TAG: name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp, start_time=1000 + start, tags=tags, run_name=name)
        if right is not None:
            folder = root / f"upload_{run.info.run_id}" / "plots" / "evaluate"
            write_predictions(folder / "predictions.csv", right)
            client.log_artifacts(run.info.run_id, str(folder), "plots/evaluate")
        client.set_terminated(run.info.run_id, status, end_time=2000 + start)
        return run.info.run_id

    pipeline = client.create_run(
        exp, start_time=1000, tags={KIND_TAG: "pipeline", "dvc.exp_name": "lr-high"}
    )
    ids["pipeline"] = pipeline.info.run_id
    ids["a"] = stage_run("evaluate", a, parent=ids["pipeline"])
    client.set_terminated(ids["pipeline"], "FINISHED", end_time=2001)
    ids["train"] = stage_run("train", start=5)
    ids["b"] = stage_run("evaluate", b, start=10)
    ids["failed"] = stage_run("evaluate", a, status="FAILED", start=20)  # latest, not finished
    return uri, ids, a, b


def test_run_ids_and_experiment_names_resolve(store, monkeypatch):
    uri, ids, a, b = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    by_run = load_predictions(ids["a"])
    assert by_run.source == f"MLflow run {ids['a']}"
    assert len(by_run.actual) == 300
    # A pipeline run stands for its evaluate child; an experiment for its last finished one.
    assert load_predictions(ids["pipeline"]).source == f"MLflow run {ids['a']}"
    # A DVC experiment's name stands for its pipeline run's evaluate child.
    assert load_predictions("lr-high").source == f"MLflow run {ids['a']}"
    assert load_predictions("exp").source == f"MLflow run {ids['b']}"
    result = compare_predictions(by_run, load_predictions("exp"), n_resamples=1000, seed=0)
    assert result.accuracy_a == pytest.approx(a.mean())
    assert result.accuracy_b == pytest.approx(b.mean())


def test_cli_compares_a_run_with_an_experiment(store, monkeypatch, capsys):
    uri, ids, a, b = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert run_cli([ids["a"], "exp"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"accuracy A  {a.mean():.4f}  MLflow run {ids['a']}"
    assert out[2] == f"accuracy B  {b.mean():.4f}  MLflow run {ids['b']}"
    assert out[5].startswith("verdict     B is better")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0123456789abcdef0123456789abcdef", "is not a file, nor a run id or experiment name"),
        ("no-such-experiment", "is not a file, nor a run id or experiment name"),
        ("empty", "experiment empty has no finished evaluate-stage run"),
        ("train", "has no artifact plots/evaluate/predictions.csv \\(its stage: train\\)"),
    ],
)
def test_unknown_runs_and_experiments_are_one_line_and_exit_2(
    store, monkeypatch, capsys, spec, message
):
    uri, ids, *_ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = ids.get(spec, spec)
    assert run_cli([ids["a"], spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("animalcam compare: error: ")
    assert re.search(message, err[0]), err[0]


def test_the_artifact_path_is_where_the_evaluate_stage_logs_it():
    assert PREDICTIONS_ARTIFACT == "plots/evaluate/predictions.csv"
