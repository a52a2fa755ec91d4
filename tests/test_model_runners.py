"""Every form of the model that `animalcam predict` loads gives the Keras model's answers.

One tiny model (test_serving's colour model: red -> "cat", blue -> "dog") in each form
the tests can build offline: .keras, an MLflow pyfunc (folder, runs:/ and models:/ URIs),
a SavedModel (``model.export``), LiteRT float32, float16, full-integer int8 (uint8 and
int8 input) and a batch-of-one LiteRT file; ONNX when tf2onnx and onnxruntime are
installed (the ``onnx`` extra).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_serving import BLUE, CLASSES, RED, save_color_model

from animalcam import model_runners
from animalcam.errors import ModelError, SourceNotFoundError
from animalcam.export_metadata import (
    METADATA_FILE,
    ExportMetadata,
    read_export_metadata,
    write_export_metadata,
)

SIZE = 16


def pixels() -> np.ndarray:
    """Five images: red, blue, a darker red, a purple leaning blue, grey noise."""
    rng = np.random.default_rng(0)
    out = np.zeros((5, SIZE, SIZE, 3), np.uint8)
    out[0], out[1], out[2], out[3] = RED, BLUE, (120, 30, 30), (100, 20, 160)
    out[4] = rng.integers(100, 150, (SIZE, SIZE, 3))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The colour model in every offline form, keyed by a name."""
    import keras
    import tensorflow as tf

    from animalcam import serving
    from animalcam.modeling import load_model

    root = tmp_path_factory.mktemp("runners")
    keras_path = save_color_model(root / "model.keras", size=SIZE)
    model = load_model(keras_path)
    saved = root / "export" / "saved_model"
    model.export(str(saved), verbose=False)
    write_export_metadata(saved, CLASSES, SIZE)

    def representative():
        for image in pixels():
            yield [image[None].astype(np.float32)]

    def convert(name: str, **settings) -> Path:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        for key, value in settings.items():
            setattr(converter, key, value)
        path = root / "export" / name
        path.write_bytes(converter.convert())
        write_export_metadata(path, CLASSES, SIZE)  # one per folder, shared by its files
        return path

    int8 = {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": representative,
        "target_spec": tf.lite.TargetSpec(supported_ops=[tf.lite.OpsSet.TFLITE_BUILTINS_INT8]),
    }
    forms = {
        "keras": keras_path,
        "mlflow_folder": serving.save_pyfunc_model(root / "pyfunc", keras_path),
        "savedmodel": saved,
        "litert_float32": convert("model_float32.tflite"),
        "litert_float16": convert(
            "model_float16.tflite",
            optimizations=[tf.lite.Optimize.DEFAULT],
            target_spec=tf.lite.TargetSpec(supported_types=[tf.float16]),
        ),
        "litert_int8_uint8_io": convert(
            "model_int8.tflite",
            inference_input_type=tf.uint8,
            inference_output_type=tf.uint8,
            **int8,
        ),
        "litert_int8_int8_io": convert(
            "model_int8_int8io.tflite",
            inference_input_type=tf.int8,
            inference_output_type=tf.int8,
            **int8,
        ),
    }
    # A LiteRT file fixed to one image per call (as some device toolchains want).
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)
    archive.add_endpoint("serve", model.__call__, input_signature=[spec])
    archive.write_out(str(root / "one_image"), verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(root / "one_image"))
    forms["litert_batch_of_one"] = root / "export" / "model_one.tflite"
    forms["litert_batch_of_one"].write_bytes(converter.convert())
    return forms


@pytest.fixture(scope="module")
def keras_probabilities(models) -> np.ndarray:
    return model_runners.open_model(models["keras"]).predict(pixels())


# (form, kind, largest probability difference to the Keras model allowed)
FORMS = [
    ("keras", "keras", 0),
    ("mlflow_folder", "mlflow", 0),
    ("savedmodel", "savedmodel", 1e-6),
    ("litert_float32", "litert", 1e-5),
    ("litert_float16", "litert", 2e-3),
    ("litert_int8_uint8_io", "litert", 0.05),
    ("litert_int8_int8_io", "litert", 0.05),
    ("litert_batch_of_one", "litert", 1e-5),
]


@pytest.mark.parametrize(("form", "kind", "tolerance"), FORMS)
def test_every_form_answers_as_the_keras_model(models, keras_probabilities, form, kind, tolerance):
    runner = model_runners.open_model(models[form])
    assert runner.kind == kind
    assert (runner.class_names, runner.image_size) == (CLASSES, SIZE)
    assert (runner.keras_model is not None) == (kind in ("keras", "mlflow"))
    probabilities = runner.predict(pixels())
    assert probabilities.shape == (5, 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, keras_probabilities, atol=tolerance)
    assert list(probabilities[:4].argmax(axis=1)) == [0, 1, 0, 1]  # cat, dog, cat, dog
    # A different batch size (the last batch of a run) gives the same answers.
    np.testing.assert_allclose(runner.predict(pixels()[:2]), probabilities[:2], atol=1e-6)


