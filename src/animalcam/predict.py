"""``animalcam predict``: image files in, one CSV row per file out, Grad-CAM panels on request.

- :func:`image_paths`: the files that PATH arguments (files, folders walked recursively,
  globs) name, listed lazily, so that a folder of 100,000 photos starts at once and is
  never held in memory.
- :func:`image_batches`: those files decoded in parallel by ``tf.data`` with the one
  image reader (:func:`animalcam.dataset.load_image_or_reason`: EXIF orientation,
  transparency, formats, pixel limit) and batched (:func:`animalcam.batches.streamed_batches`);
  a file that is not a usable image travels with its reason instead of pixels.
- :func:`predict_files`: runs a :class:`animalcam.model_runners.ModelRunner` on each
  batch while the next one is decoded, and writes one CSV row per file as it goes
  (:data:`CSV_COLUMNS`; flushed after every batch, so a crash keeps every finished
  batch); with ``gradcam_dir`` it computes Grad-CAM of the predicted class in the same
  pass (:class:`animalcam.gradcam.GradCam`, Keras models only) and writes one panel per
  image.

Memory is flat in the number of files: a batch of pixels at a time, plus tf.data's
prefetch.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
from tqdm import tqdm

from animalcam import progress
from animalcam.errors import AnimalcamError, DataError, ModelError, SourceNotFoundError
from animalcam.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import tensorflow as tf

    from animalcam.model_runners import ModelRunner

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "label", "confidence", "top_k", "error")
STDOUT = "-"  # --output - writes the CSV to standard output
# Batch of 32: what serving uses; on a 2-core CPU VGG16 at 224 px is then about 95% of its
# best throughput, with a few hundred MB of activations.
DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class PredictSummary:
    """What a run did: rows written, rows whose file could not be used, wall time."""

    rows: int
    failed: int
    seconds: float


def check_paths(patterns: Sequence[str]) -> None:
    """Each PATH argument must name an existing file or folder, or be a glob that matches
    something; otherwise one SourceNotFoundError naming it (before a model is loaded)."""
    for pattern in patterns:
        if os.path.isdir(pattern) or os.path.isfile(pattern):
            continue
        if os.path.exists(pattern):
            raise DataError(f"{pattern} is neither a file nor a folder (a device or a FIFO?).")
        if glob.has_magic(pattern) and next(glob.iglob(pattern, recursive=True), None):
            continue
        raise SourceNotFoundError(
            f"{pattern} does not exist (no file, folder or glob match); give image files, "
            "folders or globs such as 'photos/**/*.jpg'."
        )


def image_paths(patterns: Iterable[str]) -> Iterator[str]:
    """Every file that ``patterns`` name, lazily, in argument order.

    A file is taken as it is, whatever its name (if it is no image, its row says so); a
    folder is walked recursively in name order, every regular file in it taken, hidden
    ones (``.name``) and symbolic links to folders skipped; a glob (``*``, ``?``, ``[``,
    ``**`` across folders) yields its matches in the order the file system lists them,
    a matched folder walked as above. A file named twice gets two rows.
    """
    for pattern in patterns:
        if os.path.isdir(pattern):
            yield from _folder_files(pattern)
        elif os.path.exists(pattern) or not glob.has_magic(pattern):
            yield pattern
        else:
            for match in glob.iglob(pattern, recursive=True):
                if os.path.isdir(match):
                    yield from _folder_files(match)
                elif os.path.isfile(match):
                    yield match


def without_outputs(paths: Iterable[str], output: str, gradcam_dir: str | None) -> Iterator[str]:
    """``paths`` minus the run's own outputs (the CSV, the Grad-CAM panels), which a
    folder being predicted may hold: they appear while the walk goes on."""
    csv = os.path.realpath(output) if output != STDOUT else None
    panels = os.path.join(os.path.realpath(gradcam_dir), "") if gradcam_dir else None
    for path in paths:
        real = os.path.realpath(path)
        if real == csv or (panels is not None and real.startswith(panels)):
            continue
        yield path


def _folder_files(folder: str) -> Iterator[str]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as exc:
        log.warning("skipped folder %s: %s", folder, exc.strerror or exc)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _folder_files(entry.path)
        elif entry.is_file():  # FIFOs, sockets, devices and broken links are not
            yield entry.path


def image_batches(
    paths: Iterator[str],
    image_size: int,
    batch_size: int,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tf.data.Dataset:
    """Batches ``(paths, pixels uint8 (B, S, S, 3), reasons)`` of the files ``paths``
    yields, decoded in parallel, in order; a reason is empty for a usable image."""
    import tensorflow as tf

    from animalcam.batches import BatchSettings, streamed_batches
    from animalcam.dataset import load_image_or_reason

    # Bytes, not str: file names need not be valid UTF-8.
    names = tf.data.Dataset.from_generator(
        lambda: (os.fsencode(path) for path in paths),
        output_signature=tf.TensorSpec((), tf.string),
    )

    def read(path):
        return (path, *load_image_or_reason(path, image_size, max_pixels=max_pixels))

    examples = names.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return streamed_batches(examples, BatchSettings(batch_size))


def top_k_text(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> str:
    """``dog:0.9100;cat:0.0500;horse:0.0200``: the ``k`` likeliest classes, likeliest first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return ";".join(f"{class_names[i]}:{probabilities[i]:.4f}" for i in order)


def csv_row(
    path: str, error: str, probabilities: np.ndarray, class_names: Sequence[str], k: int
) -> list[str]:
    """One row of :data:`CSV_COLUMNS`: the label, its probability and the top ``k``; or,
    for a file that is no usable image (``error`` set), its path and the reason only."""
    if error:
        return [path, "", "", "", error]
    best = int(np.argmax(probabilities))
    top = top_k_text(probabilities, class_names, k)
    return [path, class_names[best], f"{probabilities[best]:.4f}", top, ""]


@contextlib.contextmanager
def _csv_output(output: str | Path) -> Iterator[TextIO]:
    if str(output) == STDOUT:
        yield sys.stdout
        return
    path = Path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes.
        f = open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        raise AnimalcamError(
            f"cannot write the CSV {path} ({exc.strerror or exc}); give --output a file "
            "path in a writable folder, or - for standard output."
        ) from None
    with f:
        yield f


def predict_files(
    runner: ModelRunner,
    paths: Iterator[str],
    output: str | Path,
    *,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = DEFAULT_BATCH_SIZE,
    gradcam_dir: str | Path | None = None,
) -> PredictSummary:
    """Predict every file ``paths`` yields with ``runner``; one row per file in the CSV
    ``output`` (``"-"``: standard output), written and flushed batch by batch.

    ``gradcam_dir``: also write one Grad-CAM panel per usable image there (the photo,
    the predicted class's heatmap, the overlay; heading: file, label, confidence),
    named ``<row number>_<file name>.png``; needs a Keras model (ModelError otherwise).
    """
    cam = None
    if gradcam_dir is not None:
        if runner.keras_model is None:
            raise ModelError(
                f"--gradcam needs a Keras model (.keras or an MLflow model); {runner.source} "
                f"is a {runner.kind} model, which has no gradients to explain."
            )
        from animalcam.gradcam import GradCam

        cam = GradCam(runner.keras_model)
    batches = image_batches(paths, runner.image_size, batch_size)
    k = min(top_k, len(runner.class_names))
    rows = failed = 0
    started = time.perf_counter()
    with (
        _csv_output(output) as f,
        tqdm(unit="image", desc="predict", disable=progress.quiet()) as bar,
    ):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for names, pixels, reasons in batches:
            files = [os.fsdecode(name) for name in names.numpy()]
            errors = [reason.decode("utf-8", "replace") for reason in reasons.numpy()]
            probabilities, heatmaps = _predict_usable(runner, cam, pixels.numpy(), errors)
            if cam is not None:
                _write_panels(gradcam_dir, rows, files, errors, probabilities, heatmaps, runner)
            for file, error, p in zip(files, errors, probabilities, strict=True):
                writer.writerow(csv_row(file, error, p, runner.class_names, k))
            f.flush()  # a crash or Ctrl-C later keeps every row written so far
            rows += len(files)
            failed += sum(bool(error) for error in errors)
            bar.update(len(files))
    return PredictSummary(rows, failed, time.perf_counter() - started)


def _predict_usable(
    runner, cam, pixels: np.ndarray, errors: list[str]
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """``(probabilities (B, classes), heatmaps)`` of a batch: zeros and None for unusable
    files, which never reach the model (nor does an all-unusable batch: an empty batch
    through a convolution fails under oneDNN). Heatmaps only with Grad-CAM (``cam``),
    whose one pass gives the probabilities too."""
    usable = np.array([not error for error in errors])
    probabilities = np.zeros((len(errors), len(runner.class_names)), np.float32)
    heatmaps: list[np.ndarray | None] = [None] * len(errors)
    if usable.any():
        images = pixels if usable.all() else pixels[usable]
        if cam is None:
            probabilities[usable] = runner.predict(images)
        else:
            maps, probs = cam(images.astype(np.float32))
            probabilities[usable] = probs
            for i, heatmap in zip(np.flatnonzero(usable), maps, strict=True):
                heatmaps[i] = heatmap
    return probabilities, heatmaps


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def panel_name(row: int, path: str) -> str:
    """``000042_IMG_1234.png`` for the 42nd row: CSV order first, then the file's name."""
    stem = _UNSAFE.sub("-", Path(path).stem).strip("-.") or "image"
    return f"{row:06d}_{stem[:80]}.png"


def _write_panels(folder, first_row, files, errors, probabilities, heatmaps, runner) -> None:
    """One Grad-CAM panel per usable image of a batch, in ``folder``."""
    from animalcam.examples import read_rgb
    from animalcam.figures import percent
    from animalcam.gradcam_examples import Explanation
    from animalcam.gradcam_panels import panel_cell_size, panel_png
    from animalcam.images import ImageReadError, resize_for_model
    from animalcam.outputs import write_bytes

    for i, (file, error) in enumerate(zip(files, errors, strict=True)):
        if error:
            continue
        try:
            photo = read_rgb(file)  # the original, for display (decoded again: cheap
        except (ImageReadError, SourceNotFoundError, OSError) as exc:  # next to Grad-CAM)
            log.warning("no Grad-CAM panel for %s: %s", file, exc)
            continue
        width, height = panel_cell_size(*photo.shape[:2])
        if width < photo.shape[1]:  # a large photo drawn at the panel's size
            photo = resize_for_model(photo, (height, width))
        best = int(np.argmax(probabilities[i]))
        label, confidence = runner.class_names[best], float(probabilities[i][best])
        explanation = Explanation(
            # The true class is unknown: "actual" is the prediction (no second map).
            row={"path": file, "actual": label, "predicted": label, "confidence": confidence},
            image=photo,
            model_input=photo,
            predicted_index=best,
            predicted_heatmap=heatmaps[i],
            predicted_probability=confidence,
            true_index=best,
        )
        heading = f"{Path(file).name}: {label} ({percent(confidence)})"
        png = panel_png(explanation, heading=heading)
        write_bytes(Path(folder) / panel_name(first_row + i + 1, file), png)
