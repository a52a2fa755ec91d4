"""Resume state for training: continue a killed run from its last finished epoch.

After every epoch animalcam.resume_store's callback writes, into a state directory that is NOT a
DVC output (``.train_state/`` at the repository root, git-ignored, so that ``dvc repro``
does not wipe it when it reruns the stage):

- ``epoch-NNN.weights.h5``: model and optimizer state (Keras ``save_weights`` includes
  the optimizer's moments, step count and learning rate) after epoch NNN (1-based);
- ``best-epochNNN.weights.h5``: ModelCheckpoint's best-val_loss weights;
- ``state.json``, written last and atomically, the commit point: epochs done, training
  phase, per-epoch history, the state of ModelCheckpoint, EarlyStopping and
  ReduceLROnPlateau (best value, wait and cooldown counters), timing, and a fingerprint
  of the train params, the data, the training code and the library versions. Weight
  files it does not name are leftovers of an interrupted write and are deleted.

``keras.callbacks.BackupAndRestore`` was not enough: it restores weights, optimizer and
epoch, but not the other callbacks' counters (so EarlyStopping's patience and
ReduceLROnPlateau's plateau would restart), nor the history of earlier epochs, and it
never checks that the saved state belongs to the same params and data.

A state is ignored, with one warning that says why, and the run starts fresh, when it
was made with other params, data, training code (the animalcam modules training imports)
or library versions (TensorFlow, Keras, NumPy, h5py), and when it cannot be used: a
state.json that is not UTF-8 or not JSON, lacks fields or holds values of the wrong type,
a weights file that is missing, truncated or does not load. The train stage deletes the
directory once its outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import tensorflow as tf

from animalcam.dataset import Manifest
from animalcam.errors import StateError
from animalcam.fingerprints import changed_keys, code_digest
from animalcam.outputs import write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FORMAT = 2  # bump when the layout of state.json changes; older states are then ignored
BEST_PATTERN = "best-epoch{epoch:03d}.weights.h5"  # ModelCheckpoint formats it, 1-based
WEIGHTS_SUFFIX = ".weights.h5"
PHASES = ("warmup", "main", "done")
TRAINING_MODULE = "training"  # it and the animalcam modules it imports make up the code


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


class UnusableStateError(Exception):
    """A weights file of a saved state does not load: the run must start fresh."""


def fingerprint(
    train_params: dict[str, Any],
    class_names: Sequence[str],
    train_set: Manifest,
    val_set: Manifest,
) -> dict[str, Any]:
    """What must not change for a saved state to be resumed: params, data, code, libraries.

    The data part hashes each split's paths, labels and file sizes (not the pixels:
    hashing every image would cost more than it protects; DVC already reruns the stage
    when the prepared data change). The code part hashes the training module and the
    animalcam modules it imports (animalcam.fingerprints.code_digest); the libraries
    part names the versions of those that compute and store the weights.
    """
    data = hashlib.sha256()
    data.update(json.dumps(list(class_names)).encode())
    for split in (train_set, val_set):
        data.update(b"\x00split")
        for path, label, size in zip(split.paths, split.labels, split.sizes, strict=True):
            data.update(f"{path}\x00{label}\x00{size}\n".encode())
    return {
        "format": FORMAT,
        "params": train_params,
        "data": data.hexdigest(),
        "code": code_digest(TRAINING_MODULE),
        "libraries": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose change could change or misread the saved weights."""
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }


def load_state(state_dir: str | Path, expected: dict[str, Any]) -> TrainingState | None:
    """The saved state in ``state_dir`` if it is intact and matches ``expected`` (see
    :func:`fingerprint`).

    Returns None when there is nothing to resume, and also, after one warning that says
    why, when the state cannot be used: the caller then starts fresh.
    """
    state_dir = Path(state_dir)
    path = state_dir / STATE_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    state, reason = _read_state(path)
    if state is not None:
        reason = _mismatch(state.fingerprint, expected) or _weights_problem(state_dir, state)
    if reason:
        log.warning("ignoring the resume state in %s: %s; starting fresh", state_dir, reason)
        return None
    return state


