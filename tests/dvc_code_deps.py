"""The code deps each stage of dvc.yaml should list, derived from the imports.

A stage runs ``stages/<name>.py`` and every ``animalcam`` module that script imports,
directly or through other modules, function-level imports included (the rule of
:func:`animalcam.fingerprints.imported_modules`). tests/test_dvc_yaml.py fails when
dvc.yaml lists fewer or more; after adding, splitting or renaming a module, refresh
dvc.yaml with

    python tests/dvc_code_deps.py

which rewrites only the ``stages/`` and ``src/`` lines of each stage's ``deps`` (the
data deps and every comment stay as they are).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from animalcam import fingerprints  # noqa: E402  (after the path is set, when run as a script)

DVC_YAML = REPO_ROOT / "dvc.yaml"
CODE_PREFIXES = ("stages/", "src/")


def stage_script(cmd: str) -> str:
    """``stages/train.py`` from a stage's ``python stages/train.py`` command."""
    match = re.fullmatch(r"python (stages/\w+\.py)", cmd.strip())
    if match is None:
        raise ValueError(f"a stage command should be 'python stages/<name>.py', got {cmd!r}")
    return match.group(1)


def code_deps(script: str, root: Path = REPO_ROOT) -> list[str]:
    """The script, then the files of the package modules it imports, as dvc.yaml lists them."""
    package_dir = root / "src" / fingerprints.PACKAGE
    files = fingerprints.code_files([root / script], package_dir)
    others = sorted(f.relative_to(root).as_posix() for f in files if f != root / script)
    return [script, *others]


def listed_code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if str(d).startswith(CODE_PREFIXES)]


def expected_code_deps(root: Path = REPO_ROOT) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: code_deps(stage_script(s["cmd"]), root) for name, s in stages.items()}


def rewrite(text: str, expected: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's code deps replaced by ``expected[stage]``, in
    place of the first code dep listed (or first in ``deps``)."""
    out: list[str] = []
    stage = None
    in_deps = placed = False
    for line in text.splitlines():
        if m := re.fullmatch(r"  (\w+):\s*", line):
            stage, in_deps = m.group(1), False
        elif re.fullmatch(r"    deps:\s*", line):
            in_deps, placed = True, False
            out.append(line)
            continue
        elif in_deps and not re.match(r"      ", line) and line.strip():
            in_deps = False
        if in_deps and re.fullmatch(r"      - (stages|src)/\S+\s*", line):
            if not placed:
                out.extend(f"      - {dep}" for dep in expected[stage])
                placed = True
            continue
        if in_deps and not placed and re.match(r"      - ", line):
            out.extend(f"      - {dep}" for dep in expected[stage])
            placed = True
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main() -> None:
    text = DVC_YAML.read_text()
    new = rewrite(text, expected_code_deps())
    DVC_YAML.write_text(new)
    print("dvc.yaml code deps", "unchanged" if new == text else "rewritten")


if __name__ == "__main__":
    main()
