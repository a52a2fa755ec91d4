"""A corrupt, truncated or stale resume state (.train_state/) is discarded with one
warning and training starts fresh; it is never resumed after the training code or the
libraries changed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import keras
import pytest
from test_training import InterruptAfter, Interrupted, splits, tiny_params

from animalcam import fingerprints, resume, training
from animalcam.params import as_dict

PARAMS = {"epochs": 2, "trainable": "head", "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """(data root, state dir) of a run killed after its first epoch (of two)."""
    root = tmp_path_factory.mktemp("killed")
    classes, train_set, val_set = splits(root)
    state_dir = root / ".train_state"
    with pytest.raises(Interrupted):
        training.train_model(
            tiny_params(**PARAMS),
            classes,
            train_set,
            val_set,
            state_dir=state_dir,
            callbacks=[InterruptAfter(epoch=0)],
        )
    return root, state_dir


@pytest.fixture
def state(killed_run, tmp_path):
    """A fresh copy of the killed run's state: (state dir, saved state.json, expected)."""
    root, saved_dir = killed_run
    state_dir = Path(shutil.copytree(saved_dir, tmp_path / ".train_state"))
    classes, train_set, val_set = splits(root)
    expected = resume.fingerprint(as_dict(tiny_params(**PARAMS)), classes, train_set, val_set)
    return state_dir, json.loads((state_dir / resume.STATE_FILE).read_text()), expected


def edit(state_dir: Path, **fields) -> None:
    raw = json.loads((state_dir / resume.STATE_FILE).read_text())
    raw.update(fields)
    (state_dir / resume.STATE_FILE).write_text(json.dumps(raw))


def without(field: str):
    def damage(state_dir: Path, saved: dict) -> None:
        del saved[field]
        (state_dir / resume.STATE_FILE).write_text(json.dumps(saved))

    return damage


def truncate(name_field: str):
    def damage(state_dir: Path, saved: dict) -> None:
        weights = state_dir / saved[name_field]
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    return damage


