"""Fit the classifier: compile, callbacks, warm-up, mixed precision, GPUs, resume.

:func:`train_model` takes the prepared splits and ``train`` params and returns the
trained model (float32, best-val_loss weights), its per-epoch history and its metrics.
It keeps resume state in a directory (animalcam.resume_store) so that a killed run
continues from its last finished epoch; the caller deletes that directory once it has
written its outputs (the train stage does). The parts, each passed in where needed:
a plan (params, strategy, dtype policy, class weights), the resume store, the inputs
(animalcam.training_inputs) and :func:`fit_phase`, which fits one phase.

Training runs in one or two phases: an optional warm-up (``train.warmup_epochs`` with
the backbone frozen at ``train.warmup_learning_rate``), then the main phase with
``train.trainable`` at ``train.learning_rate``, recompiled with a fresh optimizer and
starting from the best weights so far. Epochs are counted across phases, so
``train.epochs`` is the total. ModelCheckpoint, EarlyStopping and ReduceLROnPlateau
watch val_loss over the whole run. A phase that trains backbone layers updates them at
``train.backbone_lr_factor`` times the phase's rate and warms its rate up over
``train.lr_warmup_steps`` steps (animalcam.fine_tuning); a run whose validation accuracy
collapses after a phase switch logs one warning and records it in its metrics.

Speed (docs/benchmarks.md): images come from the image cache (animalcam.image_cache)
when ``train.input`` is "images" and a cache directory is given; a phase with the
backbone frozen trains the head on backbone features computed once (animalcam.features)
unless ``train.backbone_features`` is "off". Resume works in both paths: a fast-path
phase's per-epoch state holds the head and its optimizer, its best checkpoints the
full model.

Reruns: the seed fixes the initial weights, each epoch's order (animalcam.batches), the
augmentations (stateless draws keyed by seed, epoch and batch: animalcam.augmentation)
and, reset every epoch, the dropout masks; with ``train.deterministic`` TensorFlow's op
determinism fixes the rest, so that the same params, data, code and machine give the
same weights and history, bit for bit, resumed or not (docs/benchmarks.md has the cost
and what still changes results: another CPU kind, oneDNN on or off, library versions).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from animalcam import distributed, features, fine_tuning, modeling, precision, resume
from animalcam.batches import steps_per_epoch
from animalcam.dataset import Manifest
from animalcam.errors import DataError, ModelError, ParamsError
from animalcam.feature_store import FeatureStore
from animalcam.params import SpeedParams, TrainParams
from animalcam.resume_store import ResumeStore, Watchers
from animalcam.training_inputs import TrainingInputs

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
class Phase:
    name: str
    end: int  # 0-based epoch index it stops before
    trainable: int | str
    learning_rate: float


@dataclass(frozen=True)
class _Plan:
    """How this process trains: the params and what follows from them and the machine."""

    params: TrainParams
    speed: SpeedParams
    class_names: Sequence[str]
    strategy: tf.distribute.Strategy
    policy: str  # Keras dtype policy
    top_k: int  # train.top_k, at most the number of classes
    class_weight: dict[int, float] | None


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
    backbone_layers: Sequence[str] = (),
    backbone_lr_factor: float = 1.0,
) -> None:
    """Adam + categorical cross-entropy; metrics "accuracy" and "top_k_accuracy".

    The variables of ``backbone_layers`` (layer names) update at ``learning_rate x
    backbone_lr_factor`` (fine_tuning.DiscriminativeAdam; a factor of 1 is plain Adam).
    Under a mixed_float16 model Keras wraps Adam in a LossScaleOptimizer itself (under
    mixed_bfloat16 it needs none: bfloat16 has float32's exponent range).
    """
    optimizer = fine_tuning.DiscriminativeAdam(
        learning_rate, backbone_layers=backbone_layers, backbone_lr_factor=backbone_lr_factor
    )
    model.compile(
        optimizer=optimizer,
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
    speed: SpeedParams | None = None,
    feature_dir: str | Path | None = None,
) -> TrainResult:
    """Train on ``train_set``, validate on ``val_set``; resume from ``state_dir`` if it fits.

    ``strategy`` defaults to :func:`select_strategy`; the train stage passes a
    MultiWorkerMirroredStrategy under ``TF_CONFIG`` (animalcam.distributed: only the chief
    keeps the resume state in ``state_dir``). ``train.batch_size`` is the GLOBAL
    batch: with R replicas each one gets batch_size / R images per step, so the number
    of steps, the learning rate and the results do not depend on how many GPUs a runner
    has. To trade GPUs for speed, raise ``train.batch_size`` (and usually
    ``train.learning_rate``) explicitly, which DVC then records. ``callbacks`` run after
    animalcam's own (e.g. experiment tracking; ``logs`` then hold this epoch's metrics).
    ``cache_dir``: the images stage's output, read when ``train.input`` is "images" (None:
    decode the image files). ``feature_dir``: an animalcam.feature_store folder that the
    frozen-backbone epochs read their plain features from when it holds them, and store
    them in otherwise (None: computed and kept in memory only).
    """
    speed = speed or SpeedParams()  # the defaults: how fast, never what
    plan = _plan(params, speed, class_names, train_set, val_set, strategy)
    if params.deterministic:
        # Process-wide, and TensorFlow has no public way back: the train stage is a process
        # of its own. Ops without a deterministic kernel (a few, on GPUs) then raise.
        tf.config.experimental.enable_op_determinism()
    store = None if feature_dir is None else FeatureStore(feature_dir)
    inputs = TrainingInputs(
        params, len(class_names), train_set, val_set, cache_dir, speed.autotune, store
    )
    expected = resume.fingerprint(asdict(params), class_names, train_set, val_set)
    # Under TF_CONFIG: a non-chief worker keeps its copy of the chief's state in a
    # temporary folder, and a lost worker ends the run with one line (animalcam.distributed).
    cluster = distributed.cluster_of(plan.strategy)
    with (
        distributed.state_directory(plan.strategy, Path(state_dir)) as state_dir,
        distributed.worker_failures(cluster),
    ):
        try:
            store = _open_store(plan, state_dir, expected)
            return _train(plan, store, inputs, callbacks)
        except resume.UnusableStateError as exc:
            # A weights file of the saved state opened but does not load into this model.
            log.warning("ignoring the resume state in %s: %s; starting fresh", state_dir, exc)
            resume.clear_state(state_dir)
            store = _open_store(plan, state_dir, expected)
            return _train(plan, store, inputs, callbacks)


def _open_store(plan: _Plan, state_dir: Path, expected: dict[str, Any]) -> ResumeStore:
    """The run's resume store; on every worker of a cluster, the chief's."""
    store = ResumeStore.open(state_dir, expected, phases(plan.params)[0].name)
    return distributed.share_resume_state(plan.strategy, store)


def _train(plan: _Plan, store: ResumeStore, inputs: TrainingInputs, callbacks) -> TrainResult:
    params, fast_phases = plan.params, []
    if store.state.phase != "done":
        keras.utils.set_random_seed(params.seed)
        with plan.strategy.scope():
            model = _build(params, plan.class_names, plan.policy)
        all_phases = phases(params)
        for i, phase in enumerate(all_phases):
            if store.state.phase == phase.name:
                next_phase = all_phases[i + 1].name if i + 1 < len(all_phases) else "done"
                if fit_phase(model, phase, next_phase, plan, store, inputs, callbacks):
                    fast_phases.append(phase.name)
        del model

    if store.state.best_weights is None:
        raise ModelError(
            "val_loss was never finite, so there is no best model to keep; training "
            "diverged: lower train.learning_rate or check the data."
        )
    # The saved model: float32, outside any strategy, so evaluate, explain and serving
    # on a CPU load a plain float32 model.
    final = _build(params, plan.class_names, "float32", weights="none")
    store.load_best(final)
    trainable_params = modeling.set_trainable(final, params.trainable)
    modeling.set_trainable(final, "all")  # the saved model carries no training-time freeze
    metrics = _metrics(final, trainable_params, plan, store, inputs, fast_phases)
    collapse = fine_tuning.collapse_check(store.state.history)
    metrics["collapse_warning"] = collapse is not None
    metrics["collapse_val_accuracy_before"] = collapse.before if collapse else None
    metrics["collapse_val_accuracy_after"] = collapse.after if collapse else None
    if collapse is not None:
        log.warning(collapse.message(params.trainable))
    log.info(
        "best epoch %d of %d: val_loss %.4f, val_accuracy %.4f",
        *(metrics[k] for k in ("best_epoch", "epochs_run", "best_val_loss", "best_val_accuracy")),
    )
    return TrainResult(model=final, history=list(store.state.history), metrics=metrics)


def fit_phase(
    model: keras.Model,
    phase: Phase,
    next_phase: str,
    plan: _Plan,
    store: ResumeStore,
    inputs: TrainingInputs,
    callbacks: Sequence[keras.callbacks.Callback],
) -> bool:
    """Fit ``model`` through ``phase``, the store saving after every epoch; True when
    the phase ran on the fast path.

    A phase with the backbone frozen fits :func:`features.head_model` (the full
    model's head layers) on precomputed features, unless ``train.backbone_features`` is
    "off"; it then checkpoints the full model all the same.
    """
    params, first = plan.params, store.state.epochs_done
    resuming = store.resuming
    trainable = modeling.set_trainable(model, phase.trainable)
    # Not across workers: the feature pass would gather every worker's features.
    multi_worker = distributed.cluster_of(plan.strategy) is not None
    fast = params.backbone_features == "auto" and phase.trainable == "head" and not multi_worker
    with plan.strategy.scope():
        # Keras models remember the strategy they were created under.
        fitted = features.head_model(model) if fast else model
        _compile(fitted, phase, plan, fast)
        store.restore(model, fitted)
    log.info(
        "phase %s: epochs %d-%d, trainable %s (%d parameters), learning rate %g%s%s",
        *(phase.name, first + 1, phase.end, phase.trainable, trainable, phase.learning_rate),
        " (resumed)" if resuming else "",
        ", head on cached backbone features" if fast else "",
    )
    if first >= phase.end:
        store.end_phase(next_phase)
        store.save()
        return False
    watchers = _watchers(model, store.state_dir, params)
    steps = steps_per_epoch(len(inputs.train_images), params.batch_size)
    warmup = _lr_warmup(phase, params, steps)
    if fast:
        train_ds, val_ds = inputs.feature_batches(model, first, phase.end)
    else:
        train_ds, val_ds = inputs.image_batches(first, phase.end)
    train_ds, val_ds = (distributed.split_batches(plan.strategy, ds) for ds in (train_ds, val_ds))
    fitted.fit(
        train_ds,
        steps_per_epoch=steps,
        epochs=phase.end,
        initial_epoch=first,
        validation_data=val_ds,
        class_weight=plan.class_weight,
        shuffle=False,  # the dataset shuffles itself, per epoch, reproducibly
        # The warm-up first: the resume callback reads the rate each epoch starts with.
        callbacks=[
            _SeedsPerEpoch(model, params.seed),
            *warmup,
            *watchers,
            store.callback(watchers, phase.end, next_phase),
            *callbacks,
        ],
        # A progress bar in a terminal, one line per epoch in logs (dvc repro, CI).
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return fast


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


def phases(params: TrainParams) -> list[Phase]:
    """The optional warm-up, then the main phase; epochs count across phases."""
    result = []
    if params.warmup_epochs > 0:
        result.append(Phase("warmup", params.warmup_epochs, "head", params.warmup_learning_rate))
    result.append(Phase("main", params.epochs, params.trainable, params.learning_rate))
    return result


def _plan(params, speed, class_names, train_set, val_set, strategy) -> _Plan:
    strategy = strategy or select_strategy(speed.prefetch_to_device)
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
    policy = precision.resolve_policy(params.mixed_precision, "train.mixed_precision")
    log.info(
        "training %s on %d images (%d validation), %d classes, policy %s (%s), %d replica(s)",
        params.backbone,
        len(train_set),
        len(val_set),
        n_classes,
        policy,
        precision.describe(policy),
        replicas,
    )
    return _Plan(
        params=params,
        speed=speed,
        class_names=class_names,
        strategy=strategy,
        policy=policy,
        top_k=top_k,
        class_weight=class_weights(train_set.labels, class_names) if balanced else None,
    )


def _build(params: TrainParams, class_names, policy: str, weights: str | None = None):
    return modeling.build_model(
        params.backbone,
        class_names,
        image_size=params.image_size,
        weights=params.weights if weights is None else weights,
        preprocessing=params.preprocessing,
        dense_units=params.dense_units,
        dropout=params.dropout,
        policy=policy,
    )


def trains_backbone(phase: Phase) -> bool:
    """Whether ``phase`` trains backbone layers (it then fine-tunes pretrained weights)."""
    return phase.trainable != "head"


def _lr_warmup(phase: Phase, params: TrainParams, steps: int) -> list[keras.callbacks.Callback]:
    """The learning-rate warm-up of ``phase`` (``steps`` per epoch), if it trains the
    backbone. Not capped at one epoch: on a small dataset an epoch is a handful of
    steps, and a ramp that short let the first unfrozen epoch lose up to a tenth of the
    warm-up's accuracy on the real sample (docs/fine-tuning.md)."""
    if not trains_backbone(phase) or params.lr_warmup_steps == 0:
        return []
    if params.lr_warmup_steps > steps:
        log.info(
            "learning-rate warm-up: %d steps, %.1f epochs of %d steps",
            *(params.lr_warmup_steps, params.lr_warmup_steps / steps, steps),
        )
    return [fine_tuning.LearningRateWarmup(phase.learning_rate, params.lr_warmup_steps)]


def _compile(fitted: keras.Model, phase: Phase, plan: _Plan, fast: bool) -> None:
    params = plan.params
    fine_tunes = trains_backbone(phase) and not fast
    compile_model(
        fitted,
        phase.learning_rate,
        label_smoothing=params.label_smoothing,
        top_k=plan.top_k,
        backbone_layers=(
            [layer.name for layer in modeling.backbone_layers(fitted)] if fine_tunes else ()
        ),
        backbone_lr_factor=params.backbone_lr_factor if fine_tunes else 1.0,
        # XLA under MirroredStrategy fails on replica variables ("Trying to access
        # resource ... located in device"): the head compiles only alone. Under op
        # determinism Keras compiles nothing with XLA (not every XLA op has a
        # deterministic form); asking would only add its warning.
        jit_compile=not params.deterministic
        and (
            plan.speed.head_xla and plan.strategy.num_replicas_in_sync == 1
            if fast
            else plan.speed.train_xla
        ),
    )


def _watchers(model: keras.Model, state_dir: Path, params: TrainParams) -> Watchers:
    """ModelCheckpoint, EarlyStopping and ReduceLROnPlateau on val_loss over the run."""
    return Watchers(
        checkpoint=_FullModelCheckpoint(
            model,
            str(state_dir / resume.BEST_PATTERN),
            monitor="val_loss",
            save_best_only=True,
            save_weights_only=True,
        ),
        early_stopping=keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=params.early_stopping_patience,
            restore_best_weights=True,
            verbose=1,
        ),
        reduce_lr=keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=params.reduce_lr_factor,
            patience=params.reduce_lr_patience,
            min_lr=params.min_lr,
            verbose=1,
        ),
    )


