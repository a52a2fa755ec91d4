"""What the pipeline's own files say about a stage: ``dvc.yaml`` (its deps and params) and
``dvc.lock`` (the hashes of what the stages wrote).

The one reader of both, so that no module keeps its own copy of a stage's params sections
or data paths. They are read from the workspace the stage runs in: DVC runs a stage in the
folder of its ``dvc.yaml``, and a queued experiment in a temporary copy that holds that
experiment's own ``dvc.yaml``. A missing file gives empty answers (a stage run outside a
DVC repository); an unreadable one a warning and empty answers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path, PurePosixPath

import yaml

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"  # the file a bare key in a stage's `params` refers to
DATA_DIR = "data"  # deps under it are data; the rest (stages/, src/, models/) are not


@dataclasses.dataclass(frozen=True)
class DeclaredStage:
    """A stage's entry in ``dvc.yaml``.

    ``params``: the params.yaml keys it depends on, whole sections (``train``) or dotted
    keys (``train.image_size``), as written; None when it depends on all of params.yaml.
    ``deps``: every dep path, code and data.
    """

    params: tuple[str, ...] | None = ()
    deps: tuple[str, ...] = ()

    @property
    def data_deps(self) -> tuple[str, ...]:
        """The deps under ``data/``, in the order dvc.yaml lists them."""
        return tuple(dep for dep in self.deps if PurePosixPath(dep).parts[:1] == (DATA_DIR,))

    @property
    def data(self) -> str | None:
        """The data the stage reads: its first data dep (those after it, such as the
        ``data/raw`` that prepared manifests point into, are read through it)."""
        return self.data_deps[0] if self.data_deps else None


def declared_stage(stage: str, workspace: str | Path = ".") -> DeclaredStage:
    """``stage``'s entry in ``workspace/dvc.yaml``; empty without one or without the stage."""
    stages = _read_yaml(Path(workspace) / "dvc.yaml").get("stages")
    entry = stages.get(stage) if isinstance(stages, dict) else None
    if not isinstance(entry, dict):
        return DeclaredStage()
    deps = entry.get("deps") or []
    return DeclaredStage(
        params=_params_keys(entry.get("params") or []),
        deps=tuple(str(dep) for dep in deps if isinstance(dep, str))
        if isinstance(deps, list)
        else (),
    )


def stage_writing(path: str, workspace: str | Path = ".") -> str | None:
    """The stage whose ``outs``, ``metrics`` or ``plots`` in ``workspace/dvc.yaml`` hold
    ``path`` (the output itself or a folder above it); None when no stage writes it."""
    stages = _read_yaml(Path(workspace) / "dvc.yaml").get("stages")
    target = PurePosixPath(path)
    for name, entry in (stages if isinstance(stages, dict) else {}).items():
        for kind in ("outs", "metrics", "plots"):
            listed = entry.get(kind) if isinstance(entry, dict) else None
            for out in listed if isinstance(listed, list) else ():
                out = next(iter(out), "") if isinstance(out, dict) else out
                out = PurePosixPath(str(out).rstrip("/"))
                if target == out or out in target.parents:
                    return str(name)
    return None


def _params_keys(entries: object) -> tuple[str, ...] | None:
    """The params.yaml keys of a stage's ``params`` list: bare keys, and the keys listed
    under ``params.yaml:`` (None, all of it, when that lists none). Other files are not
    params.yaml, whose values are all a run logs."""
    if not isinstance(entries, list):
        return ()
    keys: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict) and PARAMS_FILE in entry:
            listed = entry[PARAMS_FILE]
            if not listed:
                return None
            keys.extend(str(key) for key in listed if isinstance(key, str))
    return tuple(keys)


def read_dvc_lock(workspace: str | Path = ".") -> dict:
    """``dvc.lock`` as a dict (empty when missing or unreadable)."""
    return _read_yaml(Path(workspace) / "dvc.lock")


def lock_outs(lock: dict) -> dict[str, dict]:
    """Every stage's outs in a ``dvc.lock`` dict, by path (without a trailing ``/``)."""
    outs = {}
    for entry in (lock.get("stages") or {}).values():
        for out in (entry or {}).get("outs") or []:
            if isinstance(out, dict) and "path" in out:
                outs[str(out["path"]).rstrip("/")] = out
    return outs


def lock_hash(entry: dict) -> str | None:
    """The hash DVC recorded for one out of ``dvc.lock`` (md5 unless it names another)."""
    value = entry.get(entry.get("hash", "md5")) or entry.get("md5")
    return str(value) if value else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        log.warning("Cannot read %s (%s); runs record no DVC hashes or stage params.", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
