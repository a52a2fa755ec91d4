"""Fit the classifier: compile, callbacks, warm-up, mixed precision, GPUs, resume.

:func:`train_model` takes the prepared splits and ``train`` params and returns the
trained model (float32, best-val_loss weights), its per-epoch history and its metrics.
It keeps resume state in a directory (see animalcam.resume) so that a killed run
continues from its last finished epoch; the caller deletes that directory once it has
written its outputs (the train stage does).

Training runs in one or two phases: an optional warm-up (``train.warmup_epochs`` with
the backbone frozen at ``train.warmup_learning_rate``), then the main phase with
``train.trainable`` at ``train.learning_rate``, recompiled with a fresh optimizer and
starting from the best weights so far. Epochs are counted across phases, so
``train.epochs`` is the total. ModelCheckpoint, EarlyStopping and ReduceLROnPlateau
watch val_loss over the whole run.

Speed (docs/benchmarks.md): images come from the prepared-image cache
(animalcam.image_cache) when ``train.input`` is "cache" and a cache directory is given;
a phase with the backbone frozen trains the head on backbone features computed once
(animalcam.features) unless ``train.feature_cache`` is "off". Resume works in both
paths: a fast-path phase's per-epoch state holds the head and its optimizer, its best
checkpoints the full model.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from animalcam import features, image_cache, modeling, resume
from animalcam.dataset import (
    Manifest,
    augmentation,
    image_dataset,
    steps_per_epoch,
    training_batches,
    with_autotune,
)
from animalcam.errors import DataError, ModelError, ParamsError
from animalcam.params import TrainParams

log = logging.getLogger(__name__)

# Columns of plots/train/history.csv, one row per epoch (epoch is 1-based).
HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "top_k_accuracy",
    "val_loss",
    "val_accuracy",
    "val_top_k_accuracy",
    "lr",
)


@dataclass
class TrainResult:
    model: keras.Model  # float32, uncompiled, weights of the best val_loss epoch
    history: list[dict[str, float]]  # one dict per epoch, keys HISTORY_COLUMNS and more
    metrics: dict[str, Any]  # what metrics/train.json holds


@dataclass(frozen=True)
class _Phase:
    name: str
    end: int  # 0-based epoch index it stops before
    trainable: int | str
    learning_rate: float


def select_strategy(prefetch_to_device: bool = True) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several; with one GPU and
    ``prefetch_to_device``, OneDeviceStrategy on it; else the default strategy.

    Keras hands the input pipeline to ``strategy.experimental_distribute_dataset``: under
    OneDeviceStrategy (and MirroredStrategy, per replica) that copies the next batches
    to the GPU while the current one trains, i.e. prefetch to device.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    if len(gpus) == 1 and prefetch_to_device:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


def resolve_policy(mixed_precision: str) -> str:
    """Keras dtype policy for ``train.mixed_precision`` ("auto", "on" or "off").

    "auto" is mixed_float16 when a GPU is visible: half the memory traffic and tensor
    cores, while variables and the softmax stay float32. On a CPU float16 is slower
    than float32, so "auto" keeps float32 there.
    """
    if mixed_precision == "on":
        if not tf.config.list_physical_devices("GPU"):
            log.warning("train.mixed_precision is 'on' without a GPU: float16 on CPU is slow")
        return "mixed_float16"
    if mixed_precision == "auto" and tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "float32"


def class_weights(labels: Sequence[int], class_names: Sequence[str]) -> dict[int, float]:
    """Inverse-frequency ("balanced") weight of each class, as scikit-learn computes it."""
    from sklearn.utils.class_weight import compute_class_weight

    present = set(labels)
    absent = [name for i, name in enumerate(class_names) if i not in present]
    if absent:
        raise DataError(
            f"class(es) {', '.join(absent)} have no training images, so "
            "train.class_weight = balanced cannot weight them; fix the data or use 'none'."
        )
    classes = np.arange(len(class_names))
    weights = compute_class_weight("balanced", classes=classes, y=np.asarray(labels))
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def compile_model(
    model: keras.Model,
    learning_rate: float,
    *,
    label_smoothing: float,
    top_k: int,
    jit_compile: bool,
) -> None:
    """Adam + categorical cross-entropy; metrics "accuracy" and "top_k_accuracy".

    Under a mixed_float16 model Keras wraps Adam in a LossScaleOptimizer itself.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=top_k, name="top_k_accuracy"),
        ],
        jit_compile=jit_compile,
    )


