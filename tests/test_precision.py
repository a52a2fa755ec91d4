"""The dtype policy: bfloat16 detection, the setting -> policy matrix, models under a
policy, and a saved model that is float32 whatever it trained under.

bfloat16 is forced on tiny models, so these pass on any CPU: with AVX512_BF16 it runs
natively, without it emulated (slower, still correct).
"""

from __future__ import annotations

import json
import logging
import sys
import zipfile

import keras
import numpy as np
import pytest
from test_training import splits, tiny_params

from animalcam import gradcam, modeling, precision, serving, training
from animalcam.errors import ParamsError
from animalcam.params import PRECISION_SETTINGS, params_from_dict

ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
    "flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\n"
    "flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
)
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMX_ONLY = "flags\t\t: avx2 amx_tile amx_bf16\n"
AMX_WITHOUT_BF16 = "flags\t\t: avx2 amx_tile amx_int8\n"
ZEN2 = "model name\t: AMD EPYC 7R32\nflags\t\t: fpu sse2 avx avx2 fma\nvmx flags\t: avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (ZEN4, True),
        (SAPPHIRE_RAPIDS, True),
        (AMX_ONLY, True),
        (AMX_WITHOUT_BF16, False),
        (ZEN2, False),  # a "vmx flags" line is not the CPU's flags
        (ARM, False),  # aarch64's bf16 is not detected (no oneDNN bfloat16 path assumed)
        ("", False),
    ],
)
def test_bfloat16_is_detected_from_the_processor_flags(cpuinfo, expected):
    assert precision.cpu_computes_bfloat16(cpuinfo) is expected


def test_no_bfloat16_where_there_is_no_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert precision.cpu_computes_bfloat16() is False
    monkeypatch.setattr(precision.sys, "platform", "darwin")
    assert precision.cpu_flags() == frozenset()


def machine(monkeypatch, *, gpu: bool, bfloat16: bool, onednn: bool = True) -> None:
    monkeypatch.setattr(precision, "gpu_visible", lambda: gpu)
    monkeypatch.setattr(precision, "cpu_computes_bfloat16", lambda cpuinfo=None: bfloat16)
    monkeypatch.setattr(precision, "onednn_enabled", lambda: onednn)


@pytest.mark.parametrize(
    ("setting", "gpu", "bfloat16", "expected"),
    [
        ("auto", True, False, "mixed_float16"),
        ("auto", True, True, "mixed_float16"),
        ("auto", False, True, "mixed_bfloat16"),
        ("auto", False, False, "float32"),  # an AVX2-only CPU stays float32
        ("on", True, True, "mixed_float16"),
        ("on", False, True, "mixed_bfloat16"),
        ("on", False, False, "mixed_bfloat16"),  # forced, with a warning
        ("off", True, True, "float32"),
        ("off", False, True, "float32"),
        ("bfloat16", True, False, "mixed_bfloat16"),
        ("bfloat16", False, False, "mixed_bfloat16"),
        ("float16", False, True, "mixed_float16"),
        ("float16", True, False, "mixed_float16"),
    ],
)
def test_setting_and_machine_give_the_policy(monkeypatch, setting, gpu, bfloat16, expected):
    machine(monkeypatch, gpu=gpu, bfloat16=bfloat16)
    assert precision.resolve_policy(setting) == expected


def test_auto_keeps_float32_when_onednn_is_off(monkeypatch, caplog):
    # Without TensorFlow's oneDNN kernels bfloat16 measured no faster than float32.
    machine(monkeypatch, gpu=False, bfloat16=True, onednn=False)
    assert precision.resolve_policy("auto") == "float32"
    with caplog.at_level(logging.WARNING, logger="animalcam.precision"):
        assert precision.resolve_policy("on") == "mixed_bfloat16"
    assert "oneDNN kernels are off" in caplog.text


