"""End to end: the whole pipeline with `dvc repro` on tiny images, then what users do next
(`dvc metrics show`, `dvc plots show`, `dvc exp run -S ...`, the MLflow UI's data)."""

import hashlib
import json

import pytest
from archive_factory import write_zip
from conftest import blob_image
from dvc_project import DvcProject
from PIL import Image
from test_pipeline_prepare import encoded

from animalcam.outputs import read_csv

CLASSES = {"cane": "dog", "gatto": "cat", "ragno": "spider"}
TINY = {
    "prepare": {"min_side": 16, "min_per_class": 4},
    "train": {
        "weights": "none",
        "image_size": 32,
        "epochs": 2,
        "warmup_epochs": 0,
        "batch_size": 8,
        "dense_units": 8,
        "learning_rate": 1e-3,
        "top_k": 2,
    },
    "evaluate": {"top_k": 2, "gallery_size": 4},
    "explain": {"n_correct": 2, "n_incorrect": 2},
    # A tiny net after a few steps has near-tied outputs that int8 (and float16) may
    # flip: the parity bars are tested on a trained tiny model in test_export.py.
    "export": {
        "representative_images": 16,
        "min_agreement": 0.0,
        "int8_min_agreement": 0.0,
        "int8_max_accuracy_drop": 1.0,
    },
    "speed": {"evaluate_batch_size": 8, "explain_batch_size": 4},
}
STAGES = (
    "download",
    "prepare",
    "images",
    "audit",
    "train",
    "evaluate",
    "explain",
    "export",
    "report",
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-full")
    files = {
        f"raw-img/{folder}/{i}.jpg": encoded(blob_image(50 * c + i, (48, 40)), "JPEG")
        for c, folder in enumerate(CLASSES)
        for i in range(10)
    }
    archive = write_zip(tmp / "animals10.zip", files)
    project = DvcProject.create(tmp / "repo")
    project.set_params(data={"source": str(archive)}, **TINY)
    result = project.repro()
    return project, result


def test_every_stage_runs_and_writes_its_outputs(pipeline):
    project, result = pipeline
    root = project.root
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    assert (root / "data/images/index.json").is_file()
    assert json.loads((root / "metrics/train.json").read_text())["input"] == "images"
    assert (root / "models/model.keras").is_file()
    history = read_csv(root / "plots/train/history.csv")
    assert [r["epoch"] for r in history] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(history[0])

    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert set(evaluate["per_class"]) == set(CLASSES.values())
    for average in ("macro_avg", "weighted_avg"):
        assert set(evaluate[average]) == {"precision", "recall", "f1", "f1_ci95"}
    assert 0 <= evaluate["accuracy"] <= 1
    low, high = evaluate["accuracy_ci95"]
    assert low <= evaluate["accuracy"] <= high
    assert evaluate["ci95"]["accuracy"] == {"low": low, "high": high}
    predictions = read_csv(root / "plots/evaluate/predictions.csv")
    val = read_csv(root / "data/prepared/val.csv")
    assert [p["path"] for p in predictions] == [v["path"] for v in val]
    assert {"actual", "predicted", "confidence"} <= set(predictions[0])
    for name in ("confusion.png", "correct.png", "incorrect.png"):
        assert Image.open(root / "plots/evaluate" / name).size[0] > 100

    explain = json.loads((root / "metrics/explain.json").read_text())
    assert explain["n_correct"] + explain["n_incorrect"] > 0
    panels = list((root / "plots/gradcam").rglob("*.png"))
    assert panels and all(p.parent.name in ("correct", "incorrect") for p in panels)
    assert not (root / ".train_state").exists()

    export = json.loads((root / "metrics/export.json").read_text())
    assert {"saved_model", "tflite_float16", "tflite_int8"} <= set(export)
    assert export["val_images"] == len(val)
    for form in ("saved_model", "tflite_float16", "tflite_int8"):
        assert 0 <= export[form]["agreement"] <= 1 and export[form]["file_mb"] > 0
    assert (root / "models/export/model_int8.tflite").stat().st_size > 0

    audit = json.loads((root / "metrics/audit.json").read_text())
    assert audit["images_audited"] == len(read_csv(root / "data/prepared/train.csv")) + len(val)
    issues = read_csv(root / "plots/audit/label_issues.csv")
    assert audit["issues"] == len(issues)
    manifest_paths = {r["path"] for r in read_csv(root / "data/prepared/train.csv") + val}
    assert {r["path"] for r in issues} <= manifest_paths  # pastes into data/exclude.txt
    assert Image.open(root / "plots/audit/label_issues.png").size[0] > 100
    # The audit stored its plain features where train's frozen-backbone epochs look.
    assert sorted(p.name for p in (root / ".animalcam/features").iterdir()) == [
        "train.npz",
        "val.npz",
    ]

    page = (root / "reports/report.html").read_text(encoding="utf-8")
    assert 'id="evaluation"' in page and 'id="gradcam"' in page
    assert page.count('<img src="data:image/') >= 6  # curves, confusion, galleries, Grad-CAM


def test_dvc_shows_metrics_and_plots(pipeline):
    project, _ = pipeline
    metrics = json.loads(project.run("dvc", "metrics", "show", "--json").stdout)
    files = next(iter(metrics.values()))["data"]
    assert {"metrics/train.json", "metrics/evaluate.json", "metrics/explain.json"} <= set(files)
    plots = json.loads(project.run("dvc", "plots", "show", "--json").stdout)
    names = " ".join(plots["data"])
    for expected in ("Loss", "Accuracy", "confusion matrix", "correct.png", "gradcam"):
        assert expected in names, names


def test_mlflow_holds_one_pipeline_run_with_a_child_per_stage(pipeline):
    from mlflow.tracking import MlflowClient

    project, _ = pipeline
    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("animalcam")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {
        r.data.tags["mlflow.runName"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(STAGES)
    assert parent.data.params["train.epochs"] == "2"
    assert "val_accuracy" in parent.data.metrics and "macro_f1" in parent.data.metrics
    # Which pinned environment it ran on (README, "Pinned environments").
    lock = hashlib.sha256((project.root / "requirements/linux-cpu.txt").read_bytes()).hexdigest()
    assert children["train"].data.tags["lock.linux-cpu.sha256"] == lock
    assert children["train"].data.tags["lock.installed"]
    history = client.get_metric_history(children["train"].info.run_id, "epoch/val_loss")
    assert [m.step for m in history] == [1, 2]
    (version,) = client.search_model_versions("name='animalcam-classifier'")
    assert float(version.tags["val_accuracy"]) == pytest.approx(
        json.loads((project.root / "metrics/train.json").read_text())["best_val_accuracy"], abs=1e-4
    )


def test_an_experiment_reruns_only_what_it_touches(pipeline):
    project, _ = pipeline
    result = project.run("dvc", "exp", "run", "-S", "explain.alpha=0.6")
    assert "Running stage 'explain'" in result.stdout
    for stage in ("prepare", "images", "train", "evaluate"):
        assert f"Running stage '{stage}'" not in result.stdout
    diff = project.run("dvc", "params", "diff").stdout
    assert "explain.alpha" in diff and "0.6" in diff


def test_a_speed_switch_reruns_nothing(pipeline):
    project, _ = pipeline
    path = project.root / "params.yaml"
    before = path.read_text()
    try:
        project.set_params(
            speed={
                "train_xla": True,
                "autotune": False,
                "evaluate_batch_size": 3,
                "explain_xla": "on",
            }
        )
        status = json.loads(project.run("dvc", "status", "--json").stdout)
        assert status == {"download": ["always changed"]}
        project.set_params(train={"shuffle_buffer": 16})
        status = json.loads(project.run("dvc", "status", "--json").stdout)
        assert set(status) == {"download", "train"}
    finally:
        path.write_text(before)


def test_a_test_split_takes_over_the_reported_figures(pipeline):
    project, _ = pipeline
    root = project.root
    result = project.run("dvc", "exp", "run", "-S", "prepare.test_split=0.2")
    assert "Running stage 'explain'" in result.stdout

    splits = {name: read_csv(root / f"data/prepared/{name}.csv") for name in ("train", "val")}
    splits["test"] = read_csv(root / "data/prepared/test.csv")
    paths = {name: {r["path"] for r in rows} for name, rows in splits.items()}
    assert not (paths["train"] & paths["val"] or paths["train"] & paths["test"])
    assert not paths["val"] & paths["test"]
    for rows in splits.values():  # every class in every split
        assert {r["label"] for r in rows} == set(CLASSES.values())
    assert json.loads((root / "metrics/data.json").read_text())["images"] == {
        "train": 18,
        "val": 6,
        "test": 6,
    }
    assert set(json.loads((root / "data/images/index.json").read_text())["splits"]) == {
        "train",
        "val",
        "test",
    }
    # Training still chose its epoch on validation; evaluate and explain report on test.
    assert json.loads((root / "metrics/train.json").read_text())["val_images"] == 6
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluate["split"] == "test" and evaluate["n_samples"] == 6
    assert evaluate["val"]["n_samples"] == 6
    low, high = evaluate["val"]["accuracy_ci95"]
    assert low <= evaluate["val"]["accuracy"] <= high
    assert "per_class" not in evaluate["val"]
    predictions = read_csv(root / "plots/evaluate/predictions.csv")
    assert {p["path"] for p in predictions} == paths["test"]
    explained = {p.stem for p in (root / "plots/gradcam").rglob("*.png")}
    assert explained, "explain drew no panels"
