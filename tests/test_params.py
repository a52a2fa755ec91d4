import dataclasses
import datetime
import math
import os
import reprlib
import subprocess
import sys
import typing
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

from animalcam import environment
from animalcam.errors import EnvironmentVariableError, ParamsError, SourceNotFoundError
from animalcam.params import RENAMED, Params, Switch, as_dict, load_params, params_from_dict


def test_repository_params_yaml_spells_out_every_default():
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert as_dict(params_from_dict(raw)) == as_dict(Params())
    # Every key of every section is written out, so `dvc params diff` shows all changes.
    assert set(raw) == {f.name for f in dataclasses.fields(Params)}
    for section in raw:
        assert set(raw[section]) == set(as_dict(Params())[section]), section


def test_reference_study_defaults():
    p = load_params(REPO_ROOT / "params.yaml")
    assert p.data.source == "kaggle"
    assert p.prepare.val_split == 0.15
    t = p.train
    assert (t.backbone, t.weights, t.image_size, t.batch_size, t.epochs) == (
        "vgg16",
        "imagenet",
        224,
        32,
        15,
    )
    assert t.learning_rate == 1e-4
    assert t.trainable == "all"
    assert t.early_stopping_patience == 5


def test_missing_keys_take_defaults():
    p = params_from_dict({"train": {"epochs": 3}})
    assert p.train.epochs == 3
    assert p.train.batch_size == 32
    assert p.prepare == Params().prepare


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"train": {"learning_rat": 0.1}},
            r"unknown key 'train.learning_rat'. Did you mean 'learning_rate'\?",
        ),
        ({"tran": {}}, r"unknown key 'tran'. Did you mean 'train'\?"),
        (
            {"train": {"augment": {"rotate": 1}}},
            r"'train.augment.rotate'. Did you mean 'rotation'\?",
        ),
        (
            {"train": {"epochs": "ten"}},
            r"train.epochs = 'ten' has the wrong type; expected an integer",
        ),
        ({"train": {"epochs": 2.5}}, r"train.epochs = 2.5 has the wrong type"),
        (
            {"speed": {"train_xla": 1}},
            r"speed.train_xla = 1 has the wrong type; expected true or false",
        ),
        ({"train": {"epochs": True}}, r"train.epochs = True has the wrong type"),
        (
            {"prepare": {"val_split": 0.7}},
            r"prepare.val_split = 0.7 is not allowed; expected a fraction in \(0, 0.5\]",
        ),
        ({"prepare": {"val_split": 0}}, r"prepare.val_split = 0.0 is not allowed"),
        (
            {"train": {"learning_rate": -1e-3}},
            r"train.learning_rate = -0.001 is not allowed; expected a number in \(0, 10\]",
        ),
        ({"train": {"trainable": "some"}}, r"train.trainable = 'some' is not allowed"),
        ({"train": {"trainable": 0}}, r"train.trainable = 0 is not allowed"),
        (
            {"train": {"backbone": "vgg19"}},
            r"train.backbone = 'vgg19' is not allowed; expected 'convnext_tiny', "
            r"'efficientnetv2b0' or 'vgg16'\.",
        ),
        ({"train": {"epochs": 3, "warmup_epochs": 3}}, r"train.warmup_epochs = 3 is not allowed"),
        ({"prepare": {"class_set": "mine"}}, r"prepare.class_set = 'mine'"),
        ({"train": []}, r"train should be a mapping"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (
            {"train": {"autotune": False}},
            "params.yaml: train.autotune was renamed to speed.autotune; move it to the speed "
            "section (dvc exp run -S speed.autotune=...).",
        ),
        (
            {"train": {"feature_cache": "off"}},
            "params.yaml: train.feature_cache was renamed to train.backbone_features; move it "
            "to the train section (dvc exp run -S train.backbone_features=...).",
        ),
        (
            {"cache": {"encoding": "png"}},
            "params.yaml: the section cache was renamed to images; rename it there.",
        ),
        (
            {"train": {"input": "cache"}},
            "params.yaml: train.input: cache was renamed to images; write train.input: images "
            "instead.",
        ),
    ],
)
def test_a_renamed_key_is_one_line_naming_the_new_one(raw, line):
    with pytest.raises(ParamsError) as caught:
        params_from_dict(raw)
    assert str(caught.value) == line


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_every_renamed_key_points_at_a_key_that_exists(old):
    new = RENAMED[old]
    *sections, name = new.split(".")
    obj = Params()
    for section in sections:
        obj = getattr(obj, section)
    assert hasattr(obj, name), new
    with pytest.raises(ParamsError, match=f"{old} was renamed to {new}"):
        params_from_dict(_nested(old, {} if "." not in old else True))


