"""The prepared splits, and their image files as examples for the batch builder.

- :func:`read_classes`, :func:`read_manifest`: the prepare stage's ``classes.json`` and
  ``<split>.csv``, checked, as a :class:`Manifest`.
- :class:`FileExamples`: image files decoded and resized on the fly by ``tf.data`` (in
  parallel, in a fixed order), for animalcam.batches; nothing holds the whole dataset
  in memory. Every image is float32 RGB with values in [0, 255]: the model does its own
  preprocessing (see animalcam.layers.Preprocess), so train, evaluate and explain all
  feed the same pixels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from animalcam.batches import UNLABELLED, IndexedExamples
from animalcam.errors import DataError, SourceNotFoundError
from animalcam.images import DEFAULT_MAX_PIXELS, ImageReadError, model_pixels
from animalcam.outputs import read_csv

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label")  # required; prepare also writes source and group
# The reason given for a file that cannot be opened at all (gone, a folder, no permission).
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Manifest:
    """One split: image paths (as tf.data opens them) and class indices, row by row."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]  # file sizes in bytes, for the resume fingerprint

    def __len__(self) -> int:
        return len(self.paths)


def read_classes(path: str | Path) -> list[str]:
    """Class names in index order from ``classes.json`` (a JSON list of unique strings)."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path} does not exist; run the prepare stage first.")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun the prepare stage.") from None
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise DataError(
            f"{path} should hold a JSON list of at least 2 unique class names, got {names!r}; "
            "rerun the prepare stage."
        )
    return names


def read_manifest(
    path: str | Path, class_names: Sequence[str], root: str | Path | None = None
) -> Manifest:
    """Read a prepared split (``path,label,...`` CSV) into a :class:`Manifest`.

    Paths in the CSV are relative to the repository root; ``root`` (default: the
    working directory, where stages run) is joined in front of them. Unknown labels,
    missing columns, missing image files and an empty split are a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path} does not exist; run the prepare stage first.")
    rows = read_csv(path)
    if not rows:
        raise DataError(f"{path} lists no images; check the prepare stage's rejected.csv.")
    missing_columns = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing_columns:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing_columns)}; expected a header "
            "starting path,label. Rerun the prepare stage."
        )
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels, sizes, missing = [], [], [], []
    for line, row in enumerate(rows, start=2):
        if row["label"] not in index:
            raise DataError(
                f"{path}:{line}: label {row['label']!r} is not one of the classes "
                f"{list(class_names)}; rerun the prepare stage."
            )
        image = Path(row["path"]) if root is None else Path(root) / row["path"]
        try:
            sizes.append(os.stat(image).st_size)
        except FileNotFoundError:
            missing.append(str(image))
            continue
        paths.append(str(image))
        labels.append(index[row["label"]])
    if missing:
        raise DataError(
            f"{path}: {len(missing)} image file(s) do not exist (first: {missing[0]}); "
            "rerun the prepare stage (or `dvc pull`) to restore them."
        )
    return Manifest(tuple(paths), tuple(labels), tuple(sizes))


def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image file as float32 RGB ``(image_size, image_size, 3)`` in [0, 255], in a graph.

    The pixels are :func:`animalcam.images.model_pixels` of the file, the same function
    that the served model and ``predict`` apply to their inputs (EXIF orientation,
    transparency, colour modes, first frame, bilinear resize to a square). No pixel
    limit here: prepare already refused what is over ``prepare.max_pixels``.
    """

    def read(name) -> np.ndarray:
        return model_pixels(_file_name(name), (image_size, image_size), max_pixels=None)

    pixels = tf.numpy_function(read, [path], tf.uint8, stateful=False)
    pixels.set_shape([image_size, image_size, 3])
    return tf.cast(pixels, tf.float32)


def load_image_or_reason(
    path: tf.Tensor, image_size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[tf.Tensor, tf.Tensor]:
    """A file nobody has checked (``animalcam predict``) as ``(pixels, reason)``, in a graph.

    ``pixels``: uint8 RGB ``(image_size, image_size, 3)``, :func:`load_image`'s pixels
    before the cast; ``reason``: an empty string for a usable image, else why it is not
    (``"truncated: ..."``, ``"not_an_image: ..."``, ``"unreadable: ..."``) with zero
    pixels, so that one bad file does not stop a stream of them. The pixel limit is
    checked from the header.
    """

    def read(name) -> tuple[np.ndarray, bytes]:
        try:
            pixels = model_pixels(_file_name(name), (image_size, image_size), max_pixels=max_pixels)
            return pixels, b""
        except ImageReadError as exc:
            reason = str(exc)
        except OSError as exc:  # vanished, a folder, no permission
            reason = f"{UNREADABLE}: {exc.strerror or exc}"
        return np.zeros((image_size, image_size, 3), np.uint8), reason.encode("utf-8")

    pixels, reason = tf.numpy_function(read, [path], (tf.uint8, tf.string), stateful=False)
    pixels.set_shape([image_size, image_size, 3])
    reason.set_shape([])
    return pixels, reason


def _file_name(name) -> str:
    name = name.item() if isinstance(name, np.ndarray) else name  # eager: a 0-d array
    return os.fsdecode(name)


class FileExamples(IndexedExamples):
    """Image files by index: ``(load_image(paths[i]), labels[i])``.

    ``labels`` are class indices; None for inference (they read as UNLABELLED).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, image_size: int):
        if len(paths) == 0:
            raise DataError("no images to read: the list of paths is empty.")
        if labels is not None and len(labels) != len(paths):
            raise DataError(f"{len(paths)} paths but {len(labels)} labels; they must pair up.")
        self.paths = tf.constant(list(paths), tf.string)
        known = [UNLABELLED] * len(paths) if labels is None else labels
        self.labels = tf.constant(np.asarray(known), tf.int32)
        self.image_size = image_size

    @classmethod
    def of(cls, manifest: Manifest, image_size: int) -> FileExamples:
        return cls(manifest.paths, manifest.labels, image_size)

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def take(self, order: tf.Tensor, epoch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(order).map(
            self._example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def _example(self, i):
        image = load_image(tf.gather(self.paths, i), self.image_size)
        return image, tf.gather(self.labels, i)