def _metrics(model, trainable_params, plan, store, inputs, fast_phases) -> dict[str, Any]:
    """What metrics/train.json holds."""
    state, history = store.state, store.state.history
    n_train = len(inputs.train_images)
    best = next(row for row in history if row["epoch"] == state.best_epoch)
    # Steady-state throughput: the first epoch of each fit also traces and compiles.
    steady = [row for row in history if not row.get("first_of_fit")] or history
    train_seconds = sum(row["train_seconds"] for row in steady)
    images_per_s = n_train * len(steady) / train_seconds if train_seconds else 0
    return {
        "epochs_run": state.epochs_done,
        "best_epoch": state.best_epoch,
        "best_val_loss": best["val_loss"],
        "best_val_accuracy": best.get("val_accuracy"),
        "best_val_top_k_accuracy": best.get("val_top_k_accuracy"),
        "top_k": plan.top_k,
        "final_lr": history[-1]["lr"],
        "stopped_early": state.stopped_early,
        "resumed_from_epoch": store.resumed_from,
        "sessions": state.sessions,
        "wall_time_s": round(store.wall_time(), 1),
        "train_images_per_s": round(images_per_s, 2),
        "train_images": n_train,
        "val_images": len(inputs.val_images),
        "classes": len(plan.class_names),
        "params_total": int(model.count_params()),
        "params_trainable": trainable_params,
        "replicas": plan.strategy.num_replicas_in_sync,
        "precision": plan.policy,  # the Keras dtype policy it trained under
        "mixed_precision": plan.policy != precision.FLOAT32,  # 16-bit compute (either type)
        "xla": plan.speed.train_xla,
        "input": inputs.kind,
        "backbone_features_phases": ",".join(fast_phases),
        "feature_seconds": round(inputs.feature_seconds, 1),
    }


