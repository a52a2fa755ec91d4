"""Clone, pull, reproduce: a colleague's clone gets a finished run from the git and DVC
remotes without retraining, and experiments travel with `dvc exp push/pull`.

README's "Sharing data, models and experiments" section is what this test does: a bare
git repository and a local DVC remote stand in for GitHub and S3/GCS/SSH.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import make_class_tree
from dvc_project import DvcProject
from test_queue import TINY


def git(*args: str, cwd) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A project whose full tiny pipeline ran, pushed to a git and a DVC remote, with one
    experiment pushed too: (project, git remote, experiment name)."""
    tmp = tmp_path_factory.mktemp("remote")
    source = tmp / "source"
    make_class_tree(source, per_class=6, classes=("cat", "dog", "fox"), size=(40, 36))
    origin = tmp / "origin.git"
    git("init", "-q", "--bare", str(origin), cwd=tmp)
    project = DvcProject.create(tmp / "repo")
    project.set_params(data={"source": str(source)}, **TINY)
    project.run("dvc", "remote", "add", "-d", "storage", str(tmp / "dvc-storage"))
    project.run("git", "remote", "add", "origin", str(origin))
    project.repro()
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "a finished run")
    project.run("git", "push", "-q", "origin", "HEAD:refs/heads/main")
    project.run("dvc", "push")
    project.run("dvc", "exp", "run", "-n", "alpha-07", "-S", "explain.alpha=0.7")
    project.run("dvc", "exp", "push", "origin", "alpha-07")
    return project, origin, "alpha-07"


@pytest.fixture(scope="module")
def colleague(published, tmp_path_factory):
    """A fresh clone of the git remote, after `dvc pull`."""
    _, origin, _ = published
    root = tmp_path_factory.mktemp("colleague") / "clone"
    git("clone", "-q", "--branch", "main", str(origin), str(root), cwd=root.parent)
    clone = DvcProject(root)
    clone.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    clone.run("dvc", "pull")
    return clone


def test_a_pulled_clone_has_every_output_and_nothing_to_rerun(published, colleague):
    project, _, _ = published
    for path in (
        "data/raw",
        "data/prepared/train.csv",
        "data/images/index.json",
        "models/model.keras",
        "models/export",
        "reports/report.html",
        "plots/gradcam/correct",
    ):
        assert (colleague.root / path).exists(), path
    for metrics in ("train", "evaluate", "explain"):
        name = f"metrics/{metrics}.json"
        assert (colleague.root / name).read_text() == _committed(project, name)
    assert (colleague.root / "models/model.keras").read_bytes() == _committed_output(
        project, "models/model.keras"
    )
    # The download stage always looks at data.source (a quick check); nothing else is due.
    status = json.loads(colleague.run("dvc", "status", "--json").stdout)
    assert status == {"download": ["always changed"]}
    result = colleague.repro()
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'download':"], result.stdout
    assert colleague.run("git", "status", "--porcelain").stdout == ""


def test_a_pushed_experiment_comes_back_with_its_results(published, colleague):
    project, _, name = published
    colleague.run("dvc", "exp", "pull", "origin", name)
    shown = colleague.run("dvc", "exp", "show", "--json").stdout
    assert name in shown
    colleague.run("dvc", "exp", "apply", name)
    params = colleague.run("dvc", "params", "diff", "--json").stdout
    assert json.loads(params)["params.yaml"]["explain.alpha"]["new"] == 0.7
    theirs = project.run("git", "show", f"{_exp_ref(project, name)}:metrics/explain.json")
    assert (colleague.root / "metrics/explain.json").read_text() == theirs.stdout


def _committed(project: DvcProject, path: str) -> str:
    return project.run("git", "show", f"HEAD:{path}").stdout


def _committed_output(project: DvcProject, path: str) -> bytes:
    """The committed run's DVC-cached output, from the cache (the workspace now holds
    the experiment's)."""
    lock = project.run("git", "show", "HEAD:dvc.lock").stdout
    for stage in yaml.safe_load(lock)["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                md5 = out["md5"]
                return (project.root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_bytes()
    raise AssertionError(f"{path} not in dvc.lock")


def _exp_ref(project: DvcProject, name: str) -> str:
    refs = project.run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout
    (ref,) = [line for line in refs.splitlines() if line.endswith(f"/{name}")]
    return ref
