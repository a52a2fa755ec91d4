"""A throwaway copy of this project as its own git + DVC repository, for end-to-end tests
that run the real pipeline with `dvc repro`, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import REPO_ROOT

# What a clone holds that the pipeline needs; src/ because dvc.yaml lists it as deps.
_PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    ".gitignore",
    ".dvcignore",
    "data/exclude.txt",
    "data/relabel.csv",
    "requirements/linux-cpu.txt",
    "requirements/linux-gpu.txt",
)
_PROJECT_DIRS = ("stages", "src")


class DvcProject:
    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **os.environ,
            "DVC_NO_ANALYTICS": "1",
            "ANIMALCAM_LOG_LEVEL": "WARNING",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # Each test gets its own tracking store, not the developer's.
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }

    @classmethod
    def create(cls, root: Path) -> DvcProject:
        root.mkdir(parents=True, exist_ok=True)
        for name in _PROJECT_FILES:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / name)
        for name in _PROJECT_DIRS:
            shutil.copytree(
                REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        project = cls(root)
        project.run("git", "init", "-q")
        project.run("dvc", "init", "-q")
        project.run("git", "add", "-A")
        project.run("git", "commit", "-q", "-m", "project")
        return project

    def set_params(self, **sections: dict) -> None:
        """Merge ``{"train": {"epochs": 2}, ...}`` into params.yaml."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args, cwd=self.root, env=self.env, capture_output=True, text=True, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def repro(self, *targets: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("dvc", "repro", *targets, check=check)

    def files(self, folder: str) -> list[str]:
        base = self.root / folder
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
