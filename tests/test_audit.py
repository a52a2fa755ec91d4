"""Label-issue review: the flagging rule on planted flips, the feature store the audit
shares with training (hit, miss, what its key covers, same vectors either way), and the
audit stage run as a user runs it."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_data
from conftest import REPO_ROOT
from PIL import Image

from animalcam import dataset, feature_store, features, figures, label_audit, modeling, training
from animalcam.batches import BatchSettings, ordered_batches
from animalcam.dataset import FileExamples
from animalcam.errors import DataError
from animalcam.feature_store import FeatureStore
from animalcam.outputs import read_csv
from animalcam.params import AuditParams, SpeedParams, params_from_dict

TINY_TRAIN = {
    "weights": "none",
    "image_size": 32,
    "batch_size": 4,
    "dense_units": 8,
    "epochs": 2,
    "warmup_epochs": 1,
    "trainable": "all",
    "input": "files",
    "feature_copies": 1,
}


def planted(n_classes=4, per_class=40, width=64, flips=8, seed=0):
    """Clustered features (one direction per class, noise around it) and labels with
    ``flips`` of them changed to another class: (features, noisy labels, true labels,
    flipped indices)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, width)) * 3
    truth = np.repeat(np.arange(n_classes), per_class)
    x = centres[truth] + rng.normal(size=(len(truth), width))
    x = np.maximum(x, 0).astype(np.float32)  # ReLU features, as a backbone pools them
    flipped = rng.choice(len(truth), flips, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, n_classes, flips)) % n_classes
    return x, given, truth, flipped


# --- The flagging rule --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_flips_are_flagged_first_with_their_true_class(seed):
    x, given, truth, flipped = planted(seed=seed)
    names = ["cat", "dog", "horse", "spider"]
    audit = label_audit.audit_labels(x, given, names, AuditParams())

    found = set(audit.issues.tolist()) & set(flipped.tolist())
    assert len(found) >= 7  # recall >= 7/8
    assert len(found) / len(audit.issues) >= 0.5  # precision
    assert set(audit.issues[:6].tolist()) <= set(flipped.tolist())  # most likely first
    rows = label_audit.issue_rows(audit, [f"img/{i}.png" for i in range(len(given))], names)
    for row in rows:
        i = int(row[0].split("/")[1].split(".")[0])
        if i in flipped:
            assert row[1] == names[given[i]] and row[2] == names[truth[i]]
    assert [r[4] for r in rows] == list(range(1, len(rows) + 1))
    scores = [r[3] for r in rows]
    assert scores == sorted(scores)  # lowest label quality first


def test_out_of_fold_probabilities_are_distributions_from_heads_that_never_saw_the_image():
    x, given, _, _ = planted(flips=0)
    probs, folds = label_audit.out_of_fold_probabilities(
        x, given, ["a", "b", "c", "d"], folds=5, seed=3, regularization_c=10.0
    )
    assert folds == 5 and probs.shape == (len(given), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    again, _ = label_audit.out_of_fold_probabilities(
        x, given, ["a", "b", "c", "d"], folds=5, seed=3, regularization_c=10.0
    )
    np.testing.assert_array_equal(probs, again)  # seeded
    # Repeats: the fold draws of seeds 3 and 4, averaged.
    twice, _ = label_audit.out_of_fold_probabilities(
        x, given, ["a", "b", "c", "d"], folds=5, seed=3, regularization_c=10.0, repeats=2
    )
    other, _ = label_audit.out_of_fold_probabilities(
        x, given, ["a", "b", "c", "d"], folds=5, seed=4, regularization_c=10.0
    )
    np.testing.assert_allclose(twice, (probs + other) / 2, atol=1e-12)
    assert not np.allclose(probs, other)
    # Labels that are pure noise: a head fitted on them memorises them (160 points in 64
    # dimensions), a head that never saw an image guesses at chance.
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(160, 64))
    labels = np.repeat(np.arange(4), 40)
    probs, _ = label_audit.out_of_fold_probabilities(
        noise, labels, list("abcd"), folds=5, seed=0, regularization_c=1e4
    )
    assert np.mean(probs.argmax(axis=1) == labels) < 0.45