def test_speed_switches_leave_every_stage_section_alone():
    """What the resume state and the stages' params deps see does not move when a
    speed switch does."""
    fast = params_from_dict({"speed": {"train_xla": True, "evaluate_batch_size": 8}})
    for section in ("train", "evaluate", "explain", "images"):
        assert as_dict(getattr(fast, section)) == as_dict(getattr(Params(), section))


def test_numbers_yaml_reads_as_strings_are_accepted():
    # PyYAML reads `1e-4` (no dot) as a string; users write it that way.
    p = params_from_dict(yaml.safe_load("train:\n  learning_rate: 1e-4\n"))
    assert p.train.learning_rate == pytest.approx(1e-4)


def test_trainable_accepts_a_number_of_blocks():
    assert params_from_dict({"train": {"trainable": 2}}).train.trainable == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"params\.yaml not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


# --- Every key, every kind of bad value: one ParamsError naming the key ---------------


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type hint of every setting, nested sections included."""
    leaves = {}
    for name, hint in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            leaves.update(_leaf_types(hint, key + "."))
        else:
            leaves[key] = hint
    return leaves


LEAF_TYPES = _leaf_types(Params)
DAY = datetime.date(2024, 1, 31)

# Out-of-range values, key by key; every key of params.yaml has a row (checked below).
OUT_OF_RANGE = {
    "data.source": ["", "   ", "a\x00b.zip", "x" * 5000, "bad\ud800.zip"],
    "data.kaggle_dataset": ["no-slash", "owner/data\n"],
    "data.max_extract_gb": [0, -1.0, math.inf],
    "data.max_members": [0, 10**30],
    "prepare.val_split": [0.7, 0, -math.inf],
    "prepare.test_split": [-0.1, 0.55, math.nan],
    "prepare.seed": [-1, 2**31],
    "prepare.class_set": ["mine"],
    "prepare.min_side": [0, 65_536],
    "prepare.max_pixels": [0, 10**10],
    "prepare.near_duplicate_distance": [-1, 17],
    "prepare.min_per_class": [1, 10**7],
    "images.encoding": ["gif"],
    "images.quality": [0, 101],
    "images.shard_images": [0, 10**6],
    "train.backbone": ["vgg19"],
    "train.weights": ["", "w\x00.h5", "w\n.h5"],
    "train.preprocessing": ["caffe"],
    "train.image_size": [31, 2049, 10**30],
    "train.batch_size": [0, 65_537],
    "train.epochs": [0, 100_001],
    "train.learning_rate": [0, 11, "1e999"],
    "train.backbone_lr_factor": [0, 1.5, -0.1],
    "train.lr_warmup_steps": [-1, 1_000_001, 2.5],
    "train.dense_units": [0, 65_537],
    "train.dropout": [1.0, -0.1],
    "train.label_smoothing": [1.0],
    "train.trainable": [0, -1, 6, 10**30, "some"],
    "train.warmup_epochs": [-1, 15],
    "train.warmup_learning_rate": [0, "inf"],
    "train.class_weight": ["auto"],
    "train.seed": [-1, 2**31],
    "train.deterministic": ["yes"],
    "train.top_k": [0, 1001],
    "train.augment.rotation": [-1, 181],
    "train.augment.translate": [1.0, -0.1],
    "train.augment.shear": [1.0],
    "train.augment.zoom": [math.inf],
    "train.augment.horizontal_flip": ["yes"],
    "train.augment.fused": [1],
    "train.early_stopping_patience": [0, 10**30],
    "train.reduce_lr_factor": [1.0, 0],
    "train.reduce_lr_patience": [0, 100_001],
    "train.min_lr": [-1e-9, 11],
    "train.mixed_precision": ["bf16"],
    "train.input": ["disk"],
    "train.shuffle_buffer": [0, 1_000_001],
    "train.backbone_features": ["on"],
    "train.feature_copies": [0, 101],
    "evaluate.top_k": [0, 1001],
    "evaluate.gallery_size": [0, 1001],
    "evaluate.calibration_bins": [0, 1001],
    "evaluate.mixed_precision": ["bf16", "mixed_bfloat16"],
    "evaluate.bootstrap_resamples": [0, 999, 100_001],
    "evaluate.bootstrap_seed": [-1, 2**31],
    "explain.n_correct": [-1, 1001],
    "explain.n_incorrect": [-1, 10**30],
    "explain.layer": ["", "block5\x00", "x" * 257],
    "explain.alpha": [0, 1],
    "explain.faithfulness_fraction": [0, 1],
    "explain.seed": [-1, 2**31],
    "explain.mixed_precision": ["float32"],
    "export.representative_images": [0, 100_001],
    "export.seed": [-1, 2**31],
    "export.min_agreement": [-0.1, 1.5],
    "export.int8_min_agreement": [1.01, -math.inf],
    "export.int8_max_accuracy_drop": [-0.01, 2],
    "audit.folds": [1, 101],
    "audit.repeats": [0, 101],
    "audit.seed": [-1, 2**31],
    "audit.regularization_c": [0, -1.0, 1e7, math.inf],
    "audit.gallery_size": [0, 1001],
    "speed.autotune": [0],
    "speed.prefetch_to_device": [None],
    "speed.train_xla": ["auto"],
    "speed.head_xla": ["true"],
    "speed.evaluate_batch_size": [0, 65_537],
    "speed.explain_batch_size": [0, 65_537],
    "speed.explain_xla": ["gpu"],
    "mlflow.experiment": ["", "exp\x1b[31m", "x" * 257],
    "mlflow.registered_model": ["a/b", "a:b", ".", "..x", "\t"],
}

# Values no key of a given type takes: what YAML makes of .nan, .inf, dates, !!binary,
# lists and mappings, numbers too large for anything, and strings where numbers belong.
WRONG_FOR_TYPE = {
    float: [math.nan, math.inf, -math.inf, "nan", "-inf", "1e999", 10**400, True, "abc"],
    int: [10**30, 10**3000, 2.5, 3.0, math.nan, True, "3", None],
    str: [123, 5.0, True, None, b"bytes"],
    bool: [1, "true", None],
    # A bare on/off that YAML read as a boolean is the word; the section's check decides.
    Switch: [123, 5.0, None, b"bytes"],
    int | str: [2.0, True, None, math.inf],
    str | None: [7, True, 1.5],
}
ANY_TYPE = [[1, 2], {"a": 1}, DAY, datetime.datetime(2024, 1, 31, 12, 0), [[[[[1]]]]]]


def _cases():
    for key, hint in LEAF_TYPES.items():
        for value in OUT_OF_RANGE.get(key, []) + WRONG_FOR_TYPE[hint] + ANY_TYPE:
            yield pytest.param(key, value, id=f"{key}={reprlib.repr(value)}")


def _nested(key: str, value: object) -> dict:
    *sections, name = key.split(".")
    raw: dict = {name: value}
    for section in reversed(sections):
        raw = {section: raw}
    return raw


def test_every_key_has_out_of_range_cases():
    assert set(OUT_OF_RANGE) == set(LEAF_TYPES)
    assert set(WRONG_FOR_TYPE) >= set(LEAF_TYPES.values())


@pytest.mark.parametrize(("key", "value"), list(_cases()))
def test_any_bad_value_of_any_key_is_one_line_naming_the_key(key, value):
    with pytest.raises(ParamsError) as caught:
        params_from_dict(_nested(key, value))
    message = str(caught.value)
    assert message.startswith(f"params.yaml: {key} = "), message
    assert "expected" in message
    assert message.isprintable() and len(message) < 400, message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"prepare": {"val_split": math.nan}},
            r"prepare.val_split = nan is not allowed; expected a fraction in \(0, 0.5\]",
        ),
        (
            {"train": {"image_size": 10**30}},
            r"train.image_size = 10{30} is not allowed; expected an integer in \[32, 2048\]",
        ),
        (
            {"train": {"epochs": 10**3000}},
            r"train.epochs = <an integer of about 3001 digits> is not allowed",
        ),
        (
            {"train": {"learning_rate": "1e999"}},
            r"train.learning_rate = inf is not allowed; expected a number in \(0, 10\]",
        ),
        (
            {"data": {"max_extract_gb": 10**400}},
            r"data.max_extract_gb = <an integer of about 401 digits> is not allowed; "
            r"expected a finite number",
        ),
        (
            {"train": {"trainable": 6}},
            r"expected 'all', 'head', or a number of top blocks of vgg16 in \[1, 5\]",
        ),
        (
            {"train": {"trainable": 1.5}},
            r"train.trainable = 1.5 has the wrong type; expected an integer or a string",
        ),
        ({"data": {"source": 123}}, r"data.source = 123 has the wrong type; expected a string"),
        (
            {"mlflow": {"experiment": 5}},
            r"mlflow.experiment = 5 has the wrong type; expected a string",
        ),
        (
            {"explain": {"layer": 7}},
            r"explain.layer = 7 has the wrong type; expected a string or null",
        ),
        ({"data": {"source": "a\x00b"}}, r"data.source = 'a\\x00b' is not allowed"),
        (
            {"train": {"epochs": DAY}},
            r"train.epochs = datetime.date\(2024, 1, 31\) has the wrong type",
        ),
        (
            {"train": {"epochs": list(range(10**5))}},
            r"train.epochs = \[0, 1, 2, 3, 4, 5, \.\.\.\] has the wrong type",
        ),
    ],
)
def test_messages_show_the_value_escaped_and_short(raw, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_the_largest_allowed_values_are_accepted():
    # The upper bounds stop nonsense, not real use.
    p = params_from_dict(
        {
            "prepare": {"seed": 2**31 - 1, "max_pixels": 10**9},
            "train": {"image_size": 2048, "batch_size": 65_536, "epochs": 100_000},
            "explain": {"layer": "block5_conv3", "seed": 2**31 - 1},
            "mlflow": {"experiment": "é" * 256},
        }
    )
    assert (p.train.image_size, p.train.epochs, p.prepare.seed) == (2048, 100_000, 2**31 - 1)


# --- params.yaml as a file: whatever it holds, one ParamsError --------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"params.yaml is empty; it should hold the sections data, prepare"),
        (b"# only a comment\n", r"params.yaml is empty"),
        (
            b"train:\n  epochs: \xff\xfe\n",
            r"params.yaml is not UTF-8 text \(byte 0xff on line 2\)",
        ),
        ("prepare:\n  val_split: 0,15\n".encode("utf-16"), r"params.yaml is not UTF-8 text"),
        (
            b"- data\n- train\n",
            r"the top level should be a mapping of keys to values, got \['data', 'train'\]",
        ),
        (b"just words\n", r"the top level should be a mapping"),
        (b"train: [unclosed\n", r"params.yaml is not valid YAML"),
        (
            b"train:\n  epochs: " + b"9" * 5000 + b"\n",
            r"params.yaml holds a value YAML cannot read",
        ),
        (
            b"train:\n  epochs: " + b"[" * 5000 + b"]" * 5000 + b"\n",
            r"nests lists or mappings too deeply",
        ),
        (b"train:\n  epochs: !!python/object:os.system ls\n", r"not valid YAML"),
        (b"prepare:\n  val_split: .nan\n", r"prepare.val_split = nan is not allowed"),
        (b"data:\n  max_extract_gb: .inf\n", r"data.max_extract_gb = inf is not allowed"),
        (b"train:\n  min_lr: -.inf\n", r"train.min_lr = -inf is not allowed"),
        (b"train:\n  learning_rate: 1e999\n", r"train.learning_rate = inf is not allowed"),
        (b"train:\n  epochs: 2024-01-31\n", r"train.epochs = datetime.date\(2024, 1, 31\)"),
        (b"train:\n  weights: !!binary aGVsbG8=\n", r"train.weights = b'hello' has the wrong type"),
        (b"train:\n  seed: !!set {1}\n", r"train.seed = \{1\} has the wrong type"),
        (b'data:\n  source: "raw\\0.zip"\n', r"data.source = 'raw\\x00.zip' is not allowed"),
        (b'explain:\n  layer: "\\ud800"\n', r"explain.layer = '\\ud800' is not allowed"),
        (b"train:\n  trainable: 2.0\n", r"train.trainable = 2.0 has the wrong type"),
    ],
)
def test_a_bad_params_file_is_one_params_error(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_aliases_that_expand_to_a_huge_value_give_a_short_message(tmp_path):
    # "Billion laughs": each level lists the one before nine times, 9**9 items in full.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  epochs: [{', '.join(levels)}]\n")
    with pytest.raises(
        ParamsError, match=r"train.epochs = \[\['x', .*\.\.\. has the wrong type"
    ) as caught:
        load_params(path)
    assert len(str(caught.value)) < 400


def test_a_huge_params_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ParamsError, match=r"params.yaml is 2097152 bytes, more than a settings"):
        load_params(path)


def test_a_folder_named_params_yaml_is_not_found(tmp_path):
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(SourceNotFoundError, match=r"params\.yaml not found"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_params_file_is_one_params_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {}\n")
    path.chmod(0)
    with pytest.raises(ParamsError, match=r"params.yaml cannot be read: Permission denied"):
        load_params(path)


# --- Our environment variables ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "level"),
    [
        (None, 20),
        ("", 20),
        (" \t", 20),
        ("debug", 10),
        (" Warning ", 30),
        ("WARN", 30),
        ("0", 0),
        ("50", 50),
        ("critical", 50),
    ],
)
def test_log_levels_by_name_or_number(monkeypatch, value, level):
    if value is None:
        monkeypatch.delenv(environment.LOG_LEVEL, raising=False)
    else:
        monkeypatch.setenv(environment.LOG_LEVEL, value)
    assert environment.log_level() == level


@pytest.mark.parametrize(
    "value", ["bogus", "51", "-1", "1e1", "\u0131nfo", "\uff11\uff10", "\udcff"]
)
def test_a_bad_log_level_names_the_variable_and_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv(environment.LOG_LEVEL, value)
    with pytest.raises(
        EnvironmentVariableError,
        match=r"^ANIMALCAM_LOG_LEVEL=.* is not allowed; "
        r"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    ):
        environment.log_level()


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("", False),
        (" ", False),
        ("0", False),
        ("false", False),
        ("Off", False),
        ("1", True),
        ("true", True),
        ("YES", True),
    ],
)
def test_debug_switch(monkeypatch, value, on):
    monkeypatch.setenv(environment.DEBUG, value)
    assert environment.debug_enabled() is on


def test_a_bad_debug_switch_is_an_error(monkeypatch):
    monkeypatch.setenv(environment.DEBUG, "maybe")
    with pytest.raises(EnvironmentVariableError, match=r"ANIMALCAM_DEBUG='maybe' is not allowed"):
        environment.check_environment()


# --- Through a real stage: exit 2, one line, no traceback ---------------------------------

STAGES = ("download", "prepare", "images", "train", "evaluate", "explain", "export")


def run_stage_script(project, stage: str, params: bytes | None = None, **env: str):
    """``python stages/<stage>.py`` in ``project``, as DVC runs it, with ``params`` as
    params.yaml (the repository's when None) and ``env`` on top of a clean environment."""
    params = (REPO_ROOT / "params.yaml").read_bytes() if params is None else params
    (project / "params.yaml").write_bytes(params)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ANIMALCAM_", "DVC_"))}
    environ = {
        **clean,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        **env,
    }
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def error_line(result, stage: str) -> str:
    """The one line a stage prints for a user error: nothing else on stderr, not even
    TensorFlow's start-up lines (run_stage captures those)."""
    ours = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(ours) == 1, result.stderr
    assert ours[0].startswith(f"animalcam {stage}: error: "), ours[0]
    return ours[0]


@pytest.mark.parametrize(
    ("params", "fragments"),
    [
        (b"prepare:\n  val_split: .nan\n", ["prepare.val_split = nan", "(0, 0.5]"]),
        (b"train:\n  image_size: 1" + b"0" * 30 + b"\n", ["train.image_size = 1", "[32, 2048]"]),
        (b"train:\n  trainable: -2\n", ["train.trainable = -2"]),
        (b'data:\n  source: "raw\\0.zip"\n', ["data.source = 'raw\\x00.zip'"]),
        (b"mlflow:\n  experiment: 5\n", ["mlflow.experiment = 5 has the wrong type"]),
        (b"train:\n  epochs: \xe9\n", ["params.yaml is not UTF-8 text"]),
        (b"", ["params.yaml is empty"]),
        (b"train:\n  epochs: " + b"9" * 5000 + b"\n", ["params.yaml holds a value YAML"]),
    ],
)
def test_prepare_stage_with_a_bad_params_file(tmp_path, params, fragments):
    line = error_line(run_stage_script(tmp_path, "prepare", params), "prepare")
    for fragment in fragments:
        assert fragment in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_bad_log_level_in_one_line(tmp_path, stage):
    result = run_stage_script(tmp_path, stage, ANIMALCAM_LOG_LEVEL="bogus")
    line = error_line(result, stage)
    assert line == (
        f"animalcam {stage}: error: ANIMALCAM_LOG_LEVEL='bogus' is not allowed; expected one "
        "of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case) or a number in [0, 50]; "
        "unset it for INFO."
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"ANIMALCAM_LOG_LEVEL": "\x1b[31mred"}, "ANIMALCAM_LOG_LEVEL='\\x1b[31mred'"),
        # Dotless i: str.upper() would make it "INFO".
        ({"ANIMALCAM_LOG_LEVEL": "\u0131nfo"}, "ANIMALCAM_LOG_LEVEL='\u0131nfo'"),
        ({"ANIMALCAM_LOG_LEVEL": "51"}, "a number in [0, 50]"),
        ({"ANIMALCAM_LOG_LEVEL": "x" * 100_000}, "ANIMALCAM_LOG_LEVEL='xxx"),
        ({"ANIMALCAM_DEBUG": "maybe"}, "ANIMALCAM_DEBUG='maybe' is not allowed"),
        (
            {"ANIMALCAM_PIPELINE_RUN_ID": "\x1b[31m" + "r" * 5000},
            "ANIMALCAM_PIPELINE_RUN_ID='\\x1b[31mrrr",
        ),
        ({"MLFLOW_TRACKING_URI": "::::"}, "MLFLOW_TRACKING_URI='::::' is a folder path or no URI"),
        ({"MLFLOW_TRACKING_URI": " "}, "MLFLOW_TRACKING_URI=' ' is blank"),
        ({"MLFLOW_TRACKING_URI": "/nonexistent/dir"}, "MLflow 3 no longer writes"),
        ({"MLFLOW_TRACKING_URI": "file:///nonexistent/dir"}, "MLflow 3 no longer writes"),
        ({"MLFLOW_TRACKING_URI": "sqlite:///"}, "is an in-memory database"),
        ({"MLFLOW_TRACKING_URI": "ftp://x"}, "ftp:// is not a tracking store"),
        ({"MLFLOW_TRACKING_URI": "http://x\x1b[31m:80"}, "holds control characters"),
    ],
)
def test_bad_environment_values_are_one_escaped_line(tmp_path, env, fragment):
    line = error_line(run_stage_script(tmp_path, "prepare", **env), "prepare")
    assert fragment in line and len(line) < 400
    assert line.isprintable()


