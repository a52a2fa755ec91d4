"""Fine-tuning mechanisms (issue 12): discriminative rates, the rate warm-up, the
collapse guard, the defaults against the study's recipe, and resume with them."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
from test_training import InterruptAfter, Interrupted, splits, tiny_params

from animalcam import modeling, training
from animalcam.fine_tuning import Collapse, DiscriminativeAdam, LearningRateWarmup, collapse_check
from animalcam.params import SpeedParams, params_from_dict

# The study's exact recipe, one set of -S overrides away from the defaults (README).
STUDY = {
    "warmup_epochs": 0,
    "backbone_lr_factor": 1,
    "lr_warmup_steps": 0,
    "preprocessing": "rescale",
}
NO_AUGMENT = {
    "rotation": 0.0,
    "translate": 0.0,
    "shear": 0.0,
    "zoom": 0.0,
    "horizontal_flip": False,
}


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return modeling.build_model("vgg16", ["a", "b", "c"], image_size=32, dense_units=8)


def batch(seed: int = 1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical([0, 1, 2, 0], 3)
    return images, labels


def weights_after_steps(optimizer: keras.optimizers.Optimizer, steps: int) -> list[np.ndarray]:
    """The tiny model's weights after ``steps`` steps of ``optimizer`` on one batch."""
    model = tiny_model()
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    images, labels = batch()
    for _ in range(steps):
        model.train_on_batch(images, labels)
    return [w.numpy() for w in model.weights]


def backbone_names() -> list[str]:
    return [layer.name for layer in modeling.backbone_layers(tiny_model())]


def test_factor_one_is_plain_adam_exactly():
    plain = weights_after_steps(keras.optimizers.Adam(1e-3), 3)
    factor_one = weights_after_steps(
        DiscriminativeAdam(1e-3, backbone_layers=backbone_names(), backbone_lr_factor=1.0), 3
    )
    for a, b in zip(plain, factor_one, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_factor_scales_the_first_step_of_backbone_variables_only():
    lr = 1e-2  # large steps, far above float32 rounding of the weights
    start = [w.numpy() for w in tiny_model().weights]
    plain = weights_after_steps(keras.optimizers.Adam(lr), 1)
    scaled = weights_after_steps(
        DiscriminativeAdam(lr, backbone_layers=backbone_names(), backbone_lr_factor=0.1), 1
    )
    paths = [w.path for w in tiny_model().weights]
    names = set(backbone_names())
    moved_backbone = moved_head = 0
    for path, w0, a, b in zip(paths, start, plain, scaled, strict=True):
        plain_delta, scaled_delta = a - w0, b - w0
        if names & set(path.split("/")[:-1]):
            np.testing.assert_allclose(scaled_delta, 0.1 * plain_delta, rtol=1e-2, atol=1e-7)
            moved_backbone += int(np.abs(plain_delta).max() > 1e-3)
        else:
            np.testing.assert_allclose(scaled_delta, plain_delta, rtol=1e-4, atol=1e-7)
            moved_head += int(np.abs(plain_delta).max() > 1e-3)
    assert moved_backbone >= 13 and moved_head >= 2  # 13 VGG16 convolutions; dense, logits


def test_the_optimizer_round_trips_through_its_config():
    optimizer = DiscriminativeAdam(1e-4, backbone_layers=["block1_conv1"], backbone_lr_factor=0.1)
    config = keras.saving.serialize_keras_object(optimizer)
    again = keras.saving.deserialize_keras_object(config)
    assert isinstance(again, DiscriminativeAdam)
    assert again.backbone_layers == ("block1_conv1",)
    assert again.backbone_lr_factor == pytest.approx(0.1)


class RateRecorder(keras.callbacks.Callback):
    """The learning rate each step trains at (after the warm-up set it)."""

    def __init__(self, reduce_after_epoch: int | None = None):
        super().__init__()
        self.rates: list[float] = []
        self.reduce_after_epoch = reduce_after_epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.reduce_after_epoch:  # as ReduceLROnPlateau does
            self.model.optimizer.learning_rate = 1e-3


def fit_small(callbacks, epochs=2, model=None):
    if model is None:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = np.ones((16, 2), "float32"), np.ones((16, 1), "float32")
    model.fit(x, y, batch_size=4, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)
    return model


def test_the_warmup_rises_linearly_then_leaves_the_rate_alone():
    recorder = RateRecorder(reduce_after_epoch=0)
    model = fit_small([LearningRateWarmup(0.01, 3), recorder])
    # 4 steps per epoch: 1/3, 2/3, 3/3 of the rate, then the full rate; after epoch 1
    # a plateau callback lowers it, and the warm-up does not undo that.
    assert recorder.rates == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01] + [1e-3] * 4)

    # Resumed past the warm-up (the optimizer has taken 8 steps): no warm-up again.
    again = RateRecorder()
    fit_small([LearningRateWarmup(0.01, 3), again], epochs=1, model=model)
    assert again.rates == pytest.approx([1e-3] * 4)