def test_mlflow_run_and_registry_uris_load_the_logged_model(
    models, keras_probabilities, tmp_path, monkeypatch
):
    import mlflow

    from animalcam import serving

    # The store as the stages find it; open_model does the same.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        info = serving.log_pyfunc_model(models["keras"])
    version = mlflow.register_model(info.model_uri, "animalcam-classifier").version
    for uri in (f"runs:/{run.info.run_id}/model", f"models:/animalcam-classifier/{version}"):
        runner = model_runners.open_model(uri)
        assert runner.kind == "mlflow" and runner.class_names == CLASSES
        np.testing.assert_allclose(runner.predict(pixels()), keras_probabilities, atol=1e-6)
    with pytest.raises(ModelError, match="cannot load MLflow model models:/animalcam-classifier/9"):
        model_runners.open_model("models:/animalcam-classifier/9")


def test_bfloat16_keras_model_gives_the_same_labels(models, keras_probabilities):
    runner = model_runners.open_model(models["keras"], precision="bfloat16")
    assert runner.keras_model.get_layer("conv").dtype_policy.name == "mixed_bfloat16"
    probabilities = runner.predict(pixels())
    np.testing.assert_allclose(probabilities, keras_probabilities, atol=0.05)
    assert list(probabilities[:4].argmax(axis=1)) == [0, 1, 0, 1]


def test_onnx_answers_as_the_keras_model(models, keras_probabilities, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    import tensorflow as tf
    import tf2onnx

    from animalcam.modeling import load_model

    model = load_model(models["keras"])
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    path = tmp_path / "model.onnx"
    tf2onnx.convert.from_function(tf.function(model), input_signature=spec, output_path=str(path))
    write_export_metadata(path, CLASSES, SIZE)
    runner = model_runners.open_model(path)
    assert runner.kind == "onnx"
    np.testing.assert_allclose(runner.predict(pixels()), keras_probabilities, atol=1e-5)


def test_model_kind_is_told_by_uri_suffix_and_folder_content(models, tmp_path):
    kind = model_runners.model_kind
    assert kind("models:/animalcam-classifier/3") == kind("runs:/abc/model") == "mlflow"
    assert kind(models["mlflow_folder"]) == "mlflow"
    assert kind(models["savedmodel"]) == "savedmodel"
    assert kind(models["litert_int8_uint8_io"]) == "litert"
    (tmp_path / "m.ONNX").write_bytes(b"x")
    assert kind(tmp_path / "m.ONNX") == "onnx"
    with pytest.raises(SourceNotFoundError, match=r"model .*nope\.keras does not exist"):
        kind(tmp_path / "nope.keras")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"weights\.h5 is not a model file .* \.tflite"):
        kind(tmp_path / "weights.h5")


def test_exported_files_without_their_metadata_say_what_is_missing(models, tmp_path):
    lonely = tmp_path / "model.tflite"
    lonely.write_bytes(models["litert_float32"].read_bytes())
    with pytest.raises(SourceNotFoundError, match=f"no {METADATA_FILE} beside it"):
        model_runners.open_model(lonely)
    (tmp_path / METADATA_FILE).write_text('{"class_names": ["cat"], "image_size": 16}')
    with pytest.raises(ModelError, match=r"not valid export metadata .*at least 2 unique"):
        model_runners.open_model(lonely)


def test_a_damaged_litert_file_is_a_model_error(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"not a flatbuffer at all" * 10)
    write_export_metadata(path, CLASSES, SIZE)
    with pytest.raises(ModelError, match=r"model\.tflite is not a loadable LiteRT model"):
        model_runners.open_model(path)


@pytest.mark.parametrize(
    ("module", "suffix", "hint"),
    [
        ("ai_edge_litert.interpreter", ".tflite", "pip install ai-edge-litert"),
        ("onnxruntime", ".onnx", '".[onnx]"'),
    ],
)
def test_a_missing_runtime_names_the_package_to_install(
    tmp_path, monkeypatch, module, suffix, hint
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match=f"not installed; .*{re.escape(hint)}"):
        model_runners.open_model(path)


def test_export_metadata_round_trip_beside_files_and_inside_folders(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "m.tflite").write_bytes(b"x")
    assert write_export_metadata(tmp_path / "saved", ["a", "b"], 8) == (
        tmp_path / "saved" / METADATA_FILE
    )
    assert write_export_metadata(tmp_path / "m.tflite", ["x", "y", "z"], 224) == (
        tmp_path / METADATA_FILE
    )
    assert read_export_metadata(tmp_path / "saved") == ExportMetadata(("a", "b"), 8)
    assert read_export_metadata(tmp_path / "m.tflite") == ExportMetadata(("x", "y", "z"), 224)
    with pytest.raises(ModelError, match="image_size must be a positive integer"):
        ExportMetadata(("a", "b"), 0)
