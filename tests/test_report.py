"""The run report: one self-contained HTML page with the study's sections, made from
whatever outputs a run has (a small fake run written here), never crashing on a
missing one."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import runpy
import shutil
from html.parser import HTMLParser
from pathlib import Path

import keras
import pytest
from conftest import REPO_ROOT, save_image
from PIL import Image

from animalcam import report, training_curves
from animalcam.dvc_files import stage_writing
from animalcam.layers import ClassProbabilities, Preprocess
from animalcam.modeling import save_model
from animalcam.params import params_from_dict
from animalcam.run_outputs import recorded_params
from animalcam.training import phases

ODD = '<b>"cat" & co</b>'  # a class name that is also markup
CLASSES = (ODD, "dog", "spider")
PARAMS = params_from_dict({"train": {"image_size": 32, "warmup_epochs": 2, "epochs": 15}})
SECTIONS = (
    "data",
    "augmentation",
    "model",
    "training",
    "evaluation",
    "galleries",
    "gradcam",
    "export",
    "provenance",
)
# One row per epoch: two head-only warm-up epochs at 1e-3, then the main phase ramping
# from 2e-6, a ReduceLROnPlateau cut before epoch 5, EarlyStopping after it.
HISTORY = """epoch,loss,accuracy,val_loss,val_accuracy,lr
1,1.2,0.40,1.10,0.45,0.001
2,1.0,0.55,0.95,0.50,0.001
3,0.9,0.60,0.90,0.55,2e-06
4,0.8,0.65,0.85,0.60,0.0001
5,0.7,0.70,0.88,0.58,2e-05
"""
TRAIN_METRICS = {
    "epochs_run": 5,
    "best_epoch": 4,
    "best_val_loss": 0.85,
    "stopped_early": True,
    "backbone_features_phases": "warmup",
    "params_total": 1234,
    "params_trainable": 1234,
    "precision": "float32",
    "collapse_warning": False,
    "resumed_from_epoch": 0,
}


def tiny_model() -> keras.Model:
    """animalcam's model contract in miniature (random weights)."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = Preprocess("caffe", name="preprocess")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="block1_conv1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(8, activation="relu", name="dense")(x)
    x = keras.layers.Dense(len(CLASSES), name="logits")(x)
    return keras.Model(inputs, ClassProbabilities(list(CLASSES), name="predictions")(x))


