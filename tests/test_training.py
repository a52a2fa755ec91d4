"""Training: the stage's outputs, resume after a kill, callbacks' state, two replicas."""

from __future__ import annotations

import json
import logging
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import pytest
import tiny_data

from animalcam import dataset, modeling, resume, training
from animalcam.batches import steps_per_epoch
from animalcam.errors import DataError
from animalcam.outputs import read_csv
from animalcam.params import as_dict, params_from_dict
from animalcam.resume_store import ResumeStore, Watchers

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Small enough to train in seconds on a CPU: 32 px, random init, 8 dense units; no head
# warm-up unless a test asks for one (the default's two epochs need train.epochs >= 3);
# float32 unless a test forces 16-bit compute, so every CPU computes the same numbers.
TINY = {
    "weights": "none",
    "image_size": 32,
    "batch_size": 4,
    "dense_units": 8,
    "warmup_epochs": 0,
    "mixed_precision": "off",
}


def tiny_params(**overrides):
    return params_from_dict({"train": {**TINY, **overrides}}).train


def splits(root: Path):
    prepared = tiny_data.write_prepared(root)
    classes = dataset.read_classes(prepared / "classes.json")
    train_set = dataset.read_manifest(prepared / "train.csv", classes, root=root)
    val_set = dataset.read_manifest(prepared / "val.csv", classes, root=root)
    return classes, train_set, val_set


class Interrupted(Exception):
    """Stands in for a kill: raised once the state of epoch ``after`` is saved."""


class InterruptAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"killed after epoch {epoch + 1}")