def test_fewer_images_than_folds_reduces_the_folds(caplog):
    x, given, _, _ = planted(per_class=10, flips=0)
    keep = np.concatenate([np.flatnonzero(given != 3), np.flatnonzero(given == 3)[:3]])
    with caplog.at_level(logging.WARNING):
        audit = label_audit.audit_labels(x[keep], given[keep], list("abcd"), AuditParams())
    assert audit.folds == 3
    assert "class 'd' has 3 images; using 3 folds" in caplog.text


def test_a_class_with_one_image_is_a_clear_error():
    x, given, _, _ = planted(per_class=10, flips=0)
    keep = np.concatenate([np.flatnonzero(given != 3), np.flatnonzero(given == 3)[:1]])
    with pytest.raises(DataError, match="class 'd' has a single image"):
        label_audit.audit_labels(x[keep], given[keep], list("abcd"), AuditParams())


def test_a_single_class_or_an_empty_class_flags_nothing_it_cannot_judge():
    x, given, _, _ = planted(flips=0)
    alone = label_audit.audit_labels(x[given == 0], given[given == 0], list("abcd"), AuditParams())
    assert alone.folds == 0 and len(alone.issues) == 0
    np.testing.assert_array_equal(alone.scores, 1.0)
    # Class "e" listed in classes.json but without images: left out, no error.
    audit = label_audit.audit_labels(x, given, list("abcde"), AuditParams())
    assert audit.probabilities.shape[1] == 5 and not audit.probabilities[:, 4].any()


def test_outputs_schema(tmp_path):
    x, given, _, _ = planted(seed=4)
    names = ["cat", "dog", "horse", "spider"]
    paths = []
    for i in range(len(given)):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.new("RGB", (20, 16), (i, 0, 0)).save(paths[-1])
    audit = label_audit.audit_labels(x, given, names, AuditParams(gallery_size=4))
    csv_path, png = tmp_path / "audit/label_issues.csv", tmp_path / "audit/label_issues.png"
    splits = {"train": 120, "val": 40}
    metrics = label_audit.write_audit(
        audit, paths, names, splits, AuditParams(gallery_size=4), csv_path, png
    )

    rows = read_csv(csv_path)
    assert list(rows[0]) == ["path", "given_label", "suggested_label", "score", "rank"]
    assert [r["path"] for r in rows] == [paths[i] for i in audit.issues]
    assert {r["given_label"] for r in rows} <= set(names)
    assert metrics["issues"] == len(rows) and metrics["images_audited"] == 160
    assert metrics["folds"] == 5 and metrics["images_per_split"] == splits
    assert sum(metrics["issues_per_class"].values()) == len(rows)
    assert set(metrics["issues_per_class"]) == set(names)
    assert sum(metrics["issues_per_split"].values()) == len(rows)
    assert metrics["estimated_noise_rate"] == pytest.approx(len(rows) / 160, abs=1e-6)
    assert 0 <= metrics["out_of_fold_accuracy"] <= 1
    cell, title = figures.CELL_PX, figures.TITLE_PX
    assert Image.open(png).size == (4 * cell, cell + title + 40)  # 4 images in a row, a heading


def test_no_issues_still_writes_every_output(tmp_path):
    x, given, _, _ = planted(flips=0, seed=5)
    audit = label_audit.Audit(given, np.eye(4)[given], np.zeros(0, np.int64), 5)
    csv_path, png = tmp_path / "label_issues.csv", tmp_path / "label_issues.png"
    metrics = label_audit.write_audit(
        audit, ["p"] * len(given), list("abcd"), {"train": 160}, AuditParams(), csv_path, png
    )
    assert read_csv(csv_path) == [] and png.stat().st_size > 0
    assert metrics["issues"] == 0 and metrics["estimated_noise_rate"] == 0.0
    del x


