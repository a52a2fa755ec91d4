"""What an exported model needs beside its file: class names, input size, input form.

A ``.keras`` file carries its class names and input size inside (see
:mod:`animalcam.layers`); a SavedModel, a LiteRT (``.tflite``) or an ONNX file carries
neither. The export stage writes them, and ``animalcam predict`` reads them, as a small
JSON side file, :data:`METADATA_FILE`::

    {"class_names": ["butterfly", "cat", ...], "image_size": 224, "input": "rgb_uint8_0_255"}

- next to an exported file (``models/export/model_int8.tflite`` ->
  ``models/export/export_metadata.json``; every file of one export shares it, since they
  come from one model), or
- inside a SavedModel folder (``models/export/saved_model/export_metadata.json``).

``input`` says what the model takes: :data:`RGB_0_255` is a batch ``(N, image_size,
image_size, 3)`` of RGB pixels with values in [0, 255] (as float32, or as the integers
of a quantized model), read and resized by :mod:`animalcam.images` and not otherwise
preprocessed: the backbone's preprocessing is inside the exported graph. Copy the JSON
file along with the model to a device.

No TensorFlow here: the export stage and predict both import it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from animalcam.errors import ModelError, SourceNotFoundError
from animalcam.outputs import write_json

METADATA_FILE = "export_metadata.json"
RGB_0_255 = "rgb_uint8_0_255"
INPUT_FORMS = (RGB_0_255,)


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported model's outputs mean and what its input is."""

    class_names: tuple[str, ...]
    image_size: int  # side of the square input, in pixels
    input: str = RGB_0_255

    def __post_init__(self) -> None:
        names = self.class_names
        if (
            len(names) < 2
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise ModelError(
                f"class_names must be at least 2 unique non-empty names, got {list(names)!r}."
            )
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ModelError(f"image_size must be a positive integer, got {self.image_size!r}.")
        if self.input not in INPUT_FORMS:
            raise ModelError(f"input {self.input!r} is not one of {', '.join(INPUT_FORMS)}.")


def metadata_path(model_path: str | Path) -> Path:
    """Where the side file of ``model_path`` lives: inside it when it is a folder (a
    SavedModel), else beside it."""
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    return folder / METADATA_FILE


def write_export_metadata(
    model_path: str | Path, class_names: Sequence[str], image_size: int
) -> Path:
    """Write the side file for ``model_path`` (an exported file or SavedModel folder,
    which must exist); returns its path."""
    metadata = ExportMetadata(tuple(class_names), int(image_size))
    path = metadata_path(model_path)
    write_json(path, {**asdict(metadata), "class_names": list(metadata.class_names)})
    return path


def read_export_metadata(model_path: str | Path) -> ExportMetadata:
    """The side file of ``model_path``, checked.

    SourceNotFoundError when it is missing, ModelError when it is not what
    :func:`write_export_metadata` writes.
    """
    path = metadata_path(model_path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"{model_path} has no {METADATA_FILE} beside it (class names and input size); "
            "copy it along with the model, or rerun the export stage (dvc repro export)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ExportMetadata(
            tuple(data["class_names"]), data["image_size"], data.get("input", RGB_0_255)
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path} is not valid export metadata ({exc}); expected "
            '{"class_names": [...], "image_size": N, "input": "' + RGB_0_255 + '"}. '
            "Rerun the export stage (dvc repro export)."
        ) from None
