"""The prepared-image cache: every usable image decoded and resized ONCE, read many times.

Training at 224 px decodes each original (a JPEG or PNG of a few hundred pixels a side)
and resizes it every epoch; the images stage does that once per image and writes the
result to sharded TFRecords under ``data/images/``, which train and evaluate stream
instead. The pixels are :func:`animalcam.images.model_pixels` of each file, exactly what
the served model computes from the same file: ``train.image_size``, bilinear, aspect ratio
not kept. No margin: the study's augmentations (rotation, shift, shear, zoom, flip) all act
on the resized square with nearest-edge fill, so extra pixels around it would never be
used.

Layout::

    data/images/index.json          format, image_size, encoding, and per split the
                                   manifest paths (in order), its shard files and their sizes
    data/images/<split>-NNNNN.tfrecord   records {path, label, image} in manifest order

``image`` is the serialised uint8 tensor (``images.encoding: raw``: exactly the pixels
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

import tensorflow as tf

from animalcam.batches import BatchSettings, Examples, permutation
from animalcam.dataset import FileExamples, Manifest, load_image, read_classes, read_manifest
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.fingerprints import describe_changes, digest
from animalcam.outputs import replace_directory, write_json
from animalcam.params import ImagesParams

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 2  # bump when the record layout changes; readers then ask for a rebuild
SPLITS = ("train", "val", "test")  # test only when prepare made one (prepare.test_split)
ENCODINGS = ("png", "jpeg", "raw")
_REBUILD = "rebuild it with `dvc repro -f images` (or restore it with `dvc checkout data/images`)"
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
    params: ImagesParams,
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
            if split == "test" and not (prepared_dir / "test.csv").is_file():
                continue
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
    folder: Path, split: str, manifest: Manifest, image_size: int, params: ImagesParams
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
    entry = index["splits"].get(split, {"paths": None})
    built = _built_from(index.get("format"), index["image_size"], entry["paths"])
    changes = describe_changes(built, _built_from(FORMAT, image_size, list(manifest.paths)))
    if changes:
        raise DataError(
            f"{cache_dir} was not built for this {split} split (differs: {changes}; it holds "
            f"{index['image_size']} px images, {image_size} px are needed); {_REBUILD}."
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


def _built_from(format_: object, image_size: object, paths: object) -> dict:
    """What a split of the store is built from, compared with
    :func:`animalcam.fingerprints.describe_changes` (the paths as one digest)."""
    return {"format": format_, "image_size": image_size, "paths": digest(paths)}


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


def image_examples(
    cache_dir: str | Path, split: str, manifest: Manifest, image_size: int
) -> Examples:
    """``manifest``'s images as examples, from the cache when it fits, else decoded from
    the files (logged). For evaluate and prediction, which can do without the cache."""
    try:
        return CachedExamples(open_split(cache_dir, split, manifest, image_size))
    except (SourceNotFoundError, DataError) as exc:
        log.warning("reading the original files instead of the image cache: %s", exc)
        return FileExamples.of(manifest, image_size)


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


class CachedExamples(Examples):
    """A cached split's records as examples for animalcam.batches.

    TFRecords are read in sequence, not by index: in order means record (= manifest)
    order; shuffled means the shards in an order drawn from ``(seed, epoch)``, their
    records interleaved and shuffled through a buffer seeded the same way. Memory then
    holds ``BatchSettings.shuffle_buffer`` encoded records, not the dataset.
    """

    def __init__(self, split: CachedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def in_order(self) -> tf.data.Dataset:
        return self._decoded(tf.data.TFRecordDataset(list(self.split.shards)))

    def shuffled(self, settings: BatchSettings, epoch: int) -> tf.data.Dataset:
        seed = settings.seed
        shards = tf.constant(list(self.split.shards))
        files = tf.data.Dataset.from_tensor_slices(
            tf.gather(shards, permutation(len(shards), seed, epoch))
        )
        records = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(4, len(self.split.shards)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        # Shuffle the encoded records (small), decode afterwards.
        return self._decoded(
            records.shuffle(settings.shuffle_buffer, seed=seed * 1_000_003 + epoch)
        )

    def _decoded(self, records: tf.data.Dataset) -> tf.data.Dataset:
        return records.map(
            lambda r: decode_record(r, self.split),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
