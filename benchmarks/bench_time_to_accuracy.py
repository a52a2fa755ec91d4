"""Time to accuracy: `dvc repro evaluate` (cache -> train -> evaluate) on a small image
set, our recommended CPU recipe against the reference study's recipe, in one run.

- ours: frozen VGG16 backbone, head trained on cached backbone features
  (train.trainable: head, backbone_features: auto, feature_copies 1: one backbone pass per
  image in all), Caffe preprocessing, learning rate 1e-3, --epochs epochs (early stopping
  on), images from the cache;
- baseline: the study's recipe: all layers trainable from epoch 1, 1/255 rescale,
  learning rate 1e-4, images decoded from the files every epoch, no feature cache,
  --baseline-epochs epochs (default 1: on 2 CPU cores one full fine-tuning epoch
  already takes longer than our whole run, so this is the baseline's accuracy at a
  budget at least as large as ours; the times printed say by how much).
Both at 224 px, batch 32, the study's augmentations, backbone weights from --weights,
the same prepare split (85/15, duplicates grouped). Each runs in its own throwaway
git + DVC copy of this repository; download + prepare are run once, untimed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, describe_machine, ratio

REPO = Path(__file__).resolve().parents[1]
FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
DIRS = ("stages", "src")


def make_project(root: Path, data: Path, weights: Path) -> dict[str, str]:
    """A git + DVC copy of the pipeline in ``root`` reading ``data``; returns its env."""
    root.mkdir(parents=True)
    for name in FILES:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, root / name)
    for name in DIRS:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    from animalcam.classes import ANIMALS10

    folders = {p.name for p in data.iterdir() if p.is_dir()}
    known = set(ANIMALS10) | set(ANIMALS10.values())
    set_params(
        root,
        data={"source": str(data)},
        prepare={"class_set": "animals10" if folders <= known else "folders"},
        train={"weights": str(weights)},
    )
    return env


def set_params(root: Path, **sections: dict) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def repro(root: Path, env: dict[str, str], target: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro", target], cwd=root, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"dvc repro {target} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of our recipe (10)")
    parser.add_argument("--baseline-epochs", type=int, default=1, help="study's epochs (1)")
    parser.add_argument("--size", type=int, default=224, help="image size, both recipes (224)")
    args = parser.parse_args()
    print(describe_machine())

    ours = {
        "trainable": "head",
        "warmup_epochs": 0,
        "learning_rate": 1e-3,
        "preprocessing": "backbone",
        "backbone_features": "auto",
        "feature_copies": 1,
        "input": "images",
        "epochs": args.epochs,
        "image_size": args.size,
    }
    study = {  # the study's exact recipe (README: "The study's recipe")
        "trainable": "all",
        "warmup_epochs": 0,
        "backbone_lr_factor": 1.0,
        "lr_warmup_steps": 0,
        "learning_rate": 1e-4,
        "preprocessing": "rescale",
        "backbone_features": "off",
        "input": "files",
        "epochs": args.baseline_epochs,
        "image_size": args.size,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        env = make_project(root, args.data, args.weights)
        repro(root, env, "prepare")
        data = json.loads((root / "metrics/data.json").read_text())
        print(f"setup: {args.data}, prepared split: {json.dumps(data)[:300]}")
        for name, train in (("ours", ours), ("baseline", study)):
            set_params(root, train=train)
            seconds = repro(root, env, "evaluate")
            metrics = json.loads((root / "metrics/evaluate.json").read_text())
            trained = json.loads((root / "metrics/train.json").read_text())
            results[name] = (seconds, metrics["accuracy"], trained)
            print(
                f"{name:8s}: train params {json.dumps(train)}\n"
                f"          `dvc repro evaluate` {seconds:.0f} s (train stage wall "
                f"{trained['wall_time_s']:.0f} s, {trained['epochs_run']} epochs, feature "
                f"pass {trained.get('feature_seconds', 0):.0f} s); validation accuracy "
                f"{metrics['accuracy']:.4f}"
            )
    (t_ours, acc_ours, _), (t_base, acc_base, _) = results["ours"], results["baseline"]
    ratio("time_to_accuracy_accuracy", acc_ours / max(acc_base, 1e-9))
    ratio("time_to_accuracy_speed", t_base / t_ours)


if __name__ == "__main__":
    main()