def test_the_warmup_continues_where_a_resumed_optimizer_stopped():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    fit_small([LearningRateWarmup(0.01, 6)], epochs=1, model=model)  # 4 steps taken
    recorder = RateRecorder()
    fit_small([LearningRateWarmup(0.01, 6), recorder], epochs=1, model=model)
    assert recorder.rates == pytest.approx([0.01 * s / 6 for s in (5, 6, 6, 6)])


class PlateauCut(keras.callbacks.Callback):
    """Multiplies the rate by ``factor`` at the end of epoch ``epoch``, as
    ReduceLROnPlateau does."""

    def __init__(self, epoch: int, factor: float):
        super().__init__()
        self.epoch, self.factor = epoch, factor

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            rate = float(self.model.optimizer.learning_rate.numpy())
            self.model.optimizer.learning_rate = rate * self.factor


def test_a_plateau_cut_during_a_ramp_longer_than_an_epoch_carries_through_it():
    recorder = RateRecorder()
    fit_small([LearningRateWarmup(0.01, 6), recorder, PlateauCut(0, 0.2)])
    # 4 steps per epoch: the ramp's first 4 steps at the full target, then the cut
    # (x0.2) at the end of epoch 1 lowers the rest of the ramp and what follows it.
    first = [0.01 * s / 6 for s in (1, 2, 3, 4)]
    second = [0.002 * 5 / 6, 0.002, 0.002, 0.002]
    assert recorder.rates == pytest.approx(first + second, rel=1e-5)


def test_a_run_resumed_mid_ramp_continues_from_the_restored_rate():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    fit_small([LearningRateWarmup(0.01, 8), PlateauCut(0, 0.5)], epochs=1, model=model)
    # 4 steps done at 0.01 x 1/8..4/8, then halved: the optimizer holds 0.0025.
    recorder = RateRecorder()
    fit_small([LearningRateWarmup(0.01, 8), recorder], epochs=1, model=model)
    assert recorder.rates == pytest.approx([0.005 * s / 8 for s in (5, 6, 7, 8)], rel=1e-5)


def test_zero_warmup_steps_keep_the_rate():
    recorder = RateRecorder()
    fit_small([LearningRateWarmup(0.01, 0), recorder], epochs=1)
    assert recorder.rates == pytest.approx([0.01] * 4)


def rows(*accuracies_and_phase_epochs):
    return [
        {"epoch": i + 1, "val_accuracy": acc, "phase_epoch": phase_epoch}
        for i, (acc, phase_epoch) in enumerate(accuracies_and_phase_epochs)
    ]


def test_the_guard_fires_when_the_first_epoch_after_a_switch_loses_half():
    history = rows((0.5, 1), (0.7, 2), (0.12, 1), (0.2, 2))
    collapse = collapse_check(history)
    assert collapse == Collapse(switch_epoch=3, before=0.7, after=0.12)
    message = collapse.message("all")
    assert "fell from 0.70 to 0.12" in message
    assert "backbone was unfrozen" in message
    for fix in ("train.learning_rate", "train.backbone_lr_factor", "train.lr_warmup_steps"):
        assert fix in message


@pytest.mark.parametrize(
    "history",
    [
        rows((0.5, 1), (0.7, 2), (0.36, 1)),  # fell, but by less than half
        rows((0.5, 1), (0.7, 2), (0.2, 3)),  # no phase switch
        rows((0.7, 1), (0.1, 2), (0.1, 3)),  # one phase (the study's): nothing to compare
        [],
    ],
)
def test_the_guard_stays_quiet_otherwise(history):
    assert collapse_check(history) is None