class Recorder(keras.callbacks.Callback):
    """Records which epochs ran and the optimizer's step count when training began."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []
        self.start_iterations: int | None = None

    def on_train_begin(self, logs=None):
        self.start_iterations = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_train_stage_writes_model_metrics_and_history(tmp_path, monkeypatch):
    tiny_data.write_prepared(tmp_path)
    train = {**TINY, "epochs": 2, "warmup_epochs": 1, "trainable": 1}
    (tmp_path / "params.yaml").write_text(json.dumps({"train": train}))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    images = runpy.run_path(str(REPO_ROOT / "stages" / "images.py"), run_name="images_stage")
    stage = runpy.run_path(str(REPO_ROOT / "stages" / "train.py"), run_name="train_stage")

    images["main"]()  # data/images: the images train reads (train.input: images)
    stage["main"]()

    history = read_csv("plots/train/history.csv")
    assert list(history[0]) == list(training.HISTORY_COLUMNS)
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert float(history[0]["lr"]) == pytest.approx(1e-3)  # warm-up learning rate
    # Then train.learning_rate, warmed up over train.lr_warmup_steps (50): the first at 1/50.
    assert float(history[1]["lr"]) == pytest.approx(1e-4 / 50, rel=1e-5)
    metrics = json.loads(Path("metrics/train.json").read_text())
    assert metrics["epochs_run"] == 2
    assert metrics["best_epoch"] in (1, 2)
    best = history[metrics["best_epoch"] - 1]
    assert metrics["best_val_loss"] == pytest.approx(float(best["val_loss"]))
    assert metrics["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]))
    assert metrics["wall_time_s"] > 0 and metrics["train_images_per_s"] > 0
    head = (512 * 8 + 8) + (8 * 3 + 3)
    block5 = 3 * (3 * 3 * 512 * 512 + 512)
    assert metrics["params_trainable"] == head + block5  # trainable: 1 = the top block
    assert metrics["replicas"] == 1 and metrics["mixed_precision"] is False
    assert metrics["precision"] == "float32"  # the policy it trained under
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("animalcam").experiment_id
    [train_run] = client.search_runs([experiment], "tags.`animalcam.stage` = 'train'")
    assert train_run.data.params["precision"] == "float32"  # ... and in its MLflow run
    assert metrics["input"] == "images"
    assert metrics["backbone_features_phases"] == "warmup"  # head-only warm-up on features
    assert metrics["collapse_warning"] in (True, False)  # the guard ran (tiny data: either)
    model = modeling.load_model("models/model.keras")
    assert modeling.class_names(model) == ["cat", "dog", "horse"]
    assert model.get_layer("block1_conv1").trainable  # saved without the training freeze
    assert model.get_layer("block1_conv1").compute_dtype == "float32"
    assert not Path(".train_state").exists()  # a finished run leaves no resume state


def test_training_resumes_after_a_kill_at_the_next_epoch(tmp_path):
    classes, train_set, val_set = splits(tmp_path)
    params = tiny_params(epochs=3, trainable="head", learning_rate=1e-3)
    state_dir = tmp_path / ".train_state"

    with pytest.raises(Interrupted):
        training.train_model(
            params,
            classes,
            train_set,
            val_set,
            state_dir=state_dir,
            callbacks=[InterruptAfter(epoch=0)],
        )
    saved = json.loads((state_dir / resume.STATE_FILE).read_text())
    assert saved["epochs_done"] == 1
    first_epoch = saved["history"][0]

    recorder = Recorder()
    result = training.train_model(
        params, classes, train_set, val_set, state_dir=state_dir, callbacks=[recorder]
    )

    assert recorder.epochs == [1, 2]  # 0-based: epochs 2 and 3 ran, epoch 1 did not
    steps = steps_per_epoch(len(train_set), params.batch_size)
    assert recorder.start_iterations == steps  # optimizer state came back too
    assert [row["epoch"] for row in result.history] == [1, 2, 3]  # each epoch once
    assert result.history[0] == first_epoch
    assert result.metrics["resumed_from_epoch"] == 1
    assert result.metrics["sessions"] == 2
    assert result.metrics["epochs_run"] == 3

    # Killed after training but before the stage wrote its outputs: nothing trains again.
    again = Recorder()
    rerun = training.train_model(
        params, classes, train_set, val_set, state_dir=state_dir, callbacks=[again]
    )
    assert again.epochs == []
    assert rerun.history == result.history
    weights = [w.numpy() for w in rerun.model.weights]
    for a, b in zip(weights, [w.numpy() for w in result.model.weights], strict=True):
        assert (a == b).all()


def test_resume_restores_the_callbacks_counters(tmp_path):
    state = resume.TrainingState(
        fingerprint={},
        epochs_done=4,
        phase="main",
        phase_start=2,
        best_val_loss=0.5,
        callbacks={
            "early_stopping": {"best": 0.5, "best_epoch": 1, "wait": 2},
            "reduce_lr": {"best": 0.5, "wait": 1, "cooldown_counter": 0},
        },
    )
    for resuming in (True, False):
        state.phase_start = 2 if resuming else 4
        watchers = Watchers(
            checkpoint=keras.callbacks.ModelCheckpoint(str(tmp_path / "b.weights.h5")),
            early_stopping=keras.callbacks.EarlyStopping(patience=3),
            reduce_lr=keras.callbacks.ReduceLROnPlateau(patience=3),
        )
        keeper = ResumeStore(tmp_path, state).callback(watchers, phase_end=8, next_phase="done")
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        for callback in [*watchers, keeper]:  # the order fit calls them in
            callback.set_model(model)
            callback.on_train_begin()

        assert watchers.checkpoint.best == 0.5
        assert watchers.early_stopping.best == 0.5
        assert watchers.early_stopping.best_epoch == 1
        assert watchers.reduce_lr.best == 0.5
        # Mid-phase the patience counters carry on; a new phase restarts them.
        assert watchers.early_stopping.wait == (2 if resuming else 0)
        assert watchers.reduce_lr.wait == (1 if resuming else 0)
        # Keras reads the restored counters back: one more epoch without improvement
        # reaches EarlyStopping's patience (3) only when its wait carried on.
        watchers.early_stopping.on_epoch_end(4, {"val_loss": 0.9})
        assert model.stop_training is resuming


def test_state_from_other_params_or_data_is_ignored(tmp_path, caplog):
    classes, train_set, val_set = splits(tmp_path)
    params = tiny_params()
    state_dir = tmp_path / "state"
    saved = resume.fingerprint(as_dict(params), classes, train_set, val_set)
    resume.save_state(state_dir, resume.TrainingState(fingerprint=saved, phase="main"))

    assert resume.load_state(state_dir, saved).phase == "main"
    with caplog.at_level(logging.WARNING):
        other_params = as_dict(tiny_params(learning_rate=1e-3, epochs=20))
        assert (
            resume.load_state(
                state_dir, resume.fingerprint(other_params, classes, train_set, val_set)
            )
            is None
        )
        fewer = dataset.Manifest(train_set.paths[1:], train_set.labels[1:], train_set.sizes[1:])
        assert (
            resume.load_state(
                state_dir, resume.fingerprint(as_dict(params), classes, fewer, val_set)
            )
            is None
        )
    assert "train params changed (train.epochs, train.learning_rate)" in caplog.text
    assert "the prepared data changed" in caplog.text


def test_balanced_class_weights():
    weights = training.class_weights([0, 0, 0, 1], ["cat", "dog"])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    with pytest.raises(DataError, match="horse have no training images"):
        training.class_weights([0, 1], ["cat", "dog", "horse"])


def test_single_cpu_uses_the_default_strategy():
    assert training.select_strategy().num_replicas_in_sync == 1


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf

# Two logical CPUs stand in for two GPUs; this must happen before TF initialises.
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, {tests!r})
from pathlib import Path
from test_training import splits, tiny_params
from animalcam import modeling, training

root = Path({root!r})
classes, train_set, val_set = splits(root)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
params = tiny_params(epochs=1, trainable="head", mixed_precision="on")
result = training.train_model(params, classes, train_set, val_set,
                              state_dir=root / "state", strategy=strategy)
modeling.save_model(result.model, root / "model.keras")
print(json.dumps(result.metrics))
"""


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path):
    script = textwrap.dedent(MIRRORED_SCRIPT).format(tests=str(TESTS), root=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])

    assert metrics["replicas"] == 2
    assert metrics["mixed_precision"] is True
    assert metrics["epochs_run"] == 1
    model = modeling.load_model(tmp_path / "model.keras")
    assert model.get_layer("dense").compute_dtype == "float32"  # exported as float32
