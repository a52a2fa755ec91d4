"""Params as MLflow records them: flat dotted keys, values spelled as in params.yaml."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def flatten_params(params: Any, keys: Iterable[str] | None = None) -> dict[str, str]:
    """``{"train.augment.rotation": "20.0", ...}``, for every key or only for ``keys``.

    ``params`` is an :class:`animalcam.params.Params` or a nested mapping. ``keys`` are
    written as in a stage's ``params`` in dvc.yaml: whole sections (``train``) or dotted
    keys (``train.image_size``, ``train.augment``); keys ``params`` lacks are skipped.
    Values are spelled as in params.yaml (``true``, ``null``), so they read the same as
    ``dvc params diff``.
    """
    tree = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif value is None:
            flat[prefix] = "null"
        elif isinstance(value, bool):
            flat[prefix] = "true" if value else "false"
        else:
            flat[prefix] = str(value)

    walk("", tree)
    if keys is None:
        return flat
    wanted = tuple(keys)
    return {
        name: value
        for name, value in flat.items()
        if any(name == key or name.startswith(f"{key}.") for key in wanted)
    }