class _SeedsPerEpoch(keras.callbacks.Callback):
    """At the start of every epoch, sets each seed generator of ``model`` (Dropout's) to
    a state drawn from ``(seed, epoch)`` alone.

    A seed generator advances at every training step, and Keras saves no seed generator
    with the weights, so a resumed run would draw other dropout masks than an
    uninterrupted one; reset per epoch, both draw the same.
    """

    def __init__(self, model: keras.Model, seed: int):
        super().__init__()
        self._states = [v for v in model.variables if v.name == "seed_generator_state"]
        self._seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        if not self._states:
            return
        # Int32 range: Keras folds a seed into it before TensorFlow's stateless ops see it.
        firsts = tf.random.stateless_uniform(
            [len(self._states)], [self._seed, epoch], 0, 2**31 - 2, dtype=tf.int64
        )
        for state, first in zip(self._states, firsts.numpy(), strict=True):
            state.assign(np.array([first, 0], dtype=np.int64))


class _FullModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves ``full_model`` whatever model is being fitted: on the
    fast path Keras fits the head alone, but the best checkpoint must be the whole model
    (backbone + head), which is what later phases and the saved model load."""

    def __init__(self, full_model: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._full_model = full_model

    def set_model(self, model):
        super().set_model(self._full_model)
