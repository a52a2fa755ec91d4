"""Resume state for training: continue a killed run from its last finished epoch.

After every epoch :class:`ResumeCallback` writes, into a state directory that is NOT a
DVC output (``.train_state/`` at the repository root, git-ignored, so that ``dvc repro``
does not wipe it when it reruns the stage):

- ``epoch-NNN.weights.h5``: model and optimizer state (Keras ``save_weights`` includes
  the optimizer's moments, step count and learning rate) after epoch NNN (1-based);
- ``best-epochNNN.weights.h5``: ModelCheckpoint's best-val_loss weights;
- ``state.json``, written last and atomically, the commit point: epochs done, training
  phase, per-epoch history, the state of ModelCheckpoint, EarlyStopping and
  ReduceLROnPlateau (best value, wait and cooldown counters), timing, and a fingerprint
  of the train params and the data. Weight files it does not name are leftovers of an
  interrupted write and are deleted.

``keras.callbacks.BackupAndRestore`` was not enough: it restores weights, optimizer and
epoch, but not the other callbacks' counters (so EarlyStopping's patience and
ReduceLROnPlateau's plateau would restart), nor the history of earlier epochs, and it
never checks that the saved state belongs to the same params and data.

A state made with other params or data is ignored (and the reason logged); the run
starts fresh. The train stage deletes the directory once its outputs are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras

from animalcam.dataset import Manifest
from animalcam.outputs import write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT = 1  # bump when the layout of state.json changes; older states are then ignored
BEST_PATTERN = "best-epoch{epoch:03d}.weights.h5"  # ModelCheckpoint formats it, 1-based


@dataclass
class TrainingState:
    """Everything needed to continue training after the last finished epoch."""

    fingerprint: dict[str, Any]
    epochs_done: int = 0
    phase: str = ""  # the phase to run next ("warmup", "main") or "done"
    phase_start: int = 0  # epoch (0-based) at which that phase starts or started
    history: list[dict[str, float]] = field(default_factory=list)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    latest_weights: str | None = None  # file in the state dir
    best_weights: str | None = None
    best_epoch: int | None = None  # 1-based
    best_val_loss: float | None = None
    stopped_early: bool = False
    wall_time_s: float = 0.0  # over all sessions, up to the last saved epoch
    sessions: int = 0  # how many processes have worked on this run


def fingerprint(
    train_params: dict[str, Any],
    class_names: Sequence[str],
    train_set: Manifest,
    val_set: Manifest,
) -> dict[str, Any]:
    """What must not change for a saved state to be resumed: params and data.

    The data part hashes each split's paths, labels and file sizes (not the pixels:
    hashing 26k images would cost more than it protects; DVC already reruns the stage
    when the prepared data change).
    """
    data = hashlib.sha256()
    data.update(json.dumps(list(class_names)).encode())
    for split in (train_set, val_set):
        data.update(b"\x00split")
        for path, label, size in zip(split.paths, split.labels, split.sizes, strict=True):
            data.update(f"{path}\x00{label}\x00{size}\n".encode())
    return {"format": FORMAT, "params": train_params, "data": data.hexdigest()}


def load_state(state_dir: str | Path, expected: dict[str, Any]) -> TrainingState | None:
    """The saved state in ``state_dir`` if it matches ``expected`` (see fingerprint).

    Returns None, logging why, when there is nothing to resume or it does not match.
    """
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        state = TrainingState(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        log.warning("ignoring unreadable resume state %s (%s); starting fresh", path, exc)
        return None
    reason = _mismatch(state.fingerprint, expected)
    if reason:
        log.warning("ignoring resume state in %s: %s; starting fresh", state_dir, reason)
        return None
    for name in (state.latest_weights, state.best_weights):
        if name is not None and not (Path(state_dir) / name).is_file():
            log.warning(
                "ignoring resume state in %s: %s is missing; starting fresh", state_dir, name
            )
            return None
    return state


def _mismatch(saved: dict[str, Any], expected: dict[str, Any]) -> str:
    if saved.get("format") != expected["format"]:
        return f"it was written in format {saved.get('format')}, this code uses {FORMAT}"
    if saved.get("params") != expected["params"]:
        old, new = saved.get("params") or {}, expected["params"]
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return "train params changed (" + ", ".join(f"train.{k}" for k in changed) + ")"
    if saved.get("data") != expected["data"]:
        return "the prepared data changed (train.csv, val.csv, classes.json or image files)"
    return ""


def save_state(state_dir: str | Path, state: TrainingState) -> None:
    """Write state.json atomically, then delete weight files it no longer names."""
    state_dir = Path(state_dir)
    write_json(state_dir / STATE_FILE, asdict(state))
    remove_leftovers(state_dir, state)


def remove_leftovers(state_dir: Path, state: TrainingState | None) -> None:
    keep = set() if state is None else {state.latest_weights, state.best_weights}
    for file in state_dir.glob("*.weights.h5"):
        if file.name not in keep:
            file.unlink(missing_ok=True)


def clear_state(state_dir: str | Path) -> None:
    """Delete the resume state (the run finished and its outputs are written)."""
    shutil.rmtree(state_dir, ignore_errors=True)


class ResumeCallback(keras.callbacks.Callback):
    """Saves a :class:`TrainingState` after every epoch and restores callback counters.

    Put it after ModelCheckpoint, EarlyStopping and ReduceLROnPlateau in the callback
    list: its ``on_train_begin`` must run after theirs (which reset their counters) and
    its ``on_epoch_end`` after theirs (so it saves what they decided this epoch).
    ``resuming`` says whether this fit continues a phase part-way (restore every
    counter) or starts a phase (keep the best values, restart the patience counters).
    """

    def __init__(
        self,
        state_dir: Path,
        state: TrainingState,
        *,
        checkpoint: keras.callbacks.ModelCheckpoint,
        early_stopping: keras.callbacks.EarlyStopping,
        reduce_lr: keras.callbacks.ReduceLROnPlateau,
        phase_end: int,
        next_phase: str,
        resuming: bool,
        wall_clock_start: float,
        wall_time_before: float,
    ):
        super().__init__()
        self.state_dir = state_dir
        self.state = state
        self.checkpoint = checkpoint
        self.early_stopping = early_stopping
        self.reduce_lr = reduce_lr
        self.phase_end = phase_end
        self.next_phase = next_phase
        self.resuming = resuming
        self.wall_clock_start = wall_clock_start
        self.wall_time_before = wall_time_before
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._lr = 0.0
        self._first_epoch_of_fit = True
        self._best_before: float | None = None

    def on_train_begin(self, logs=None):
        saved = self.state.callbacks
        es, rlr = saved.get("early_stopping", {}), saved.get("reduce_lr", {})
        if self.state.best_val_loss is not None:
            self.checkpoint.best = self.state.best_val_loss
        if es:
            self.early_stopping.best = es["best"]
            self.early_stopping.best_epoch = es["best_epoch"]
        if rlr:
            self.reduce_lr.best = rlr["best"]
        if self.resuming:
            self.early_stopping.wait = es.get("wait", 0)
            self.reduce_lr.wait = rlr.get("wait", 0)
            self.reduce_lr.cooldown_counter = rlr.get("cooldown_counter", 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        self._train_seconds = 0.0
        self._lr = _learning_rate(self.model)
        self._best_before = self.checkpoint.best

    def on_test_begin(self, logs=None):
        # Validation starts: the training part of the epoch is over.
        self._train_seconds = time.monotonic() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        train_seconds = self._train_seconds or (time.monotonic() - self._epoch_start)
        done = epoch + 1
        row = {"epoch": done, **{k: float(v) for k, v in logs.items() if k != "learning_rate"}}
        row["lr"] = self._lr
        # Timing rides along in the state (not in history.csv, which stays reproducible);
        # the first epoch of a fit also traces the graph, so throughput skips it.
        row["train_seconds"] = train_seconds
        row["first_of_fit"] = float(self._first_epoch_of_fit)
        self._first_epoch_of_fit = False

        state = self.state
        state.history = [r for r in state.history if r["epoch"] < done] + [row]
        state.epochs_done = done
        if self.checkpoint.best is not None and self.checkpoint.best != self._best_before:
            state.best_weights = BEST_PATTERN.format(epoch=done)
            state.best_epoch = done
            state.best_val_loss = float(self.checkpoint.best)
        latest = f"epoch-{done:03d}.weights.h5"
        self.model.save_weights(self.state_dir / latest)
        state.latest_weights = latest
        state.callbacks = {
            "early_stopping": {
                "best": _float_or_none(self.early_stopping.best),
                "best_epoch": int(self.early_stopping.best_epoch),
                "wait": int(self.early_stopping.wait),
            },
            "reduce_lr": {
                "best": _float_or_none(self.reduce_lr.best),
                "wait": int(self.reduce_lr.wait),
                "cooldown_counter": int(self.reduce_lr.cooldown_counter),
            },
        }
        # The phase is over when EarlyStopping (which ran before us) stopped it or its
        # last epoch is done; record that now, so a kill right after this save does not
        # rerun a stopped phase.
        if self.model.stop_training or done >= self.phase_end:
            if self.next_phase == "done":  # a warmup stopped early still leads to "main"
                state.stopped_early = bool(self.model.stop_training) and done < self.phase_end
            state.phase = self.next_phase
            state.phase_start = done
        state.wall_time_s = self.wall_time_before + (time.monotonic() - self.wall_clock_start)
        save_state(self.state_dir, state)


def _learning_rate(model: keras.Model) -> float:
    # The variable is float32: 1e-4 reads back as 9.99999974e-05; report what was meant.
    return float(f"{float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.6g}")


def _float_or_none(value) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return None if value is None else float(value)
    return None