def test_defaults_warm_up_the_head_then_fine_tune_gently():
    p = params_from_dict({}).train
    assert training.phases(p) == [
        training.Phase("warmup", 2, "head", 1e-3),
        training.Phase("main", 15, "all", 1e-4),
    ]
    assert (p.backbone_lr_factor, p.lr_warmup_steps, p.preprocessing) == (0.1, 50, "backbone")


def test_the_study_overrides_give_plain_adam_on_every_variable_from_step_one():
    p = params_from_dict({"train": STUDY}).train
    assert training.phases(p) == [training.Phase("main", 15, "all", 1e-4)]
    (phase,) = training.phases(p)
    assert training._lr_warmup(phase, p, steps=690) == []
    plan = training._Plan(
        params=p,
        speed=SpeedParams(),
        class_names=["a", "b", "c"],
        strategy=training.select_strategy(),
        policy="float32",
        top_k=3,
        class_weight=None,
    )
    model = tiny_model()
    modeling.set_trainable(model, phase.trainable)
    training._compile(model, phase, plan, fast=False)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-4)
    images, labels = batch()
    model.train_on_batch(images, labels)
    study = [w.numpy() for w in model.weights]
    plain = weights_after_steps(keras.optimizers.Adam(1e-4), 1)
    for a, b in zip(study, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_equals_an_uninterrupted_run_with_the_new_defaults(tmp_path, caplog):
    classes, train_set, val_set = splits(tmp_path)
    # The defaults' shape (head warm-up, then all with factor and warm-up), tiny.
    # A 4-step LR ramp over 3-step epochs: the kill lands in the middle of the ramp.
    params = tiny_params(
        epochs=3, warmup_epochs=1, augment=NO_AUGMENT, input="files", lr_warmup_steps=4
    )
    assert params.trainable == "all" and params.backbone_lr_factor == 0.1

    whole = training.train_model(params, classes, train_set, val_set, state_dir=tmp_path / "a")
    with pytest.raises(Interrupted):  # killed after epoch 2, the first fine-tuning epoch
        training.train_model(
            params,
            classes,
            train_set,
            val_set,
            state_dir=tmp_path / "b",
            callbacks=[InterruptAfter(epoch=1)],
        )
    resumed = training.train_model(params, classes, train_set, val_set, state_dir=tmp_path / "b")

    assert resumed.metrics["resumed_from_epoch"] == 2
    keys = ("epoch", "loss", "val_loss", "val_accuracy", "lr", "phase_epoch")
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, rel=1e-5)
    assert [row["phase_epoch"] for row in whole.history] == [1, 1, 2]
    # The main phase's first epoch starts its ramp at 1/4 of the rate, the second epoch
    # at step 4 of 4 (3 steps/epoch), resumed or not.
    assert whole.history[1]["lr"] == pytest.approx(1e-4 / 4, rel=1e-5)
    assert whole.history[2]["lr"] == pytest.approx(1e-4, rel=1e-5)
    for a, b in zip(whole.model.weights, resumed.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert "collapse_warning" in whole.metrics


def test_training_logs_the_collapse_once_and_records_it(tmp_path, caplog, monkeypatch):
    classes, train_set, val_set = splits(tmp_path)
    params = tiny_params(epochs=2, warmup_epochs=1, augment=NO_AUGMENT)
    # Stand in for a collapse: every history is read as one.
    monkeypatch.setattr(
        training.fine_tuning,
        "collapse_check",
        lambda history: Collapse(2, before=0.7, after=0.12),
    )
    with caplog.at_level(logging.WARNING, logger="animalcam"):
        result = training.train_model(params, classes, train_set, val_set, state_dir=tmp_path / "s")
    warnings = [r for r in caplog.records if "fell from 0.70 to 0.12" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert result.metrics["collapse_warning"] is True
    assert result.metrics["collapse_val_accuracy_before"] == 0.7
    assert result.metrics["collapse_val_accuracy_after"] == 0.12
