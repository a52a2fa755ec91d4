"""The prepared-image cache: build, read back, stale-cache errors, evaluate's fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_data

from animalcam import dataset, image_cache
from animalcam.batches import BatchSettings, epoch_batches, ordered_batches, steps_per_epoch
from animalcam.dataset import FileExamples
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.image_cache import CachedExamples
from animalcam.params import ImagesParams


@pytest.fixture
def prepared(tmp_path):
    folder = tiny_data.write_prepared(tmp_path, train_per_class=3, val_per_class=2, size=40)
    classes = dataset.read_classes(folder / "classes.json")
    train = dataset.read_manifest(folder / "train.csv", classes, root=tmp_path)
    val = dataset.read_manifest(folder / "val.csv", classes, root=tmp_path)
    return tmp_path, folder, train, val


def direct(manifest, size):
    """What the on-the-fly pipeline feeds the model: decode + resize, float32."""
    batches = ordered_batches(FileExamples.of(manifest, size), BatchSettings(4), labels=False)
    return np.concatenate([b.numpy() for b in batches])


def images_of(examples):
    """Every image of ``examples`` in order, as the evaluate stage batches them."""
    batches = ordered_batches(examples, BatchSettings(4), labels=False)
    return np.concatenate([b.numpy() for b in batches])


@pytest.mark.parametrize(("encoding", "max_mean_error"), [("raw", 0.5), ("jpeg", 6.0)])
def test_round_trip_gives_the_decoded_resized_pixels(prepared, encoding, max_mean_error):
    root, folder, train, val = prepared
    counts = image_cache.build_cache(
        folder,
        root / "cache",
        image_size=24,
        params=ImagesParams(encoding=encoding, shard_images=4),
        root=root,
    )
    assert counts["images"] == len(train) + len(val)
    index = json.loads((root / "cache" / image_cache.INDEX).read_text())
    assert index["splits"]["train"]["shards"] == [f"train-0000{i}.tfrecord" for i in range(3)]

    split = image_cache.open_split(root / "cache", "train", train, 24)
    batches = ordered_batches(CachedExamples(split), BatchSettings(4))
    images, labels = zip(*batches, strict=True)
    images = np.concatenate([b.numpy() for b in images])
    labels = np.concatenate([b.numpy() for b in labels])
    assert images.shape == (9, 24, 24, 3) and images.dtype == np.float32
    assert labels.tolist() == list(train.labels)  # manifest order
    error = np.abs(images - direct(train, 24))
    if encoding == "raw":
        assert error.max() <= 0.5  # rounding to uint8 only
    # The tiny test images are pure noise, JPEG's worst case; photos come out closer.
    assert error.mean() < max_mean_error


def test_training_batches_cover_every_image_once_per_epoch(prepared):
    root, folder, train, _ = prepared
    image_cache.build_cache(
        folder, root / "cache", image_size=16, params=ImagesParams(shard_images=2), root=root
    )
    split = image_cache.open_split(root / "cache", "train", train, 16)

    def epoch_labels(first, end):
        batches = epoch_batches(
            CachedExamples(split),
            BatchSettings(4, seed=7, shuffle_buffer=64),
            first_epoch=first,
            end_epoch=end,
            num_classes=3,
        )
        return [y.numpy().argmax(axis=1).tolist() for _, y in batches]

    two_epochs = epoch_labels(0, 2)
    assert len(two_epochs) == 2 * steps_per_epoch(len(train), 4)
    first = [label for batch in two_epochs[:3] for label in batch]
    assert sorted(first) == sorted(train.labels)
    # Epoch 1 alone (a resumed run) sees what the uninterrupted run saw in epoch 1.
    assert epoch_labels(1, 2) == two_epochs[3:]


def test_stale_or_missing_cache_says_how_to_rebuild(prepared):
    root, folder, train, _ = prepared
    with pytest.raises(SourceNotFoundError, match="dvc repro -f images"):
        image_cache.open_split(root / "cache", "train", train, 16)
    image_cache.build_cache(folder, root / "cache", image_size=16, params=ImagesParams(), root=root)
    with pytest.raises(DataError, match=r"differs: image_size.*16 px images, 32 px"):
        image_cache.open_split(root / "cache", "train", train, 32)
    fewer = dataset.Manifest(train.paths[1:], train.labels[1:], train.sizes[1:])
    with pytest.raises(DataError, match=r"not built for this train split \(differs: paths"):
        image_cache.open_split(root / "cache", "train", fewer, 16)


def test_inference_reads_the_cache_when_it_fits_else_the_files(prepared):
    root, folder, _, val = prepared
    files = image_cache.image_examples(root / "cache", "val", val, 16)
    assert isinstance(files, FileExamples)
    from_files = images_of(files)
    image_cache.build_cache(
        folder, root / "cache", image_size=16, params=ImagesParams(encoding="raw"), root=root
    )
    cached = image_cache.image_examples(root / "cache", "val", val, 16)
    assert isinstance(cached, CachedExamples)
    from_cache = images_of(cached)
    assert from_cache.shape == from_files.shape == (6, 16, 16, 3)
    assert np.array_equal(from_cache, from_files)  # the same reader, stored losslessly


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda index: index.write_bytes(b"\xff\xfe not json"), id="not-utf8"),
        pytest.param(lambda index: index.write_text("{ half"), id="not-json"),
        pytest.param(lambda index: index.write_text("[1, 2]"), id="not-a-mapping"),
        pytest.param(
            lambda index: index.write_text(
                json.dumps({**json.loads(index.read_text()), "splits": {"train": {}}})
            ),
            id="fields-missing",
        ),
        pytest.param(
            lambda index: (index.parent / "train-00000.tfrecord").write_bytes(b"cut"),
            id="truncated-shard",
        ),
        pytest.param(lambda index: (index.parent / "train-00000.tfrecord").unlink(), id="no-shard"),
    ],
)
def test_a_corrupt_cache_is_one_line_that_says_how_to_rebuild(prepared, damage):
    root, folder, train, _ = prepared
    image_cache.build_cache(folder, root / "cache", image_size=16, params=ImagesParams(), root=root)
    damage(root / "cache" / "index.json")
    with pytest.raises(DataError) as error:
        image_cache.open_split(root / "cache", "train", train, 16)
    message = str(error.value)
    assert "\n" not in message and "dvc repro -f images" in message


def test_every_encoding_round_trips_what_the_reader_gives(prepared):
    root, folder, _, val = prepared
    from_files = direct(val, 16)
    for encoding, tolerance in (("png", 0), ("raw", 0), ("jpeg", 8)):
        cache = root / f"cache-{encoding}"
        params = ImagesParams(encoding=encoding)
        image_cache.build_cache(folder, cache, image_size=16, params=params, root=root)
        split = image_cache.open_split(cache, "val", val, 16)
        got = images_of(CachedExamples(split))
        assert np.abs(got - from_files).mean() <= tolerance, encoding
