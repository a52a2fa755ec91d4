"""Input pipeline: manifests, decoding, the batch builder over image files (order,
shuffling per epoch, labels), augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
import tiny_data
from PIL import Image

from animalcam import dataset
from animalcam.augmentation import augmentation
from animalcam.batches import BatchSettings, epoch_batches, ordered_batches, steps_per_epoch
from animalcam.dataset import FileExamples
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.layers import warp_affine
from animalcam.params import AugmentParams


def grey_images(folder, n: int, size: int = 8) -> list[str]:
    """``n`` PNGs whose grey level encodes their index (10 * i), to read the order back."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (size, size), (10 * i,) * 3).save(path)
        paths.append(str(path))
    return paths


def in_order(paths, *, batch_size, image_size=8, augment=None):
    """One pass over image files without labels, as evaluate and the feature pass read."""
    examples = FileExamples(paths, None, image_size)
    return ordered_batches(examples, BatchSettings(batch_size), labels=False, augment=augment)


def order_of(batches) -> list[int]:
    """Indices of the grey images in the order the batches hold them."""
    order = []
    for batch in batches:
        images = batch[0] if isinstance(batch, tuple) else batch
        order += [round(float(np.mean(image)) / 10) for image in images.numpy()]
    return order


def test_read_manifest_resolves_paths_against_the_root(tmp_path):
    prepared = tiny_data.write_prepared(tmp_path, train_per_class=2, val_per_class=1)
    classes = dataset.read_classes(prepared / "classes.json")

    manifest = dataset.read_manifest(prepared / "train.csv", classes, root=tmp_path)

    assert classes == ["cat", "dog", "horse"]
    assert len(manifest) == 6
    assert manifest.labels == (0, 0, 1, 1, 2, 2)
    assert manifest.paths[0] == str(tmp_path / "images/train/cat/0.png")
    assert all(size > 0 for size in manifest.sizes)


def test_manifest_problems_are_data_errors(tmp_path):
    prepared = tiny_data.write_prepared(tmp_path, train_per_class=1, val_per_class=1)
    classes = ["cat", "dog", "horse"]
    bad_label = tiny_data.write_manifest(tmp_path / "bad_label.csv", [("images/x.png", "cow")])
    with pytest.raises(DataError, match=r"bad_label.csv:2: label 'cow' is not one of"):
        dataset.read_manifest(bad_label, classes, root=tmp_path)
    missing = tiny_data.write_manifest(tmp_path / "missing.csv", [("images/gone.png", "cat")])
    with pytest.raises(DataError, match=r"1 image file\(s\) do not exist .*gone.png"):
        dataset.read_manifest(missing, classes, root=tmp_path)
    (tmp_path / "no_label.csv").write_text("path,class\nimages/a.png,cat\n")
    with pytest.raises(DataError, match="lacks column"):
        dataset.read_manifest(tmp_path / "no_label.csv", classes, root=tmp_path)
    with pytest.raises(SourceNotFoundError, match="run the prepare stage"):
        dataset.read_manifest(prepared / "nope.csv", classes)
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "cat"]))
    with pytest.raises(DataError, match="unique class names"):
        dataset.read_classes(tmp_path / "classes.json")


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("a.png", "RGB"),
        ("b.png", "RGBA"),
        ("c.png", "L"),
        ("d.jpg", "RGB"),
        ("e.bmp", "RGB"),
        ("f.gif", "P"),
    ],
)
def test_load_image_gives_float_rgb_at_the_requested_size(tmp_path, name, mode):
    path = tmp_path / name
    Image.new("RGB", (50, 30), (200, 100, 50)).convert(mode).save(path)

    image = dataset.load_image(str(path), 16).numpy()

    assert image.shape == (16, 16, 3)
    assert image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 255
    if mode == "L":
        assert np.allclose(image[..., 0], image[..., 1])  # grey expanded to 3 channels
    else:
        np.testing.assert_allclose(image[8, 8], (200, 100, 50), atol=4)


def test_inference_dataset_keeps_manifest_order_and_batches(tmp_path):
    paths = grey_images(tmp_path, 7)

    batches = list(in_order(paths, batch_size=3))

    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert order_of(batches) == list(range(7))


def test_labels_come_with_their_images_one_hot(tmp_path):
    paths = grey_images(tmp_path, 5)
    labels = [i % 3 for i in range(5)]

    ds = epoch_batches(
        FileExamples(paths, labels, 8),
        BatchSettings(5, seed=1),
        first_epoch=0,
        end_epoch=1,
        num_classes=3,
    )
    images, one_hot = next(iter(ds))

    order = order_of([images])
    assert sorted(order) == list(range(5)) and order != list(range(5))
    np.testing.assert_array_equal(np.argmax(one_hot, axis=1), [i % 3 for i in order])
    assert one_hot.dtype == "float32"