def train_model(
    params: TrainParams,
    class_names: Sequence[str],
    train_set: Manifest,
    val_set: Manifest,
    *,
    state_dir: str | Path,
    strategy: tf.distribute.Strategy | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    cache_dir: str | Path | None = None,
) -> TrainResult:
    """Train on ``train_set``, validate on ``val_set``; resume from ``state_dir`` if it fits.

    ``strategy`` defaults to :func:`select_strategy`. ``train.batch_size`` is the GLOBAL
    batch: with R replicas each one gets batch_size / R images per step, so the number
    of steps, the learning rate and the results do not depend on how many GPUs a runner
    has. To trade GPUs for speed, raise ``train.batch_size`` (and usually
    ``train.learning_rate``) explicitly, which DVC then records. ``callbacks`` run after
    animalcam's own (e.g. experiment tracking; ``logs`` then hold this epoch's metrics).
    ``cache_dir``: the cache stage's output, read when ``train.input`` is "cache" (None:
    decode the image files).
    """
    args = (params, class_names, train_set, val_set, Path(state_dir), strategy, callbacks)
    try:
        return _train(*args, cache_dir)
    except resume.UnusableStateError as exc:
        # A weights file of the saved state opened but does not load into this model.
        log.warning("ignoring the resume state in %s: %s; starting fresh", state_dir, exc)
        resume.clear_state(state_dir)
        return _train(*args, cache_dir)


def _train(params, class_names, train_set, val_set, state_dir, strategy, callbacks, cache_dir):
    run = _Session.start(params, class_names, train_set, val_set, state_dir, strategy)
    if params.input == "cache" and cache_dir is not None:
        run.train_cache = image_cache.open_split(cache_dir, "train", train_set, params.image_size)
        run.val_cache = image_cache.open_split(cache_dir, "val", val_set, params.image_size)
        log.info("reading images from the cache in %s", cache_dir)
    if run.state.phase != "done":
        keras.utils.set_random_seed(params.seed)
        with run.strategy.scope():
            model = modeling.build_model(
                params.backbone,
                class_names,
                image_size=params.image_size,
                weights=params.weights,
                preprocessing=params.preprocessing,
                dense_units=params.dense_units,
                dropout=params.dropout,
                policy=run.policy,
            )
        phases = _phases(params)
        for i, phase in enumerate(phases):
            if run.state.phase == phase.name:
                next_phase = phases[i + 1].name if i + 1 < len(phases) else "done"
                run.fit_phase(model, phase, next_phase, callbacks)
        del model

    if run.state.best_weights is None:
        raise ModelError(
            "val_loss was never finite, so there is no best model to keep; training "
            "diverged: lower train.learning_rate or check the data."
        )
    final = _best_model(params, class_names, run.state_dir / run.state.best_weights, run.inherited)
    trainable_params = modeling.set_trainable(final, params.trainable)
    modeling.set_trainable(final, "all")  # the saved model carries no training-time freeze
    metrics = run.metrics(final, trainable_params)
    log.info(
        "best epoch %d of %d: val_loss %.4f, val_accuracy %.4f",
        *(metrics[k] for k in ("best_epoch", "epochs_run", "best_val_loss", "best_val_accuracy")),
    )
    return TrainResult(model=final, history=list(run.state.history), metrics=metrics)


def history_rows(history: Sequence[dict[str, float]]) -> list[list[object]]:
    """``history`` as rows in HISTORY_COLUMNS order (blank where a value is missing)."""
    rows = []
    for entry in history:
        row: list[object] = []
        for column in HISTORY_COLUMNS:
            value = entry.get(column, "")
            row.append(int(value) if column == "epoch" else value)
        rows.append(row)
    return rows


def _phases(params: TrainParams) -> list[_Phase]:
    phases = []
    if params.warmup_epochs > 0:
        phases.append(_Phase("warmup", params.warmup_epochs, "head", params.warmup_learning_rate))
    phases.append(_Phase("main", params.epochs, params.trainable, params.learning_rate))
    return phases


