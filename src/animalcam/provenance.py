"""Where a run comes from: git state, DVC hashes, package versions, devices, execution.

What :mod:`animalcam.tracking` tags every MLflow run with, and the *execution key* that
lets the separate processes of one ``dvc repro`` find the same parent run
(:mod:`animalcam.run_grouping`). Nothing here talks to MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import psutil

from animalcam import environment
from animalcam.dvc_files import declared_stage, lock_hash, lock_outs, read_dvc_lock
from animalcam.fingerprints import digest, file_digest


def git_state(workspace: str | Path = ".") -> dict[str, str]:
    """``git.commit``, ``git.dirty`` and ``git.dirty_files`` of ``workspace``.

    Dirty means tracked files differ from the commit. ``dvc.lock`` and ``.gitignore``
    files are left out: DVC itself rewrites them while a pipeline runs. (Under
    ``dvc exp run -S`` params.yaml is dirty by design; the params say how.)
    """
    commit = _git(workspace, "rev-parse", "HEAD")
    status = _git(
        workspace,
        *("status", "--porcelain", "--untracked-files=no", "--", "."),
        *(":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore"),
    )
    dirty = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {
        "git.commit": commit.strip() if commit else "none",
        "git.dirty": "unknown" if status is None else str(bool(dirty)).lower(),
        "git.dirty_files": ", ".join(dirty[:20])[:1000] + (", ..." if len(dirty) > 20 else ""),
    }


def _git(workspace: str | Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=workspace, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a result, read without importing them."""
    versions = {"versions.python": platform.python_version()}
    for tag, dists in (
        ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")),
        ("keras", ("keras",)),
        ("mlflow", ("mlflow", "mlflow-skinny")),
        ("dvc", ("dvc",)),
        ("animalcam", ("animalcam",)),
    ):
        versions[f"versions.{tag}"] = _first_version(dists)
    return versions


def _first_version(dists: Iterable[str]) -> str:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "not installed"