# --- The feature store --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    prepared = tiny_data.write_prepared(root, train_per_class=3, val_per_class=1, size=32)
    classes = dataset.read_classes(prepared / "classes.json")
    return root, classes, dataset.read_manifest(prepared / "train.csv", classes, root=root)


def tiny_model(classes, seed=0, image_size=32):
    import keras

    keras.utils.set_random_seed(seed)
    return modeling.build_model("vgg16", classes, image_size=image_size, weights="none")


def batches_of(manifest, batch_size=4, size=32):
    examples = FileExamples.of(manifest, size)
    return lambda: ordered_batches(examples, BatchSettings(batch_size), labels=False)


def test_store_miss_then_hit_gives_the_same_vectors(tmp_path, tiny_split, monkeypatch):
    _, classes, manifest = tiny_split
    model = tiny_model(classes)
    store = FeatureStore(tmp_path / "features")
    computed = store.features("train", model, batches_of(manifest), len(manifest), 4)
    assert store.path("train").is_file()
    direct = features.compute_features(
        features.feature_extractor(model), batches_of(manifest)(), len(manifest)
    )
    np.testing.assert_array_equal(computed, direct)

    def no_compute(*args, **kwargs):
        raise AssertionError("the stored vectors should have been read")

    monkeypatch.setattr(features, "compute_features", no_compute)
    loaded = store.features("train", model, batches_of(manifest), len(manifest), 4)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, computed)


@pytest.mark.parametrize("change", ["weights", "batch_size", "images", "image_size", "policy"])
def test_store_key_change_recomputes(tmp_path, tiny_split, change, caplog):
    root, classes, manifest = tiny_split
    store = FeatureStore(tmp_path / "features")
    store.features("train", tiny_model(classes), batches_of(manifest), len(manifest), 4)
    model, batch_size, size, batches = tiny_model(classes), 4, 32, batches_of(manifest)
    if change == "weights":
        model = tiny_model(classes, seed=1)  # another random init
    elif change == "batch_size":
        batch_size, batches = 3, batches_of(manifest, 3)
    elif change == "images":
        paths = list(reversed(manifest.paths))  # the same images in another order
        examples = FileExamples(paths, manifest.labels, 32)
        batches = lambda: ordered_batches(examples, BatchSettings(4), labels=False)  # noqa: E731
    elif change == "image_size":
        size = 40
        model, batches = tiny_model(classes, image_size=40), batches_of(manifest, size=40)
    else:
        from animalcam import precision

        model = precision.inference_model(model, precision.MIXED_BFLOAT16)
    with caplog.at_level(logging.INFO, logger="animalcam.feature_store"):
        vectors = store.features("train", model, batches, len(manifest), batch_size)
    assert "recomputing" in caplog.text
    expected = {"weights": "weights", "batch_size": "batch_size", "images": "images"}
    assert expected.get(change, change) in caplog.text
    direct = features.compute_features(features.feature_extractor(model), batches(), len(manifest))
    np.testing.assert_array_equal(vectors, direct)
    del root, size


