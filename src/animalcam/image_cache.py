"""The prepared-image cache: every usable image decoded and resized ONCE, read many times.

Training at 224 px decodes each original (a JPEG or PNG of a few hundred pixels a side)
and resizes it every epoch; the cache stage does that once per image and writes the
result to sharded TFRecords under ``data/cache/``, which train and evaluate stream
instead. The pixels are :func:`animalcam.images.model_pixels` of each file, exactly what
the served model computes from the same file: ``train.image_size``, bilinear, aspect ratio
not kept. No margin: the study's augmentations (rotation, shift, shear, zoom, flip) all act
on the resized square with nearest-edge fill, so extra pixels around it would never be
used.

Layout::

    data/cache/index.json          format, image_size, encoding, and per split the
                                   manifest paths (in order), its shard files and their sizes
    data/cache/<split>-NNNNN.tfrecord   records {path, label, image} in manifest order

``image`` is the serialised uint8 tensor (``cache.encoding: raw``: exactly the pixels
serving computes, nothing to decode), a PNG (``png``: as exact, smaller, slower to read)
or a JPEG (``jpeg``: the smallest, but lossy, so training and evaluation then see pixels
that serving does not).
:func:`build_cache` streams through ``tf.data`` (parallel decode, bounded
buffers), so its memory does not grow with the dataset. Readers check that the cache was
made for the same manifest and image size and say how to rebuild it otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from animalcam.dataset import (
    Manifest,
    image_dataset,
    load_image,
    read_classes,
    read_manifest,
    steps_per_epoch,
    with_autotune,
)
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.outputs import replace_directory, write_json
from animalcam.params import CacheParams

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 2  # bump when the record layout changes; readers then ask for a rebuild
SPLITS = ("train", "val")
ENCODINGS = ("png", "jpeg", "raw")
_REBUILD = "rebuild it with `dvc repro -f cache` (or restore it with `dvc checkout data/cache`)"
_FEATURES = {
    "path": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "image": tf.io.FixedLenFeature([], tf.string),
}


@dataclass(frozen=True)
class CachedSplit:
    """One split of the cache: its shard files and what each record holds."""

    shards: tuple[str, ...]
    paths: tuple[str, ...]  # manifest paths, in record order
    image_size: int
    encoding: str

    def __len__(self) -> int:
        return len(self.paths)


# --- Writing ------------------------------------------------------------------------------


def build_cache(
    prepared_dir: str | Path,
    cache_dir: str | Path,
    *,
    image_size: int,
    params: CacheParams,
    root: str | Path | None = None,
) -> dict[str, int]:
    """Decode and resize every image of ``prepared_dir``'s splits into ``cache_dir``.

    ``root`` is joined in front of manifest paths (default: the working directory, as
    in the stages). The directory is swapped in whole on success. Returns counts
    (``images``, ``bytes``) for metrics.
    """
    prepared_dir = Path(prepared_dir)
    class_names = read_classes(prepared_dir / "classes.json")
    index: dict = {
        "format": FORMAT,
        "image_size": image_size,
        "encoding": params.encoding,
        "quality": params.quality,
        "splits": {},
    }
    total = 0
    with replace_directory(cache_dir) as tmp:
        for split in SPLITS:
            manifest = read_manifest(prepared_dir / f"{split}.csv", class_names, root)
            shards = _write_split(tmp, split, manifest, image_size, params)
            index["splits"][split] = {
                "paths": list(manifest.paths),
                "shards": shards,
                # Checked by readers: a truncated shard is found before training starts.
                "shard_bytes": [(tmp / name).stat().st_size for name in shards],
            }
            total += len(manifest)
            log.info("cached %d %s images in %d shard(s)", len(manifest), split, len(shards))
        write_json(tmp / INDEX, index)
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return {"images": total, "bytes": size}


def _write_split(
    folder: Path, split: str, manifest: Manifest, image_size: int, params: CacheParams
) -> list[str]:
    def encode(path, label):
        pixels = load_image(path, image_size)
        pixels = tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)
        if params.encoding == "png":
            # zlib level 1: far faster than the default level, hardly larger.
            data = tf.io.encode_png(pixels, compression=1)
        elif params.encoding == "jpeg":
            data = tf.io.encode_jpeg(pixels, quality=params.quality, chroma_downsampling=False)
        else:
            data = tf.io.serialize_tensor(pixels)
        return path, label, data

    ds = tf.data.Dataset.from_tensor_slices(
        (list(manifest.paths), tf.constant(manifest.labels, tf.int64))
    )
    # Parallel decode, results in manifest order, a bounded number in flight.
    ds = ds.map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(64)
    shards: list[str] = []
    writer = None
    for i, (path, label, data) in enumerate(ds.as_numpy_iterator()):
        if i % params.shard_images == 0:
            if writer is not None:
                writer.close()
            shards.append(f"{split}-{len(shards):05d}.tfrecord")
            writer = tf.io.TFRecordWriter(str(folder / shards[-1]))
        example = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "path": _bytes(path),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                    "image": _bytes(data),
                }
            )
        )
        writer.write(example.SerializeToString())
    if writer is not None:
        writer.close()
    return shards


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


# --- Reading ------------------------------------------------------------------------------


def open_split(
    cache_dir: str | Path, split: str, manifest: Manifest, image_size: int
) -> CachedSplit:
    """The cached ``split``, checked against ``manifest`` and ``image_size``.

    A missing cache is a SourceNotFoundError; one made for other paths, another size or
    by another version of this code is a DataError. Both say how to rebuild it.
    """
    cache_dir = Path(cache_dir)
    index = _read_index(cache_dir)
    if index["format"] != FORMAT or split not in index["splits"]:
        raise DataError(f"{cache_dir} was written by another version of animalcam; {_REBUILD}.")
    if index["image_size"] != image_size:
        raise DataError(
            f"{cache_dir} holds {index['image_size']} px images but {image_size} px are "
            f"needed; {_REBUILD}."
        )
    entry = index["splits"][split]
    if tuple(entry["paths"]) != tuple(manifest.paths):
        raise DataError(
            f"{cache_dir} was built from another {split} split than the current manifest; "
            f"{_REBUILD}."
        )
    for name, size in zip(entry["shards"], entry["shard_bytes"], strict=True):
        shard = cache_dir / name
        if not shard.is_file() or shard.stat().st_size != size:
            raise DataError(
                f"{shard} is missing or has another size than when it was written (a "
                f"killed copy, a disk error?); {_REBUILD}."
            )
    return CachedSplit(
        shards=tuple(str(cache_dir / name) for name in entry["shards"]),
        paths=tuple(entry["paths"]),
        image_size=image_size,
        encoding=index["encoding"],
    )


def _read_index(cache_dir: Path) -> dict:
    """``index.json``, checked for the fields readers use; one-line errors otherwise."""
    index_path = cache_dir / INDEX
    if not index_path.is_file():
        raise SourceNotFoundError(
            f"{index_path} does not exist; {_REBUILD}, or set train.input: files."
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        valid = (
            isinstance(index, dict)
            and isinstance(index.get("image_size"), int)
            and index.get("encoding") in ENCODINGS
            and isinstance(index.get("splits"), dict)
            and all(_valid_entry(entry) for entry in index["splits"].values())
        )
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise DataError(f"{index_path} cannot be read ({exc}); {_REBUILD}.") from None
    if not valid:
        raise DataError(f"{index_path} is not a cache index this code wrote; {_REBUILD}.")
    return index


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    paths, shards, sizes = entry.get("paths"), entry.get("shards"), entry.get("shard_bytes")
    return (
        isinstance(paths, list)
        and all(isinstance(p, str) for p in paths)
        and isinstance(shards, list)
        and all(isinstance(s, str) and "/" not in s and s not in ("", ".", "..") for s in shards)
        and isinstance(sizes, list)
        and len(sizes) == len(shards)
        and all(isinstance(n, int) for n in sizes)
    )


def cached_or_files(
    cache_dir: str | Path, split: str, manifest: Manifest, *, image_size: int, batch_size: int
) -> tf.data.Dataset:
    """Batches of ``manifest``'s images in order (no labels), from the cache when it fits,
    else decoded from the files (logged). For evaluate and prediction."""
    try:
        cached = open_split(cache_dir, split, manifest, image_size)
    except (SourceNotFoundError, DataError) as exc:
        log.warning("reading the original files instead of the image cache: %s", exc)
        return image_dataset(manifest.paths, image_size=image_size, batch_size=batch_size)
    return cached_dataset(cached, batch_size=batch_size, labels=False)


def decode_record(record: tf.Tensor, split: CachedSplit) -> tuple[tf.Tensor, tf.Tensor]:
    """``(image, label)``: float32 (S, S, 3) pixels in [0, 255] and the class index."""
    parsed = tf.io.parse_single_example(record, _FEATURES)
    if split.encoding == "png":
        pixels = tf.io.decode_png(parsed["image"], channels=3)
    elif split.encoding == "jpeg":
        pixels = tf.io.decode_jpeg(parsed["image"], channels=3)
    else:
        pixels = tf.io.parse_tensor(parsed["image"], tf.uint8)
    size = split.image_size
    pixels = tf.ensure_shape(pixels, (size, size, 3))
    return tf.cast(pixels, tf.float32), tf.cast(parsed["label"], tf.int32)


def cached_dataset(
    split: CachedSplit,
    *,
    batch_size: int,
    num_classes: int | None = None,
    labels: bool = True,
    augment: keras.Sequential | None = None,
    autotune: bool = True,
) -> tf.data.Dataset:
    """One pass over ``split`` in record (= manifest) order, batched and prefetched.

    Yields ``(images, labels)`` (labels one-hot float32 when ``num_classes`` is given)
    or, with ``labels=False``, images only; images as :func:`animalcam.dataset.image_dataset`.
    ``augment`` is applied to image batches in training mode (the fast path's copies).
    """
    ds = tf.data.TFRecordDataset(list(split.shards))
    ds = ds.map(
        lambda r: _example(r, split, num_classes, labels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    # TFRecords have no known length; Keras needs it to end an evaluation pass cleanly.
    ds = ds.batch(batch_size).apply(
        tf.data.experimental.assert_cardinality(steps_per_epoch(len(split), batch_size))
    )
    if augment is not None:
        ds = ds.map(
            (lambda x: augment(x, training=True))
            if not labels
            else (lambda x, y: (augment(x, training=True), y)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def cached_training_batches(
    split: CachedSplit,
    *,
    batch_size: int,
    num_classes: int,
    seed: int,
    first_epoch: int,
    end_epoch: int,
    shuffle_buffer: int,
    augment: keras.Sequential | None = None,
    autotune: bool = True,
) -> tf.data.Dataset:
    """Shuffled, augmented batches for epochs ``first_epoch .. end_epoch - 1`` from the cache.

    Each epoch reads the shards in an order drawn from ``(seed, epoch)`` and shuffles
    records through a buffer seeded the same way, so a resumed run sees the batches an
    uninterrupted run would have. ``steps_per_epoch(len(split), batch_size)`` batches an
    epoch; memory holds ``shuffle_buffer`` encoded records, not the dataset.
    """
    shards = tf.constant(list(split.shards))
    n_shards = len(split.shards)

    def epoch(e: int) -> tf.data.Dataset:
        pair = tf.constant([seed, e], tf.int64)
        order = tf.random.experimental.stateless_shuffle(tf.range(n_shards), seed=pair)
        files = tf.data.Dataset.from_tensor_slices(tf.gather(shards, order))
        ds = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(4, n_shards),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        # Shuffle the encoded records (small), decode afterwards.
        ds = ds.shuffle(shuffle_buffer, seed=seed * 1_000_003 + e)
        ds = ds.map(
            lambda r: _example(r, split, num_classes, True),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(batch_size)
        if augment is not None:
            ds = ds.map(
                lambda x, y: (augment(x, training=True), y),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        return ds

    # One dataset per epoch, chained: the shuffle seed must be a Python int.
    ds = epoch(first_epoch)
    for e in range(first_epoch + 1, end_epoch):
        ds = ds.concatenate(epoch(e))
    if end_epoch <= first_epoch:
        ds = ds.take(0)
    steps = steps_per_epoch(len(split), batch_size) * max(end_epoch - first_epoch, 0)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def _example(record, split: CachedSplit, num_classes: int | None, labels: bool):
    image, label = decode_record(record, split)
    if not labels:
        return image
    if num_classes is not None:
        label = tf.one_hot(label, num_classes, dtype=tf.float32)
    return image, label
