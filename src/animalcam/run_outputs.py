"""A pipeline run's outputs as the report reads them: whatever is there, and for what is
not, which stage writes it.

Every reader returns None for a file that is missing or unreadable (logged), never
raises: a report is made from any run, a partial one included. :func:`recorded_params`
gives the params the outputs were made with, as ``dvc.lock`` recorded them per stage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from animalcam.dvc_files import PARAMS_FILE, read_dvc_lock, stage_writing
from animalcam.errors import AnimalcamError
from animalcam.outputs import read_csv
from animalcam.params import Params, as_dict, params_from_dict

log = logging.getLogger(__name__)

# The run's files, as the stages write them (dvc.yaml lists them as the report's deps).
CLASSES = "data/prepared/classes.json"
PREPARED = "data/prepared"
SPLITS = ("train", "val", "test")  # data/prepared/<split>.csv; test only with prepare.test_split
REJECTED = "data/prepared/rejected.csv"
DATA_METRICS = "metrics/data.json"
AUDIT_METRICS = "metrics/audit.json"
LABEL_ISSUES = "plots/audit/label_issues.csv"
LABEL_ISSUES_PNG = "plots/audit/label_issues.png"
MODEL = "models/model.keras"
MODEL_RUN = "models/mlflow_run.json"
TRAIN_METRICS = "metrics/train.json"
HISTORY = "plots/train/history.csv"
EVALUATE_METRICS = "metrics/evaluate.json"
EVALUATE_PLOTS = "plots/evaluate"
EXPLAIN_METRICS = "metrics/explain.json"
GRADCAM = "plots/gradcam"
EXPORT_METRICS = "metrics/export.json"


class RunOutputs:
    """The files of one run under ``root`` (the repository, or a ``dvc exp`` workspace)."""

    def __init__(self, root: str | Path = "."):
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def exists(self, relative: str) -> bool:
        return self.path(relative).exists()

    def json(self, relative: str) -> dict[str, Any] | None:
        """A JSON object file, None when missing or not a readable JSON object."""
        try:
            data = json.loads(self.path(relative).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("report: ignoring %s (%s)", relative, exc)
            return None
        return data if isinstance(data, dict) else None

    def csv(self, relative: str) -> list[dict[str, str]] | None:
        """A CSV file's rows (header keys), None when missing or unreadable."""
        try:
            return read_csv(self.path(relative))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("report: ignoring %s (%s)", relative, exc)
            return None

    def text(self, relative: str) -> str | None:
        try:
            return self.path(relative).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("report: ignoring %s (%s)", relative, exc)
            return None

    def images(self, relative: str) -> list[Path]:
        """The PNG files of a folder, by name; empty when there is no folder."""
        folder = self.path(relative)
        return sorted(folder.glob("*.png")) if folder.is_dir() else []

    def stage_of(self, relative: str, default: str | None = None) -> str | None:
        """The stage dvc.yaml says writes ``relative`` (``default`` when none does)."""
        return stage_writing(relative, self.root) or default


def recorded_params(root: str | Path, current: Params) -> tuple[Params, str]:
    """The params the run's outputs were made with, and where they come from.

    Each stage's entry in ``dvc.lock`` holds the values of the params it depends on, as
    it last ran; they are laid over ``current`` (params.yaml, which also gives the keys
    no stage lists: ``speed``, ``mlflow``). Without a dvc.lock, or with one that does
    not fit the params' schema (written by older code), ``current`` as it is.
    """
    lock = read_dvc_lock(root)
    values: dict[str, Any] = {}
    for entry in (lock.get("stages") or {}).values():
        listed = ((entry or {}).get("params") or {}).get(PARAMS_FILE) or {}
        if isinstance(listed, Mapping):
            values.update(_dotted(listed))
    if not values:
        return current, f"{PARAMS_FILE} (no stage recorded in dvc.lock yet)"
    tree = as_dict(current)
    for key, value in values.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    try:
        return params_from_dict(
            tree
        ), f"dvc.lock (the stages' params as they last ran; the rest from {PARAMS_FILE})"
    except AnimalcamError as exc:
        log.warning("report: dvc.lock's params do not fit params.yaml's schema (%s)", exc)
        return current, f"{PARAMS_FILE} (dvc.lock's params do not fit: {exc})"


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"train.augment.rotation": 20.0, ...}``, values as they are."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_dotted(value, name))
        else:
            flat[name] = value
    return flat