# kind -> (how to damage the state, what the warning says)
DAMAGE = {
    "not json": (
        lambda d, s: (d / resume.STATE_FILE).write_text('{"epochs_done": 1,'),
        "state.json is not valid JSON",
    ),
    "empty": (lambda d, s: (d / resume.STATE_FILE).write_bytes(b""), "is not valid JSON"),
    "not utf-8": (
        lambda d, s: (d / resume.STATE_FILE).write_bytes(b'{"phase": "\xff\xfe"}'),
        "state.json is not UTF-8 text",
    ),
    "a list": (lambda d, s: (d / resume.STATE_FILE).write_text("[1, 2]"), "not hold a JSON"),
    "field missing": (without("history"), "state.json lacks history"),
    "unknown field": (lambda d, s: edit(d, extra=1), "has unknown fields extra"),
    "count as text": (lambda d, s: edit(d, epochs_done="1"), "unusable values in epochs_done"),
    "boolean count": (lambda d, s: edit(d, sessions=True), "unusable values in sessions"),
    "unknown phase": (lambda d, s: edit(d, phase="cooldown"), "unusable values in phase"),
    "history of text": (lambda d, s: edit(d, history=[{"epoch": "one"}]), "values in history"),
    "callbacks cut": (lambda d, s: edit(d, callbacks={"reduce_lr": {}}), "values in callbacks"),
    "weights outside": (
        lambda d, s: edit(d, latest_weights="../../escape.weights.h5"),
        "unusable values in latest_weights",
    ),
    "state is a folder": (
        lambda d, s: ((d / resume.STATE_FILE).unlink(), (d / resume.STATE_FILE).mkdir()),
        "state.json cannot be read",
    ),
    "latest weights missing": (
        lambda d, s: (d / s["latest_weights"]).unlink(),
        "epoch-001.weights.h5 is missing",
    ),
    "latest weights truncated": (
        truncate("latest_weights"),
        "epoch-001.weights.h5 cannot be read (Unable to synchronously open file (truncated",
    ),
    "best weights truncated": (truncate("best_weights"), "best-epoch001.weights.h5 cannot be"),
    "best weights garbage": (
        lambda d, s: (d / s["best_weights"]).write_bytes(b"\x89HDF\r\n" + bytes(500)),
        "best-epoch001.weights.h5 cannot be read",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_unusable_state_is_ignored_with_one_warning(kind, state, caplog):
    state_dir, saved, expected = state
    assert resume.load_state(state_dir, expected).epochs_done == 1  # intact, it resumes
    damage, reason = DAMAGE[kind]
    damage(state_dir, saved)

    with caplog.at_level(logging.WARNING, logger="animalcam"):
        assert resume.load_state(state_dir, expected) is None

    assert len(caplog.records) == 1
    assert f"ignoring the resume state in {state_dir}: " in caplog.text
    assert reason in caplog.text and "starting fresh" in caplog.text


@pytest.mark.parametrize(
    ("part", "value", "reason"),
    [
        ("code", {"training.py": "0" * 64}, "the training code changed since it was saved"),
        ("libraries", {"tensorflow": "2.0.0"}, "library versions changed (tensorflow 2.0.0 ->"),
    ],
)
def test_state_from_other_code_or_libraries_is_never_resumed(part, value, reason, state, caplog):
    state_dir, saved, expected = state
    saved["fingerprint"][part] = {**saved["fingerprint"][part], **value}
    (state_dir / resume.STATE_FILE).write_text(json.dumps(saved))

    with caplog.at_level(logging.WARNING, logger="animalcam"):
        assert resume.load_state(state_dir, expected) is None
    assert reason in caplog.text
    if part == "code":
        assert "(training.py)" in caplog.text  # names what changed


def test_the_code_fingerprint_covers_the_modules_that_train():
    digests = fingerprints.code_digest(resume.TRAINING_MODULE)
    for module in (
        "training",
        "resume",
        "modeling",
        "layers",
        "backbones",
        "dataset",
        "features",
        "image_cache",
        "params",
        "batches",
        "resume_store",
        "training_inputs",
        "augmentation",
    ):
        assert len(digests[f"{module}.py"]) == 64
    assert "serving.py" not in digests  # serving code does not change how a model trains


def train_again(killed_run, state_dir, caplog):
    root, _ = killed_run
    classes, train_set, val_set = splits(root)
    with caplog.at_level(logging.WARNING, logger="animalcam"):
        return training.train_model(
            tiny_params(**PARAMS), classes, train_set, val_set, state_dir=state_dir
        )


def test_truncated_weights_mean_a_fresh_run(killed_run, state, caplog):
    state_dir, saved, _ = state
    truncate("latest_weights")(state_dir, saved)

    result = train_again(killed_run, state_dir, caplog)

    warnings = [r.getMessage() for r in caplog.records if "resume state" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"ignoring the resume state in {state_dir}: epoch-001.weights.h5 cannot be read ("
    )
    assert result.metrics["resumed_from_epoch"] == 0
    assert result.metrics["sessions"] == 1
    assert [row["epoch"] for row in result.history] == [1, 2]


@pytest.mark.filterwarnings("ignore:Skipping:UserWarning")  # Keras on the foreign file
def test_weights_that_open_but_do_not_load_mean_a_fresh_run(killed_run, state, caplog):
    state_dir, saved, _ = state
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save_weights(state_dir / saved["latest_weights"])  # a valid file, another model

    result = train_again(killed_run, state_dir, caplog)

    warnings = [r.getMessage() for r in caplog.records if "resume state" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"ignoring the resume state in {state_dir}: epoch-001.weights.h5 does not load ("
    )
    assert result.metrics["resumed_from_epoch"] == 0
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_state_dir_that_is_a_file_is_replaced(killed_run, tmp_path, caplog):
    state_dir = tmp_path / ".train_state"
    state_dir.write_text("not a folder")

    result = train_again(killed_run, state_dir, caplog)

    assert result.metrics["epochs_run"] == 2
    assert (state_dir / resume.STATE_FILE).is_file()