@pytest.mark.parametrize(("level", "info_shown"), [("  ", True), ("warning", False), ("30", False)])
def test_blank_and_valid_log_levels_let_the_stage_run(tmp_path, level, info_shown):
    # No data/raw here: the stage gets past its settings and stops at the missing data.
    result = run_stage_script(tmp_path, "prepare", ANIMALCAM_LOG_LEVEL=level)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("animalcam prepare: error: data/raw does not exist"), last
    assert (" INFO " in result.stderr) is info_shown  # blank: the default, INFO


@pytest.mark.parametrize(
    ("key", "written", "expected"),
    [
        ("train.backbone_features", "off", "off"),
        ("train.mixed_precision", "off", "off"),
        ("train.mixed_precision", "on", "on"),
        ("speed.explain_xla", "on", "on"),
    ],
)
def test_a_bare_on_or_off_as_dvc_exp_run_writes_it_is_the_word(tmp_path, key, written, expected):
    section, name = key.split(".")
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {name}: {written}\n")  # YAML 1.1 reads this as a bool
    assert getattr(getattr(load_params(path), section), name) == expected


def test_informational_variables_are_cleaned_for_tags(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-\udcff\x1b[31m" + "x" * 400)
    name = environment.text_variable("DVC_EXP_NAME")
    assert name.startswith("exp-\ufffd\ufffd[31m") and name.isprintable() and len(name) == 250
    name.encode("utf-8")  # a tag MLflow can store
    monkeypatch.setenv("DVC_EXP_NAME", "   ")
    assert environment.text_variable("DVC_EXP_NAME") is None


@pytest.mark.parametrize("stage", ["images", "train"])
def test_tensorflow_start_up_lines_do_not_reach_the_user(tmp_path, stage):
    """TensorFlow's C++ start-up output (CUDA probes, oneDNN notices) is captured by
    run_stage: a stage that fails after starting TensorFlow prints only its one line."""
    result = run_stage_script(tmp_path, stage, ANIMALCAM_LOG_LEVEL="WARNING")
    line = error_line(result, stage)
    assert "data/prepared/classes.json does not exist" in line