@dataclass
class _Session:
    """One process's work on a training run: the inputs, the resume state, the clock."""

    params: TrainParams
    class_names: Sequence[str]
    train_set: Manifest
    val_set: Manifest
    state_dir: Path
    strategy: tf.distribute.Strategy
    state: resume.TrainingState
    policy: str
    top_k: int
    class_weight: dict[int, float] | None
    started: float  # time.monotonic() when this session began
    wall_before: float  # seconds earlier sessions spent on this run
    resumed_from: int  # epochs done when this session began
    inherited: frozenset[str]  # weights files saved by an earlier session
    train_cache: image_cache.CachedSplit | None = None
    val_cache: image_cache.CachedSplit | None = None
    # Backbone features of (train copies, val), computed by the first fast-path phase.
    _features: tuple[np.ndarray, np.ndarray] | None = None
    feature_seconds: float = 0.0
    fast_phases: tuple[str, ...] = ()

    @classmethod
    def start(cls, params, class_names, train_set, val_set, state_dir, strategy) -> _Session:
        started = time.monotonic()
        strategy = strategy or select_strategy(params.prefetch_to_device)
        replicas = strategy.num_replicas_in_sync
        if params.batch_size < replicas:
            raise ParamsError(
                f"params.yaml: train.batch_size = {params.batch_size} is smaller than the "
                f"{replicas} replicas (GPUs) in use; expected at least {replicas}."
            )
        n_classes = len(class_names)
        top_k = min(params.top_k, n_classes)
        if top_k < params.top_k:
            log.warning("train.top_k = %d > %d classes; using %d", params.top_k, n_classes, top_k)
        balanced = params.class_weight == "balanced"
        weights = class_weights(train_set.labels, class_names) if balanced else None

        expected = resume.fingerprint(asdict(params), class_names, train_set, val_set)
        state = resume.load_state(state_dir, expected)
        if state is None:
            resume.clear_state(state_dir)
            state = resume.TrainingState(fingerprint=expected, phase=_phases(params)[0].name)
        else:
            log.info("resuming from %s after epoch %d", state_dir, state.epochs_done)
        state_dir.mkdir(parents=True, exist_ok=True)
        resume.remove_leftovers(state_dir, state)
        state.sessions += 1
        policy = resolve_policy(params.mixed_precision)
        log.info(
            "training %s on %d images (%d validation), %d classes, policy %s, %d replica(s)",
            params.backbone,
            len(train_set),
            len(val_set),
            n_classes,
            policy,
            replicas,
        )
        return cls(
            params=params,
            class_names=class_names,
            train_set=train_set,
            val_set=val_set,
            state_dir=state_dir,
            strategy=strategy,
            state=state,
            policy=policy,
            top_k=top_k,
            class_weight=weights,
            started=started,
            wall_before=state.wall_time_s,
            resumed_from=state.epochs_done,
            inherited=frozenset({state.latest_weights, state.best_weights} - {None}),
        )

    def fit_phase(self, model, phase: _Phase, next_phase: str, callbacks) -> None:
        """Fit ``model`` through one phase, saving resume state after every epoch.

        A phase with the backbone frozen fits :func:`features.head_model` (the full
        model's head layers) on precomputed features, unless ``train.feature_cache`` is
        "off"; it then checkpoints the full model all the same.
        """
        params, state = self.params, self.state
        resuming = state.epochs_done > state.phase_start
        trainable = modeling.set_trainable(model, phase.trainable)
        fast = params.feature_cache == "auto" and phase.trainable == "head"
        with self.strategy.scope():
            # Keras models remember the strategy they were created under.
            fitted = features.head_model(model) if fast else model
            compile_model(
                fitted,
                phase.learning_rate,
                label_smoothing=params.label_smoothing,
                top_k=self.top_k,
                # XLA under MirroredStrategy fails on replica variables ("Trying to
                # access resource ... located in device"): the head compiles only alone.
                jit_compile=(
                    params.head_xla and self.strategy.num_replicas_in_sync == 1
                    if fast
                    else params.xla
                ),
            )
            if resuming:
                # Mid-phase: weights AND optimizer state (moments, step, reduced lr) of
                # what this phase fits (the head alone on the fast path).
                fitted.optimizer.build(fitted.trainable_variables)
                resume.load_weights(
                    fitted,
                    self.state_dir / state.latest_weights,
                    inherited=state.latest_weights in self.inherited,
                )
            elif state.best_weights is not None:
                # A new phase starts from the best weights so far, with a fresh optimizer.
                optimizer = getattr(model, "optimizer", None)
                resume.load_weights(
                    model,
                    self.state_dir / state.best_weights,
                    inherited=state.best_weights in self.inherited,
                    objects_to_skip=[optimizer] if optimizer is not None else None,
                )
        log.info(
            "phase %s: epochs %d-%d, trainable %s (%d parameters), learning rate %g%s%s",
            phase.name,
            state.epochs_done + 1,
            phase.end,
            phase.trainable,
            trainable,
            phase.learning_rate,
            " (resumed)" if resuming else "",
            ", head on cached backbone features" if fast else "",
        )
        if state.epochs_done >= phase.end:
            state.phase, state.phase_start = next_phase, state.epochs_done
            resume.save_state(self.state_dir, state)
            return

        checkpoint = _FullModelCheckpoint(
            model,
            str(self.state_dir / resume.BEST_PATTERN),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
        )
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=params.early_stopping_patience,
            restore_best_weights=True,
            verbose=1,
        )
        reduce_lr = keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=params.reduce_lr_factor,
            patience=params.reduce_lr_patience,
            min_lr=params.min_lr,
            verbose=1,
        )
        keeper = resume.ResumeCallback(
            self.state_dir,
            state,
            checkpoint=checkpoint,
            early_stopping=early_stopping,
            reduce_lr=reduce_lr,
            phase_end=phase.end,
            next_phase=next_phase,
            resuming=resuming,
            wall_clock_start=self.started,
            wall_time_before=self.wall_before,
        )
        if fast:
            train_ds, val_ds = self._feature_streams(model, state.epochs_done, phase.end)
            self.fast_phases = (*self.fast_phases, phase.name)
        else:
            train_ds, val_ds = self._image_streams(state.epochs_done, phase.end)
        fitted.fit(
            train_ds,
            steps_per_epoch=steps_per_epoch(len(self.train_set), params.batch_size),
            epochs=phase.end,
            initial_epoch=state.epochs_done,
            validation_data=val_ds,
            class_weight=self.class_weight,
            shuffle=False,  # the dataset shuffles itself, per epoch, reproducibly
            callbacks=[checkpoint, early_stopping, reduce_lr, keeper, *callbacks],
            # A progress bar in a terminal, one line per epoch in logs (dvc repro, CI).
            verbose=1 if sys.stdout.isatty() else 2,
        )

    def _image_streams(self, first_epoch: int, end_epoch: int):
        """(training batches, validation batches) of images, from the cache or the files."""
        params, n_classes = self.params, len(self.class_names)
        # A resumed session draws new augmentations (seeded by where it resumes) rather
        # than replaying those of the first epochs.
        augment = augmentation(params.augment, seed=params.seed + 1000 * first_epoch)
        if self.train_cache is not None and self.val_cache is not None:
            train_ds = image_cache.cached_training_batches(
                self.train_cache,
                batch_size=params.batch_size,
                num_classes=n_classes,
                seed=params.seed,
                first_epoch=first_epoch,
                end_epoch=end_epoch,
                shuffle_buffer=params.shuffle_buffer,
                augment=augment,
                autotune=params.autotune,
            )
            val_ds = image_cache.cached_dataset(
                self.val_cache,
                batch_size=params.batch_size,
                num_classes=n_classes,
                autotune=params.autotune,
            )
            return train_ds, val_ds
        train_ds = training_batches(
            self.train_set.paths,
            self.train_set.labels,
            image_size=params.image_size,
            batch_size=params.batch_size,
            num_classes=n_classes,
            seed=params.seed,
            first_epoch=first_epoch,
            end_epoch=end_epoch,
            augment=augment,
        )
        val_ds = image_dataset(
            self.val_set.paths,
            self.val_set.labels,
            image_size=params.image_size,
            batch_size=params.batch_size,
            num_classes=n_classes,
        )
        return with_autotune(train_ds, params.autotune), with_autotune(val_ds, params.autotune)

    def _images_in_order(self, split: Manifest, cached, augment) -> tf.data.Dataset:
        """``split``'s images only, in manifest order, optionally augmented."""
        params = self.params
        if cached is not None:
            return image_cache.cached_dataset(
                cached,
                batch_size=params.batch_size,
                labels=False,
                augment=augment,
                autotune=params.autotune,
            )
        ds = image_dataset(
            split.paths, image_size=params.image_size, batch_size=params.batch_size, augment=augment
        )
        return with_autotune(ds, params.autotune)

    def _feature_streams(self, model: keras.Model, first_epoch: int, end_epoch: int):
        """(training batches, validation batches) of backbone features, computed once."""
        params, n_classes = self.params, len(self.class_names)
        if self._features is None:
            started = time.monotonic()
            extractor = features.feature_extractor(model)
            train_features = features.feature_copies(
                extractor,
                lambda augment: self._images_in_order(self.train_set, self.train_cache, augment),
                len(self.train_set),
                params.feature_copies,
                # Seeded per copy, so a resumed run recomputes the very same copies.
                lambda k: augmentation(params.augment, seed=params.seed + 7919 * k),
            )
            val_features = features.compute_features(
                extractor,
                self._images_in_order(self.val_set, self.val_cache, None),
                len(self.val_set),
                "val features",
            )
            self._features = (train_features, val_features)
            self.feature_seconds += time.monotonic() - started
            log.info(
                "computed %d x %d training and %d validation feature vectors in %.1f s",
                params.feature_copies,
                len(self.train_set),
                len(self.val_set),
                self.feature_seconds,
            )
        train_features, val_features = self._features
        train_ds = features.feature_batches(
            train_features,
            np.asarray(self.train_set.labels),
            num_classes=n_classes,
            batch_size=params.batch_size,
            seed=params.seed,
            first_epoch=first_epoch,
            end_epoch=end_epoch,
        )
        val_ds = features.feature_dataset(
            val_features,
            np.asarray(self.val_set.labels),
            num_classes=n_classes,
            batch_size=params.batch_size,
        )
        return train_ds, val_ds

    def metrics(self, model: keras.Model, trainable_params: int) -> dict[str, Any]:
        """What metrics/train.json holds."""
        state, history = self.state, self.state.history
        best = next(row for row in history if row["epoch"] == state.best_epoch)
        # Steady-state throughput: the first epoch of each fit also traces and compiles.
        steady = [row for row in history if not row.get("first_of_fit")] or history
        train_seconds = sum(row["train_seconds"] for row in steady)
        images_per_s = len(self.train_set) * len(steady) / train_seconds if train_seconds else 0
        return {
            "epochs_run": state.epochs_done,
            "best_epoch": state.best_epoch,
            "best_val_loss": best["val_loss"],
            "best_val_accuracy": best.get("val_accuracy"),
            "best_val_top_k_accuracy": best.get("val_top_k_accuracy"),
            "top_k": self.top_k,
            "final_lr": history[-1]["lr"],
            "stopped_early": state.stopped_early,
            "resumed_from_epoch": self.resumed_from,
            "sessions": state.sessions,
            "wall_time_s": round(self.wall_before + time.monotonic() - self.started, 1),
            "train_images_per_s": round(images_per_s, 2),
            "train_images": len(self.train_set),
            "val_images": len(self.val_set),
            "classes": len(self.class_names),
            "params_total": int(model.count_params()),
            "params_trainable": trainable_params,
            "replicas": self.strategy.num_replicas_in_sync,
            "mixed_precision": self.policy == "mixed_float16",
            "xla": self.params.xla,
            "input": "cache" if self.train_cache is not None else "files",
            "feature_cache_phases": ",".join(self.fast_phases),
            "feature_seconds": round(self.feature_seconds, 1),
        }


class _FullModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves ``full_model`` whatever model is being fitted: on the
    fast path Keras fits the head alone, but the best checkpoint must be the whole model
    (backbone + head), which is what later phases and the saved model load."""

    def __init__(self, full_model: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._full_model = full_model

    def set_model(self, model):
        super().set_model(self._full_model)


def _best_model(
    params: TrainParams, class_names: Sequence[str], weights: Path, inherited: frozenset[str]
) -> keras.Model:
    """A fresh float32 model holding the best weights: what gets saved and served.

    Built outside any distribution strategy and without mixed precision, so that
    evaluate, explain and serving on a CPU load a plain float32 model.
    """
    model = modeling.build_model(
        params.backbone,
        class_names,
        image_size=params.image_size,
        weights="none",
        preprocessing=params.preprocessing,
        dense_units=params.dense_units,
        dropout=params.dropout,
        policy="float32",
    )
    resume.load_weights(model, weights, inherited=weights.name in inherited)
    return model