def _read_state(path: Path) -> tuple[TrainingState | None, str]:
    """(the state, "") or (None, what is wrong with the file)."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return None, f"{path.name} is not UTF-8 text"
    except (ValueError, RecursionError) as exc:
        return None, f"{path.name} is not valid JSON ({exc})"
    except OSError as exc:
        return None, f"{path.name} cannot be read ({exc.strerror or exc})"
    reason = _invalid(raw)
    return (None, f"{path.name} {reason}") if reason else (TrainingState(**raw), "")


def _invalid(raw: Any) -> str:
    """What keeps a decoded state.json from being resumed, "" when nothing does."""
    if not isinstance(raw, dict):
        return "does not hold a JSON object"
    names = {f.name for f in fields(TrainingState)}
    missing, unknown = sorted(names - raw.keys()), sorted(raw.keys() - names)
    if missing:
        return "lacks " + ", ".join(missing)
    if unknown:
        return "has unknown fields " + ", ".join(unknown)
    state = TrainingState(**raw)
    rows = state.history if isinstance(state.history, list) else []
    epochs = [row.get("epoch") if isinstance(row, dict) else None for row in rows]
    checks = {
        "fingerprint": isinstance(state.fingerprint, dict),
        "epochs_done": _count(state.epochs_done),
        "phase": state.phase in PHASES,
        "phase_start": _count(state.phase_start)
        and _count(state.epochs_done)
        and state.phase_start <= state.epochs_done,
        # One row per finished epoch, in order, every value a number (NaN allowed).
        "history": isinstance(state.history, list)
        and epochs == list(range(1, len(rows) + 1))
        and len(rows) == state.epochs_done
        and all(_number(value) for row in rows for value in row.values()),
        "callbacks": _callbacks_valid(state.callbacks),
        "latest_weights": _weights_name(state.latest_weights)
        and (state.latest_weights is not None or state.epochs_done == 0),
        "best_weights": _weights_name(state.best_weights),
        "best_epoch": (state.best_weights is None and state.best_epoch is None)
        or (state.best_epoch in epochs and _number(state.best_val_loss)),
        "stopped_early": isinstance(state.stopped_early, bool),
        "wall_time_s": _number(state.wall_time_s),
        "sessions": _count(state.sessions),
    }
    bad = [name for name, ok in checks.items() if not ok]
    return f"holds unusable values in {', '.join(bad)}" if bad else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _weights_name(name: Any) -> bool:
    # A bare file name: a state.json never makes training read outside its directory.
    return name is None or (
        isinstance(name, str) and name.endswith(WEIGHTS_SUFFIX) and Path(name).name == name
    )


def _callbacks_valid(saved: Any) -> bool:
    """{} (no epoch yet) or what ResumeCallback saves: EarlyStopping's and
    ReduceLROnPlateau's best value and counters."""
    if saved == {}:
        return True
    layout = {
        "early_stopping": ("best", "best_epoch", "wait"),
        "reduce_lr": ("best", "wait", "cooldown_counter"),
    }
    if not isinstance(saved, dict) or saved.keys() != layout.keys():
        return False
    for name, keys in layout.items():
        values = saved[name]
        if not isinstance(values, dict) or values.keys() != set(keys):
            return False
        best_ok = values["best"] is None or _number(values["best"])
        if not best_ok or not all(_count(values[key]) for key in keys if key != "best"):
            return False
    return True


def _weights_problem(state_dir: Path, state: TrainingState) -> str:
    """Why a weights file the state names cannot be used, "" when each one opens.

    Opening takes milliseconds and catches a truncated or overwritten file (HDF5 checks
    its signature and its recorded length); a file that opens but does not fit the model
    is caught when it is loaded (:func:`load_weights`).
    """
    for name in dict.fromkeys((state.latest_weights, state.best_weights)):
        if name is None:
            continue
        try:
            with h5py.File(state_dir / name, "r"):
                pass
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc})"
    return ""


def load_weights(model: keras.Model, path: Path, *, inherited: bool, **kwargs: Any) -> None:
    """``model.load_weights(path, **kwargs)``, where ``path`` is a file of the state.

    With ``inherited`` (an earlier process saved it), a file that does not load raises
    :class:`UnusableStateError`, so that the caller discards the state and starts fresh.
    A file this process wrote must load; its failure propagates unchanged.
    """
    try:
        model.load_weights(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if not inherited:
            raise
        raise UnusableStateError(f"{path.name} does not load ({exc})") from exc


def _mismatch(saved: dict[str, Any], expected: dict[str, Any]) -> str:
    if saved.get("format") != expected["format"]:
        return f"it was written in format {saved.get('format')}, this code uses {FORMAT}"
    if saved.get("code") != expected["code"]:
        changed = changed_keys(saved.get("code"), expected["code"])
        return "the training code changed since it was saved (" + ", ".join(changed) + ")"
    if saved.get("libraries") != expected["libraries"]:
        old = saved.get("libraries") if isinstance(saved.get("libraries"), dict) else {}
        changed = [
            f"{name} {old.get(name)} -> {expected['libraries'].get(name)}"
            for name in changed_keys(old, expected["libraries"])
        ]
        return "library versions changed (" + ", ".join(changed) + ")"
    if saved.get("params") != expected["params"]:
        changed = changed_keys(saved.get("params"), expected["params"])
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
    for file in state_dir.glob("*" + WEIGHTS_SUFFIX):
        if file.name not in keep:
            file.unlink(missing_ok=True)


def clear_state(state_dir: str | Path) -> None:
    """Delete the resume state (the run finished, or the state is not to be resumed).

    Raises StateError, saying what to delete, when that fails.
    """
    state_dir = Path(state_dir)
    try:
        if state_dir.is_dir() and not state_dir.is_symlink():
            shutil.rmtree(state_dir)
        else:
            state_dir.unlink(missing_ok=True)
    except OSError as exc:
        raise StateError(
            f"cannot delete the resume state {state_dir} ({exc.strerror or exc}); delete it "
            f"by hand (rm -rf {state_dir}) and run again."
        ) from None