# The pinned environments (README, "Pinned environments"), by what they are for.
LOCK_FILES = {"linux-cpu": "requirements/linux-cpu.txt", "linux-gpu": "requirements/linux-gpu.txt"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def lock_state(workspace: str | Path = ".") -> dict[str, str]:
    """``lock.<name>.sha256`` of each lock file in ``workspace``, and ``lock.installed``:
    the lock this Python environment matches exactly, or how far it is from the nearest.

    A run records which pinned set it ran on, so that "it reproduced last month" can be
    checked: same lock hash and ``lock.installed`` naming it."""
    tags: dict[str, str] = {}
    distances: dict[str, list[str]] = {}
    for name, relative in LOCK_FILES.items():
        path = Path(workspace) / relative
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        tags[f"lock.{name}.sha256"] = hashlib.sha256(text.encode()).hexdigest()
        distances[name] = _differences(text)
    if not distances:
        tags["lock.installed"] = "no lock file in the workspace"
        return tags
    best = min(distances, key=lambda name: len(distances[name]))
    differ = distances[best]
    tags["lock.installed"] = (
        best
        if not differ
        else f"none: {len(differ)} package(s) differ from {best} ({', '.join(differ[:5])})"
    )
    return tags


def _differences(lock_text: str) -> list[str]:
    """``name==locked (installed)`` for each pin this environment does not satisfy."""
    differ = []
    for line in lock_text.splitlines():
        match = _PIN.match(line)
        if not match:
            continue
        name, pinned = match.groups()
        installed = _first_version([name])
        if installed != pinned:
            differ.append(f"{name}=={pinned} ({installed})")
    return differ


def devices_used() -> str:
    """TensorFlow's physical devices when this process loaded TensorFlow, else a note.

    Never imports TensorFlow: stages that do not need it must not pay its start-up.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not hasattr(tf, "config"):
        return "cpu-only stage (TensorFlow not loaded)"
    devices = tf.config.list_physical_devices()
    return ", ".join(d.name.replace("/physical_device:", "") for d in devices) or "none"


def path_version(path: str, workspace: str | Path = ".", lock: dict | None = None) -> str:
    """A content version of ``path`` (file or directory), as DVC names it when it can.

    The md5 in ``dvc.lock`` of the stage that produced ``path`` (DVC writes a stage's
    entry as soon as the stage ends, so it is current for everything upstream), when the
    file count and size still match what is on disk. Otherwise computed here: the md5
    of a file (as DVC names it); for a directory (:mod:`animalcam.fingerprints`)
    ``manifest:<sha256>`` of its CSV/JSON manifests (data/prepared lists every image in
    them) or ``listing:<sha256>`` of its file names and sizes.
    ``missing`` when nothing is there.
    """
    lock = read_dvc_lock(workspace) if lock is None else lock
    target = Path(workspace) / path
    entry = lock_outs(lock).get(path.rstrip("/"))
    if not target.exists():
        return "missing"
    if target.is_file():
        if entry and entry.get("size") == target.stat().st_size and lock_hash(entry):
            return lock_hash(entry)
        return _md5_file(target)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    if entry and lock_hash(entry):
        size = sum(p.stat().st_size for p in files)
        if entry.get("nfiles") == len(files) and entry.get("size") == size:
            return lock_hash(entry)
    manifests = [p for p in files if p.parent == target and p.suffix in (".csv", ".json")]
    if manifests:
        return "manifest:" + digest({p.name: file_digest(p) for p in manifests})
    listing = {p.relative_to(target).as_posix(): p.stat().st_size for p in files}
    return "listing:" + digest(listing)


def _md5_file(path: Path) -> str:
    """The md5 DVC itself would record for a file, so that the version reads the same
    whether it came from dvc.lock or from here."""
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    return md5.hexdigest()


def input_hash_tags(stage: str, workspace: str | Path = ".") -> dict[str, str]:
    """``dvc.deps.<path>`` -> version, for every dep of ``stage`` in dvc.yaml."""
    lock = read_dvc_lock(workspace)
    return {
        safe_key(f"dvc.deps.{dep}"): path_version(dep, workspace, lock)
        for dep in declared_stage(stage, workspace).deps
    }


def safe_key(key: str) -> str:
    # MLflow keys allow letters, digits and _ - . / : and space.
    return "".join(c if c.isalnum() or c in "_-./: " else "_" for c in key)


def dvc_tags() -> dict[str, str]:
    """What DVC tells a stage about the run: the stage, and the experiment under
    ``dvc exp run`` (DVC_EXP_NAME, DVC_EXP_BASELINE_REV)."""
    names = {
        "DVC_STAGE": "dvc.stage",
        "DVC_EXP_NAME": "dvc.exp_name",
        "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
    }
    values = {tag: environment.text_variable(var) for var, tag in names.items()}
    return {tag: value for tag, value in values.items() if value}


# --- Which execution a stage belongs to ---------------------------------------------------


def execution_key() -> str | None:
    """The key shared by all stages of this DVC execution, None when not run by DVC."""
    if not (os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT")):
        return None
    return dvc_ancestor_key(os.getpid())


def dvc_ancestor_key(pid: int) -> str | None:
    """Key of the nearest ``dvc`` process above ``pid``: host, pid and start time hashed.

    The nearest one, because a queued experiment runs under its own ``dvc exp exec-run``
    below a long-lived queue worker; the start time, because pids get reused.
    """
    try:
        ancestors = psutil.Process(pid).parents()
    except psutil.Error:
        return None
    for process in ancestors:
        with contextlib.suppress(psutil.Error):
            if _is_dvc(process):
                raw = f"{socket.gethostname()}:{process.pid}:{process.create_time():.6f}"
                return "dvc-" + hashlib.sha256(raw.encode()).hexdigest()[:24]
    return None


def _is_dvc(process: psutil.Process) -> bool:
    if process.name() in ("dvc", "dvc.exe"):
        return True
    argv = process.cmdline()
    # `/path/python /path/bin/dvc repro` (console script) or `python -m dvc repro`.
    launched = {Path(arg).name for arg in argv[:2]}
    return bool(launched & {"dvc", "dvc.exe"}) or argv[1:3] == ["-m", "dvc"]