def test_a_damaged_entry_is_recomputed(tmp_path, tiny_split, caplog):
    _, classes, manifest = tiny_split
    model, store = tiny_model(classes), FeatureStore(tmp_path / "features")
    first = store.features("val", model, batches_of(manifest), len(manifest), 4)
    store.path("val").write_bytes(store.path("val").read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = store.features("val", model, batches_of(manifest), len(manifest), 4)
    assert "ignoring" in caplog.text
    np.testing.assert_array_equal(first, again)
    assert np.load(store.path("val"))["vectors"].shape == first.shape  # rewritten whole


def test_model_key_names_what_fixes_the_vectors(tiny_split):
    _, classes, _ = tiny_split
    key = feature_store.model_key(tiny_model(classes), 8)
    assert key["backbone"] == "vgg16" and key["image_size"] == 32 and key["batch_size"] == 8
    assert key["preprocessing"] == "caffe" and key["policy"] == "float32"
    assert set(key["software"]) == {"tensorflow", "keras", "onednn", "op_determinism"}
    assert key == feature_store.model_key(tiny_model(classes), 8)  # same init, same key


def train_once(root, store_dir, classes, train_set, val_set, name):
    params = params_from_dict({"train": TINY_TRAIN}).train
    return training.train_model(
        params,
        classes,
        train_set,
        val_set,
        state_dir=root / f"state-{name}",
        speed=SpeedParams(head_xla=False),
        feature_dir=store_dir,
    )


def test_training_reads_the_audits_features_and_trains_the_same(tmp_path, caplog):
    prepared = tiny_data.write_prepared(tmp_path, train_per_class=4, val_per_class=2, size=32)
    classes = dataset.read_classes(prepared / "classes.json")
    train_set = dataset.read_manifest(prepared / "train.csv", classes, root=tmp_path)
    val_set = dataset.read_manifest(prepared / "val.csv", classes, root=tmp_path)
    plain = train_once(tmp_path, None, classes, train_set, val_set, "plain")

    store_dir = tmp_path / "features"
    params = params_from_dict({"train": TINY_TRAIN}).train
    splits = {"train": train_set, "val": val_set}
    pooled = label_audit.pooled_features(
        params, classes, splits, tmp_path / "no-cache", FeatureStore(store_dir)
    )
    assert pooled.shape == (len(train_set) + len(val_set), 512)
    with caplog.at_level(logging.INFO, logger="animalcam.feature_store"):
        shared = train_once(tmp_path, store_dir, classes, train_set, val_set, "shared")
    assert f"read {len(train_set)} train feature vectors" in caplog.text
    assert f"read {len(val_set)} val feature vectors" in caplog.text
    for a, b in zip(plain.model.get_weights(), shared.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    def curves(history):
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]

    assert curves(plain.history) == curves(shared.history)


# --- The stage ----------------------------------------------------------------------------


def run_audit(root: Path, log_level: str = "WARNING") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.pop("ANIMALCAM_PIPELINE_RUN_ID", None)
    env.update(
        ANIMALCAM_LOG_LEVEL=log_level,
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
    )
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "audit.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_audit_stage_flags_a_planted_flip_and_shares_its_features(tmp_path):
    root = tmp_path / "repo"
    prepared = tiny_data.write_prepared(root, train_per_class=8, val_per_class=3, size=32)
    train_csv = prepared / "train.csv"
    rows = list(csv.reader(train_csv.open(encoding="utf-8")))
    flipped = next(r for r in rows[1:] if r[1] == "cat")  # a red picture ...
    flipped[1] = "horse"  # ... labelled horse (blue)
    with open(train_csv, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    train = {k: v for k, v in TINY_TRAIN.items() if k in ("weights", "image_size", "input")}
    (root / "params.yaml").write_text(
        json.dumps({"train": {**train, "batch_size": 8}, "audit": {"folds": 5, "gallery_size": 4}})
    )

    done = run_audit(root)
    assert done.returncode == 0, done.stderr[-3000:]
    issues = read_csv(root / "plots/audit/label_issues.csv")
    assert issues and issues[0]["path"] == flipped[0]  # the manifest's own path string
    assert issues[0]["given_label"] == "horse" and issues[0]["suggested_label"] == "cat"
    metrics = json.loads((root / "metrics/audit.json").read_text())
    assert metrics["images_audited"] == 33 and metrics["images_per_split"] == {
        "train": 24,
        "val": 9,
    }
    assert metrics["folds"] == 5 and metrics["issues"] == len(issues)
    assert Image.open(root / "plots/audit/label_issues.png").size[0] > 100
    stored = sorted(p.name for p in (root / ".animalcam/features").iterdir())
    assert stored == ["train.npz", "val.npz"]

    again = run_audit(root, log_level="INFO")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "read 24 train feature vectors" in again.stderr
    assert read_csv(root / "plots/audit/label_issues.csv") == issues
