"""One way to say "what built this": digests of values and code, and what differs.

Every place that keeps a result only while what built it is unchanged (the download
stamp, the resume state, the image store's index, tracking's provenance) builds a plain
JSON-able mapping ``{"params": ..., "code": ..., ...}`` from these helpers, stores it
next to the result, and on the next run compares it with the current one;
:func:`describe_changes` names the parts that differ in one line for the log.

The code part is found by reading import statements (:func:`imported_modules`), the
same rule the test of ``dvc.yaml``'s code deps applies to the stage scripts, so a
stage reruns and a stored result is rebuilt for the same edits. Imports inside
functions count: stage scripts import the TensorFlow-using modules inside ``main()``.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGE = "animalcam"
PACKAGE_DIR = Path(__file__).resolve().parent
_BLOCK = 1024**2


def digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces), so equal values
    give equal digests whatever their key order. TypeError for what JSON cannot hold."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The file of module ``name`` ("tracking", "tracking.store"; "" for the package
    itself) under ``package_dir``, or None when there is no such module."""
    if not name:
        candidates = [package_dir / "__init__.py"]
    else:
        base = package_dir.joinpath(*name.split("."))
        candidates = [base.with_suffix(".py"), base / "__init__.py"]
    return next((c for c in candidates if c.is_file()), None)


def direct_imports(path: str | Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Names of the package's modules that ``path`` imports itself (at the top or inside
    functions), relative to the package: ``from animalcam import outputs`` gives
    "outputs", ``from animalcam.params import load_params`` gives "params"."""
    path = Path(path)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_within_package(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path, package_dir)
            if base is None:
                continue
            names.update(_within_package(base))
            # `from animalcam import outputs`: the imported name may be a module itself.
            for alias in node.names:
                names.update(_within_package(f"{base}.{alias.name}"))
    return {name for name in names if module_file(name, package_dir) is not None}


def imported_modules(path: str | Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The package's modules that running ``path`` imports, directly or through one
    another; "" stands for the package's ``__init__``, which any of them runs."""
    todo = list(direct_imports(path, package_dir))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(direct_imports(module_file(name, package_dir), package_dir))
    return seen


def code_files(paths: Iterable[str | Path], package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """``paths`` and the file of every package module they import, transitively: the
    code a run of them executes from this repository. Sorted, without repeats."""
    files = {Path(p) for p in paths}
    for path in list(files):
        files.update(module_file(name, package_dir) for name in imported_modules(path, package_dir))
    return sorted(files)


def code_digest(*modules: str, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """``{"training.py": sha256, "params.py": ..., ...}`` over ``modules`` (names in the
    package, such as "training") and every package module they import, transitively;
    keys are paths relative to the package folder."""
    files = code_files((module_file(name, package_dir) for name in modules), package_dir)
    return {f.relative_to(package_dir).as_posix(): file_digest(f) for f in files}


def changed_keys(saved: Any, current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between ``saved`` and ``current``, sorted; every key
    when ``saved`` is not a mapping (a stored value of the wrong shape)."""
    saved = saved if isinstance(saved, Mapping) else {}
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def describe_changes(saved: Any, current: Mapping[str, Any]) -> str:
    """What differs, for one log line: "code (download.py, params.py), source"; "" when
    nothing does. Parts that are mappings on both sides name their changed keys."""
    old = saved if isinstance(saved, Mapping) else {}
    parts = []
    for key in changed_keys(old, current):
        before, after = old.get(key), current.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            parts.append(f"{key} ({', '.join(changed_keys(before, after))})")
        else:
            parts.append(str(key))
    return ", ".join(parts)


def _within_package(dotted: str) -> list[str]:
    """``"animalcam.a.b"`` -> ["", "a", "a.b"]: importing a.b also runs the package's
    ``__init__`` and a's; [] for a module outside the package."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return []
    return [".".join(parts[1:i]) for i in range(1, len(parts) + 1)]


def _absolute(node: ast.ImportFrom, path: Path, package_dir: Path) -> str | None:
    """The absolute module a ``from ... import`` names; None for a relative import in a
    file outside the package."""
    if node.level == 0:
        return node.module
    try:
        inside = path.resolve().relative_to(package_dir.resolve())
    except ValueError:
        return None
    package = [PACKAGE, *inside.parent.parts]
    if node.level > 1:
        package = package[: -(node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))
