import dataclasses

import pytest
import yaml
from conftest import REPO_ROOT

from animalcam.errors import ParamsError, SourceNotFoundError
from animalcam.params import Params, as_dict, load_params, params_from_dict


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
        ({"train": {"xla": 1}}, r"train.xla = 1 has the wrong type; expected true or false"),
        ({"train": {"epochs": True}}, r"train.epochs = True has the wrong type"),
        (
            {"prepare": {"val_split": 0.7}},
            r"prepare.val_split = 0.7 is not allowed; expected a fraction in \(0, 0.5\]",
        ),
        ({"prepare": {"val_split": 0}}, r"prepare.val_split = 0.0 is not allowed"),
        (
            {"train": {"learning_rate": -1e-3}},
            r"train.learning_rate = -0.001 is not allowed; expected a number > 0",
        ),
        ({"train": {"trainable": "some"}}, r"train.trainable = 'some' is not allowed"),
        ({"train": {"trainable": 0}}, r"train.trainable = 0 is not allowed"),
        (
            {"train": {"backbone": "vgg19"}},
            r"train.backbone = 'vgg19' is not allowed; expected one of convnext_tiny, "
            r"efficientnetv2b0, vgg16\.",
        ),
        ({"train": {"epochs": 3, "warmup_epochs": 3}}, r"train.warmup_epochs = 3 is not allowed"),
        ({"prepare": {"class_set": "mine"}}, r"prepare.class_set = 'mine'"),
        ({"train": []}, r"train should be a mapping"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(raw, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


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