def png(path: Path, color=(200, 30, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_run(root: Path) -> None:
    """Every output the report reads, small: what a full run (with audit) leaves."""
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    write_json(root / "data/prepared/classes.json", list(CLASSES))
    rows = ["path,label,source,group"]
    for i, name in enumerate(CLASSES):
        image = save_image(root / f"data/raw/c{i}/0.jpg", seed=i, size=(48, 40))
        rows.append(f"{image.relative_to(root).as_posix()},{name},x,{i}")
    (root / "data/prepared/train.csv").write_text("\n".join(rows) + "\n")
    (root / "data/prepared/rejected.csv").write_text(
        "path,reason,detail\ndata/raw/c0/bad.jpg,truncated,cut short\n"
    )
    write_json(
        root / "metrics/data.json",
        {
            "classes": 3,
            "images": {"train": 30, "val": 6, "test": 6},
            "per_class": {
                split: {name: n for name in CLASSES}
                for split, n in (("train", 10), ("val", 2), ("test", 2))
            },
            "rejected": {"total": 3, "duplicate": 2, "truncated": 1},
            "duplicates": {"exact_sets": 2, "near_groups": 1, "cross_class_groups": 0},
        },
    )
    write_json(root / "metrics/audit.json", {"issues": 1, "images_audited": 42, "folds": 3})
    (root / "plots/audit").mkdir(parents=True)
    (root / "plots/audit/label_issues.csv").write_text(
        f'path,label,suggested,score\ndata/raw/c1/0.jpg,dog,"{ODD}",0.93\n'
    )
    png(root / "plots/audit/label_issues.png")
    save_model(tiny_model(), root / "models/model.keras")
    write_json(
        root / "models/mlflow_run.json",
        {"run_id": "trainrun", "parent_run_id": "parent", "experiment_id": "1"},
    )
    write_json(root / "metrics/train.json", TRAIN_METRICS)
    (root / "plots/train").mkdir(parents=True)
    (root / "plots/train/history.csv").write_text(HISTORY)
    per_class = {
        name: {
            "precision": 0.5,
            "precision_ci95": [0.25, 0.75],
            "recall": 0.6,
            "recall_ci95": [0.4, 0.8],
            "f1": 0.55,
            "support": 2,
        }
        for name in CLASSES
    }
    average = {"precision": 0.5, "recall": 0.6, "f1": 0.55, "f1_ci95": [0.3, 0.7]}
    write_json(
        root / "metrics/evaluate.json",
        {
            "split": "test",
            "n_samples": 6,
            "accuracy": 0.6667,
            "accuracy_ci95": [0.3333, 1.0],
            "top_k": 2,
            "top_k_accuracy": 0.8333,
            "macro_avg": average,
            "weighted_avg": average,
            "per_class": per_class,
            "most_confused": [{"actual": ODD, "predicted": "dog", "count": 1}],
            # the headline intervals again, for DVC's tables: not a split
            "ci95": {"accuracy": {"low": 0.3333, "high": 1.0}},
            # the validation split's figures, beside the test split's
            "val": {
                "n_samples": 6,
                "accuracy": 0.5,
                "accuracy_ci95": [0.1667, 0.8333],
                "macro_avg": {"f1": 0.45},
            },
        },
    )
    (root / "plots/evaluate").mkdir(parents=True)
    (root / "plots/evaluate/classification_report.txt").write_text(f"{ODD}  0.50  0.60\n")
    for name in ("confusion.png", "correct.png", "incorrect.png"):
        png(root / "plots/evaluate" / name)
    for group in ("correct", "incorrect"):
        png(root / "plots/gradcam" / group / "grid.png", (30, 30, 200))
        png(root / "plots/gradcam" / group / "00_dog_as_dog.png", (30, 200, 30))
    write_json(
        root / "metrics/explain.json",
        {
            "layer": "block1_conv1",
            "faithfulness": {
                "fraction": 0.2,
                "gradcam_drop": 0.3,
                "random_drop": 0.1,
                "ratio": 3.0,
                "samples": 4,
            },
        },
    )
    write_json(
        root / "metrics/export.json",
        {"val_images": 6, "tflite_int8": {"accuracy": 0.5, "agreement": 0.98}},
    )


TRACKING_RUN = {"run_id": "reportrun", "parent_run_id": "parent", "experiment_id": "1"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("run")
    write_run(root)
    return root, report.build_report(root, PARAMS, tracking_run=TRACKING_RUN)


def embedded_images(page: str) -> list[Image.Image]:
    sources = re.findall(r'<img src="([^"]*)"', page)
    images = []
    for source in sources:
        head, _, data = source.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
        images.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return images


def test_every_section_is_there_in_order(full_run):
    _, page = full_run
    found = re.findall(r'<section id="(\w+)">', page)
    assert tuple(found) == SECTIONS
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "not available" not in page  # nothing is missing from a full run


def test_the_page_loads_nothing_from_elsewhere(full_run):
    _, page = full_run
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert re.findall(r'(?:src|href)="(?!data:|#)', page) == []
    # the augmentation grid, the curves, the confusion matrix, two galleries, the label
    # issues, a grid and a panel per Grad-CAM group
    images = embedded_images(page)
    assert len(images) == 10
    for image in images:
        image.load()  # a whole, decodable picture
        assert image.width > 10 and image.height > 10


def test_odd_class_names_show_as_written_and_break_no_markup(full_run):
    _, page = full_run
    assert ODD not in page  # never raw
    escaped = html.escape(ODD, quote=True)
    # the class list, the per-class table, the most-confused pairs, the model's output
    # classes, the text report and the label issues all show it
    assert page.count(escaped) >= 6
    text = TextOf()
    text.feed(page)
    assert ODD in "".join(text.parts)  # shown to the reader as written
    assert page.count("<b>") == page.count("</b>")


class TextOf(HTMLParser):
    """The text a browser shows (entities decoded), markup left out."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def test_intervals_split_and_numbers_come_from_the_run(full_run):
    _, page = full_run
    assert "On the <b>test</b> split (6 images)" in page
    assert "0.6667 [0.3333, 1.0000]" in page  # accuracy with its interval
    assert "0.5000 [0.2500, 0.7500]" in page  # a class's precision with its interval
    assert "0.5500 [0.3000, 0.7000]" in page  # macro F1
    assert (
        "Also measured, on the <b>validation</b> split (6 images): accuracy "
        "0.5000 [0.1667, 0.8333], macro F1 0.4500"
    ) in page
    assert page.count("Also measured") == 1  # "ci95" is not a split
    assert "ratio <b>3.0</b>" in page  # faithfulness
    assert re.search(r"<th>train</th><th>val</th><th>test</th>", page)  # three splits
    assert "3 file(s) rejected: duplicate 2, truncated 1" in page
    assert "<b>1</b> likely label issue(s) among 42 images" in page
    assert "<code>block1_conv1</code>" in page
    assert "model.summary()" in page and "Total params" in page
    assert "caffe: RGB -&gt; BGR" in page  # the model's own preprocessing, explained
    assert "pool (GlobalAveragePooling2D) -&gt; dense (Dense 8)" in page
    assert "this report&#x27;s run" in page and "reportrun" in page


def test_training_events_say_which_callback_acted_when():
    series = training_curves.history_series(
        [
            dict(zip(HISTORY.splitlines()[0].split(","), line.split(","), strict=True))
            for line in HISTORY.splitlines()[1:]
        ]
    )
    events = training_curves.training_events(
        series, TRAIN_METRICS, phases(PARAMS.train), PARAMS.train
    )
    kinds = [(e.epoch, e.kind) for e in events]
    assert kinds == [
        (1, training_curves.PHASE),
        (3, training_curves.PHASE),
        (4, training_curves.BEST),
        (5, training_curves.LR_CUT),
        (5, training_curves.EARLY_STOP),
    ]
    texts = {e.kind: e.text for e in events}
    assert "from 0.0001 to 2e-05 after epoch 4" in texts[training_curves.LR_CUT]
    assert "stopped training after epoch 5 of 15" in texts[training_curves.EARLY_STOP]
    warmup, main = (e.text for e in events if e.kind == training_curves.PHASE)
    assert "epochs 1-2" in warmup and "head only" in warmup and "computed once" in warmup
    assert "epochs 3-5" in main and "ramped up" in main  # as far as it ran
    # the ramp raises the rate from epoch 3 to 4 and the phase switch lowers it: no cut
    assert all(e.epoch != 3 for e in events if e.kind == training_curves.LR_CUT)
    png_bytes = training_curves.curves_png(series, events)
    assert Image.open(io.BytesIO(png_bytes)).size == training_curves.CURVES_PX


def test_a_run_without_outputs_gives_notes_naming_the_stages(tmp_path):
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    page = report.build_report(tmp_path, PARAMS, tracking_run={})
    found = re.findall(r'<section id="(\w+)">', page)
    assert tuple(found) == SECTIONS
    for stage in ("prepare", "train", "evaluate", "explain", "export", "audit"):
        assert f"not available: run <code>dvc repro {stage}</code>" in page, stage
    assert "<img" not in page


def test_a_partial_run_reports_what_it_has(full_run, tmp_path):
    source, _ = full_run
    shutil.copytree(source, tmp_path / "run")
    root = tmp_path / "run"
    for gone in ("metrics/audit.json", "plots/audit", "plots/gradcam", "metrics/export.json"):
        path = root / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    page = report.build_report(root, PARAMS, tracking_run={})
    assert "label issues (the audit stage&#x27;s outputs): not available" in page
    assert "not available: run <code>dvc repro explain</code>" in page
    assert "not available: run <code>dvc repro export</code>" in page
    assert "0.6667 [0.3333, 1.0000]" in page  # the rest is there


def test_params_are_the_ones_dvc_lock_recorded(tmp_path):
    params, source = recorded_params(tmp_path, PARAMS)
    assert params is PARAMS and "params.yaml" in source  # no dvc.lock: params.yaml
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    params:\n      params.yaml:\n"
        "        train:\n          epochs: 3\n          augment:\n            zoom: 0.1\n"
        "  images:\n    params:\n      params.yaml:\n        train.image_size: 48\n"
    )
    params, source = recorded_params(tmp_path, PARAMS)
    assert (params.train.epochs, params.train.augment.zoom, params.train.image_size) == (3, 0.1, 48)
    assert params.train.augment.rotation == PARAMS.train.augment.rotation  # the rest kept
    assert source.startswith("dvc.lock")
    (tmp_path / "dvc.lock").write_text(
        "stages:\n  train:\n    params:\n      params.yaml:\n        train.nope: 1\n"
    )
    params, source = recorded_params(tmp_path, PARAMS)
    assert params is PARAMS and "do not fit" in source


def test_stage_writing_finds_the_stage_of_an_output_or_a_file_inside_it():
    assert stage_writing("metrics/evaluate.json", REPO_ROOT) == "evaluate"
    assert stage_writing("data/prepared/classes.json", REPO_ROOT) == "prepare"
    assert stage_writing("plots/gradcam/correct/grid.png", REPO_ROOT) == "explain"
    assert stage_writing("reports/report.html", REPO_ROOT) == "report"
    assert stage_writing("plots/nowhere.csv", REPO_ROOT) is None


def test_the_stage_writes_the_page_and_logs_it_to_mlflow(full_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    source, _ = full_run
    root = tmp_path / "run"
    shutil.copytree(source, root)
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO_ROOT / "stages/report.py"), run_name="__main__")
    assert stop.value.code == 0
    page = (root / "reports/report.html").read_text(encoding="utf-8")
    assert re.findall(r'<section id="(\w+)">', page) == list(SECTIONS)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("animalcam").experiment_id])
        if r.data.tags.get("mlflow.runName") == "report"
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == [
        "reports/report.html"
    ]
    assert run.info.run_id in page  # the page names the run it is logged to