def test_onednn_follows_the_environment_variable_without_tensorflows_answer(monkeypatch):
    import tensorflow.python.util as util

    monkeypatch.delattr(util, "_pywrap_util_port", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow.python.util._pywrap_util_port", None)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert precision.onednn_enabled() is False
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    assert precision.onednn_enabled() is True


@pytest.mark.parametrize(
    ("setting", "gpu", "bfloat16", "warning"),
    [
        ("on", False, False, "no bfloat16 instructions"),
        ("bfloat16", False, False, "no bfloat16 instructions"),
        ("float16", False, True, "float16 on a CPU is slow"),
        ("auto", False, False, None),
        ("auto", False, True, None),
        ("on", False, True, None),
        ("bfloat16", True, False, None),
    ],
)
def test_a_slow_forced_choice_warns_naming_the_key(
    monkeypatch, caplog, setting, gpu, bfloat16, warning
):
    machine(monkeypatch, gpu=gpu, bfloat16=bfloat16)
    with caplog.at_level(logging.WARNING, logger="animalcam.precision"):
        precision.resolve_policy(setting, "explain.mixed_precision")
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text and "explain.mixed_precision" in caplog.text


def test_every_setting_is_a_params_choice_and_others_are_refused():
    for section in ("train", "evaluate", "explain"):
        for setting in PRECISION_SETTINGS:
            parsed = params_from_dict({section: {"mixed_precision": setting}})
            assert getattr(parsed, section).mixed_precision == setting
        # YAML's bare on/off arrive as booleans and are read back as the words.
        off = params_from_dict({section: {"mixed_precision": False}})
        assert getattr(off, section).mixed_precision == "off"
        with pytest.raises(ParamsError, match=rf"{section}.mixed_precision = 'bf16' .*'bfloat16'"):
            params_from_dict({section: {"mixed_precision": "bf16"}})
    with pytest.raises(ParamsError, match=r"evaluate\.mixed_precision = 'fast'"):
        precision.resolve_policy("fast", "evaluate.mixed_precision")


def tiny_model(policy: str = "float32") -> keras.Model:
    keras.utils.set_random_seed(3)
    return modeling.build_model(
        "vgg16", ["cat", "dog", "horse"], image_size=32, dense_units=8, policy=policy
    )


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def test_a_model_under_bfloat16_predicts_what_float32_predicts():
    model = tiny_model()
    fast = precision.inference_model(model, "mixed_bfloat16")

    assert fast is not model and precision.model_policy(fast) == "mixed_bfloat16"
    assert fast.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert fast.get_layer("block1_conv1").kernel.dtype == "float32"  # weights stay float32
    assert fast.get_layer("predictions").compute_dtype == "float32"  # so does the softmax
    assert modeling.class_names(fast) == ["cat", "dog", "horse"]
    x = images()
    expected, got = model.predict_on_batch(x), fast.predict_on_batch(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=2e-2)
    # The same layers, policies and weights as a model built under the policy.
    built = tiny_model("mixed_bfloat16")
    assert [(a.name, a.dtype_policy.name) for a in fast.layers[1:]] == [
        (b.name, b.dtype_policy.name) for b in built.layers[1:]
    ]
    for a, b in zip(model.weights, fast.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_model_already_under_the_policy_is_returned_as_it_is():
    model = tiny_model()
    assert precision.inference_model(model, "float32") is model
    fast = precision.inference_model(model, "mixed_bfloat16")
    assert precision.inference_model(fast, "mixed_bfloat16") is fast
    with pytest.raises(ValueError, match="not one of"):
        precision.inference_model(model, "bfloat16")  # a setting, not a policy


def test_gradcam_under_bfloat16_keeps_its_invariants_and_float32_maps():
    model = tiny_model()
    x = images(3, seed=1)
    maps32, probs32 = gradcam.GradCam(model)(x)
    maps16, probs16 = gradcam.GradCam(precision.inference_model(model, "mixed_bfloat16"))(x)
    assert maps16.shape == maps32.shape and maps16.dtype == np.float32
    assert maps16.min() >= 0 and maps16.max() <= 1
    np.testing.assert_allclose(probs16, probs32, atol=2e-2)


def test_a_model_trained_under_bfloat16_is_saved_as_float32(tmp_path):
    trained = tiny_model("mixed_bfloat16")
    path = tmp_path / "model.keras"
    modeling.save_model(trained, path)

    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "bfloat16" not in config and "mixed_" not in config
    loaded = modeling.load_model(path)
    assert precision.model_policy(loaded) == "float32"
    assert all(layer.compute_dtype == "float32" for layer in loaded.layers)
    x = images()
    float32 = precision.inference_model(trained, "float32")
    np.testing.assert_allclose(loaded.predict_on_batch(x), float32.predict_on_batch(x), rtol=1e-5)
    np.testing.assert_allclose(loaded.predict_on_batch(x), trained.predict_on_batch(x), atol=2e-2)


def test_training_under_bfloat16_records_the_policy_and_returns_float32(tmp_path, caplog):
    classes, train_set, val_set = splits(tmp_path)
    params = tiny_params(epochs=1, trainable="head", mixed_precision="bfloat16")
    with caplog.at_level(logging.INFO, logger="animalcam.training"):
        result = training.train_model(
            params, classes, train_set, val_set, state_dir=tmp_path / "state"
        )
    assert result.metrics["precision"] == "mixed_bfloat16"
    assert result.metrics["mixed_precision"] is True
    json.dumps(result.metrics)  # what metrics/train.json holds
    assert "policy mixed_bfloat16 (bfloat16 compute" in caplog.text
    assert precision.model_policy(result.model) == "float32"
    assert np.isfinite(result.metrics["best_val_loss"])


def test_the_served_model_computes_under_its_setting(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    modeling.save_model(tiny_model(), path)
    context = type("Context", (), {"artifacts": {serving.KERAS_ARTIFACT: str(path)}})()
    classifier = serving.ImageClassifier(mixed_precision="bfloat16")
    classifier.load_context(context)
    assert precision.model_policy(classifier.model) == "mixed_bfloat16"
    machine(monkeypatch, gpu=False, bfloat16=False)
    legacy = serving.ImageClassifier()
    del legacy.mixed_precision  # pickled before the setting existed: "auto"
    legacy.load_context(context)
    assert precision.model_policy(legacy.model) == "float32"
