"""A training run's resume store: its state, the phase changes, and the epoch callback.

:class:`ResumeStore` opens the state directory (animalcam.resume holds the file format
and its checks), keeps the :class:`animalcam.resume.TrainingState` of the run, loads
the weights a phase starts from, records each finished epoch and moves the run from
one phase to the next. :class:`ResumeCallback` is the Keras side: after every epoch it
hands the store what ModelCheckpoint, EarlyStopping and ReduceLROnPlateau decided.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from animalcam import resume
from animalcam.resume import TrainingState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watchers:
    """The Keras callbacks whose decisions the state keeps (they watch val_loss)."""

    checkpoint: keras.callbacks.ModelCheckpoint
    early_stopping: keras.callbacks.EarlyStopping
    reduce_lr: keras.callbacks.ReduceLROnPlateau

    def __iter__(self):
        return iter((self.checkpoint, self.early_stopping, self.reduce_lr))


class ResumeStore:
    """The resume state of one training run, as this process continues it."""

    def __init__(self, state_dir: Path, state: TrainingState):
        self.state_dir = state_dir
        self.state = state
        self.started = time.monotonic()
        self.wall_before = state.wall_time_s  # seconds earlier sessions spent
        self.resumed_from = state.epochs_done
        # Files an earlier process wrote: one that does not load means a fresh start.
        self.inherited = frozenset({state.latest_weights, state.best_weights} - {None})

    @classmethod
    def open(cls, state_dir: Path, expected: dict[str, Any], first_phase: str) -> ResumeStore:
        """The saved state if it matches ``expected`` (see resume.fingerprint), else a
        fresh one at ``first_phase`` (the directory is then emptied)."""
        state = resume.load_state(state_dir, expected)
        if state is None:
            resume.clear_state(state_dir)
            state = TrainingState(fingerprint=expected, phase=first_phase)
        else:
            log.info("resuming from %s after epoch %d", state_dir, state.epochs_done)
        state_dir.mkdir(parents=True, exist_ok=True)
        resume.remove_leftovers(state_dir, state)
        state.sessions += 1
        return cls(state_dir, state)

    @property
    def resuming(self) -> bool:
        """Whether the current phase is part-way done (its epochs continue)."""
        return self.state.epochs_done > self.state.phase_start

    def wall_time(self) -> float:
        """Seconds spent on this run, over all sessions."""
        return self.wall_before + (time.monotonic() - self.started)

    def restore(self, model: keras.Model, fitted: keras.Model) -> None:
        """Load what the current phase starts from into compiled ``fitted`` (``model``,
        or its head alone on the fast path).

        Mid-phase: weights AND optimizer state (moments, step, reduced learning rate)
        of ``fitted``. A new phase: the best weights so far into ``model``, with a
        fresh optimizer. Nothing before the first epoch.
        """
        state = self.state
        if self.resuming:
            fitted.optimizer.build(fitted.trainable_variables)
            self._load(fitted, state.latest_weights)
        elif state.best_weights is not None:
            optimizer = getattr(model, "optimizer", None)
            skip = [optimizer] if optimizer is not None else None
            self._load(model, state.best_weights, objects_to_skip=skip)

    def load_best(self, model: keras.Model) -> None:
        self._load(model, self.state.best_weights)

    def _load(self, model: keras.Model, name: str, **kwargs: Any) -> None:
        path = self.state_dir / name
        resume.load_weights(model, path, inherited=name in self.inherited, **kwargs)

    def end_phase(self, next_phase: str, *, stopped_early: bool = False) -> None:
        """Move on to ``next_phase`` from the last finished epoch (not saved yet)."""
        if next_phase == "done":  # a warmup stopped early still leads to "main"
            self.state.stopped_early = stopped_early
        self.state.phase = next_phase
        self.state.phase_start = self.state.epochs_done

    def record_epoch(self, row: dict[str, float], model: keras.Model, new_best: float | None):
        """Keep epoch ``row["epoch"]``: its history row, ``model``'s weights and
        optimizer, and ``new_best``, the val_loss of a new best epoch (None: no new best;
        ModelCheckpoint saved that epoch's weights)."""
        state, done = self.state, int(row["epoch"])
        state.history = [r for r in state.history if r["epoch"] < done] + [row]
        state.epochs_done = done
        if new_best is not None:
            state.best_weights = resume.BEST_PATTERN.format(epoch=done)
            state.best_epoch = done
            state.best_val_loss = float(new_best)
        latest = f"epoch-{done:03d}.weights.h5"
        model.save_weights(self.state_dir / latest)
        state.latest_weights = latest

    def save(self) -> None:
        """Commit the state (state.json, written last and atomically)."""
        self.state.wall_time_s = self.wall_time()
        resume.save_state(self.state_dir, self.state)

    def callback(self, watchers: Watchers, phase_end: int, next_phase: str) -> ResumeCallback:
        """The callback that saves this store after every epoch of a phase ending
        before epoch ``phase_end`` (0-based) and followed by ``next_phase``."""
        return ResumeCallback(self, watchers, phase_end, next_phase, self.resuming)


class ResumeCallback(keras.callbacks.Callback):
    """Saves the store after every epoch and gives the watchers back their counters.

    Put it after the watchers in the callback list: its ``on_train_begin`` must run
    after theirs (which reset their counters) and its ``on_epoch_end`` after theirs (so
    it saves what they decided this epoch). ``resuming`` says whether this fit
    continues a phase part-way (restore every counter) or starts a phase (keep the best
    values, restart the patience counters).
    """

    def __init__(
        self,
        store: ResumeStore,
        watchers: Watchers,
        phase_end: int,
        next_phase: str,
        resuming: bool,
    ):
        super().__init__()
        self.store = store
        self.watchers = watchers
        self.phase_end = phase_end
        self.next_phase = next_phase
        self.resuming = resuming
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._lr = 0.0
        self._first_epoch_of_fit = True
        self._best_before: float | None = None

    def on_train_begin(self, logs=None):
        state = self.store.state
        restore_counters(self.watchers, state.callbacks, state.best_val_loss, self.resuming)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        self._train_seconds = 0.0
        self._lr = _learning_rate(self.model)
        self._best_before = self.watchers.checkpoint.best

    def on_test_begin(self, logs=None):
        # Validation starts: the training part of the epoch is over.
        self._train_seconds = time.monotonic() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        done = epoch + 1
        row = {"epoch": done, **{k: float(v) for k, v in logs.items() if k != "learning_rate"}}
        row["lr"] = self._lr
        # 1-based epoch within its phase: 1 marks a phase switch (fine_tuning.collapse_check).
        row["phase_epoch"] = float(done - self.store.state.phase_start)
        # Timing rides along in the state (not in history.csv, which stays reproducible);
        # the first epoch of a fit also traces the graph, so throughput skips it.
        row["train_seconds"] = self._train_seconds or (time.monotonic() - self._epoch_start)
        row["first_of_fit"] = float(self._first_epoch_of_fit)
        self._first_epoch_of_fit = False

        store = self.store
        best = self.watchers.checkpoint.best
        new_best = best if best is not None and best != self._best_before else None
        store.record_epoch(row, self.model, new_best)
        store.state.callbacks = counters(self.watchers)
        # The phase is over when EarlyStopping (which ran before us) stopped it or its
        # last epoch is done; record that now, so a kill right after this save does not
        # rerun a stopped phase.
        if self.model.stop_training or done >= self.phase_end:
            stopped = bool(self.model.stop_training) and done < self.phase_end
            store.end_phase(self.next_phase, stopped_early=stopped)
        store.save()


# Keras callbacks have no public way to save and restore their state (no get/set
# state; BackupAndRestore keeps weights and epoch only), so these two functions read
# and write the attributes the callbacks keep their counters in. test_training's
# test_resume_restores_the_callbacks_counters pins that Keras reads them back.


def counters(watchers: Watchers) -> dict[str, dict[str, Any]]:
    """EarlyStopping's and ReduceLROnPlateau's best value and counters, for the state."""
    es, rlr = watchers.early_stopping, watchers.reduce_lr
    return {
        "early_stopping": {
            "best": _float_or_none(es.best),
            "best_epoch": int(es.best_epoch),
            "wait": int(es.wait),
        },
        "reduce_lr": {
            "best": _float_or_none(rlr.best),
            "wait": int(rlr.wait),
            "cooldown_counter": int(rlr.cooldown_counter),
        },
    }


def restore_counters(
    watchers: Watchers, saved: dict[str, Any], best_val_loss: float | None, resuming: bool
) -> None:
    """Give the watchers back the best values (always) and the patience counters (only
    ``resuming`` a phase part-way) that :func:`counters` saved."""
    es, rlr = saved.get("early_stopping", {}), saved.get("reduce_lr", {})
    if best_val_loss is not None:
        watchers.checkpoint.best = best_val_loss
    if es:
        watchers.early_stopping.best = es["best"]
        watchers.early_stopping.best_epoch = es["best_epoch"]
    if rlr:
        watchers.reduce_lr.best = rlr["best"]
    if resuming:
        watchers.early_stopping.wait = es.get("wait", 0)
        watchers.reduce_lr.wait = rlr.get("wait", 0)
        watchers.reduce_lr.cooldown_counter = rlr.get("cooldown_counter", 0)


def _learning_rate(model: keras.Model) -> float:
    # The variable is float32: 1e-4 reads back as 9.99999974e-05; report what was meant.
    return float(f"{float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.6g}")


def _float_or_none(value) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return None if value is None else float(value)
    return None