def test_shuffling_depends_on_seed_and_epoch_only(tmp_path):
    paths = grey_images(tmp_path, 12)

    def epoch_order(seed, epoch):
        examples = FileExamples(paths, [0] * 12, 8)
        settings = BatchSettings(4, seed=seed)
        ds = epoch_batches(
            examples, settings, first_epoch=epoch, end_epoch=epoch + 1, num_classes=2
        )
        return order_of(ds)

    assert epoch_order(7, 0) == epoch_order(7, 0)
    assert epoch_order(7, 0) != epoch_order(7, 1)
    assert epoch_order(7, 0) != epoch_order(8, 0)
    # The multi-epoch training stream is those same epochs back to back, so a run resumed
    # at epoch 1 sees what an uninterrupted run sees there.
    stream = epoch_batches(
        FileExamples(paths, [0] * 12, 8),
        BatchSettings(5, seed=7),
        first_epoch=1,
        end_epoch=3,
        num_classes=2,
    )
    batches = list(stream)
    assert [b[0].shape[0] for b in batches] == [5, 5, 2, 5, 5, 2]  # epochs never mix
    assert order_of(batches) == epoch_order(7, 1) + epoch_order(7, 2)
    assert steps_per_epoch(12, 5) == 3
    assert stream.cardinality().numpy() == 6  # Keras reads the length


@pytest.mark.parametrize(
    ("fused", "layers"),
    [
        (True, ["RandomAffine"]),  # all five transforms in one resampling per image
        (False, ["RandomRotation", "RandomTranslation", "RandomShear", "RandomZoom", "RandomFlip"]),
    ],
)
def test_augmentation_keeps_shape_and_dtype_and_only_acts_in_training(fused, layers):
    augment = augmentation(AugmentParams(fused=fused), seed=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")

    trained = np.asarray(augment(images, training=True))
    inferred = np.asarray(augment(images, training=False))

    assert trained.shape == images.shape and trained.dtype == np.float32
    assert not np.allclose(trained, images)
    np.testing.assert_array_equal(inferred, images)
    assert [type(layer).__name__ for layer in augment.layers] == layers
    flip_only = augmentation(
        AugmentParams(rotation=0, translate=0, shear=0, zoom=0, horizontal_flip=True, fused=fused),
        seed=3,
    )
    flipped = np.asarray(flip_only(images, training=True))
    for image, out in zip(images, flipped, strict=True):
        assert np.allclose(out, image, atol=1e-3) or np.allclose(out, image[:, ::-1], atol=1e-3)
    off = AugmentParams(
        rotation=0, translate=0, shear=0, zoom=0, horizontal_flip=False, fused=fused
    )
    assert augmentation(off, seed=3) is None


def test_fused_warp_matches_tensorflows_projective_transform():
    # OpenCV does the resampling; it must agree with TensorFlow's own kernel (the
    # reference for the transforms' convention: output pixel -> input position).
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 40, 56, 3)).astype(np.float32)
    theta, zoom = rng.uniform(-0.4, 0.4, 6), rng.uniform(0.8, 1.2, 6)
    shift = rng.uniform(-10, 10, (6, 2))
    flip = np.where(rng.random(6) < 0.5, -1.0, 1.0)
    matrices = np.stack(
        [
            np.cos(theta) * zoom * flip,
            -np.sin(theta) * zoom,
            shift[:, 0] + 28,
            np.sin(theta) * zoom * flip,
            np.cos(theta) * zoom,
            shift[:, 1],
        ],
        axis=1,
    ).astype(np.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=np.concatenate([matrices, np.zeros((6, 2), np.float32)], axis=1),
        output_shape=[40, 56],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    ).numpy()
    warped = warp_affine(images, matrices)
    assert warped.shape == images.shape and warped.dtype == np.float32
    np.testing.assert_allclose(warped, expected, atol=1e-3)
    assert not np.allclose(warped, images)


def test_augmentation_in_the_pipeline_changes_training_batches_only(tmp_path):
    paths = tiny_data.write_images(tmp_path, "train", per_class=2)
    paths = [str(tmp_path / rel) for rel, _ in paths]
    augment = augmentation(AugmentParams(rotation=30, translate=0.2), seed=1)

    plain = next(iter(in_order(paths, batch_size=6, image_size=32)))
    augmented = next(iter(in_order(paths, batch_size=6, image_size=32, augment=augment)))

    assert augmented.shape == plain.shape == (6, 32, 32, 3)
    assert augmented.dtype == plain.dtype == "float32"
    assert not np.allclose(augmented.numpy(), plain.numpy())


def test_empty_or_mismatched_inputs_are_data_errors():
    with pytest.raises(DataError, match="empty"):
        FileExamples([], None, 8)
    with pytest.raises(DataError, match="2 paths but 1 labels"):
        FileExamples(["a.png", "b.png"], [0], 8)


def test_autotune_switch_sets_the_pipeline_options(tmp_path):
    examples = FileExamples(grey_images(tmp_path, 3), None, 8)
    for enabled in (False, True):
        ds = ordered_batches(examples, BatchSettings(2, autotune=enabled), labels=False)
        assert ds.options().autotune.enabled is enabled
        assert order_of(ds) == [0, 1, 2]
