"""Peak memory of the train stage: the image set replicated 1x and 4x, in one run.

The class folders under --data are split 85/15 per class, and the manifests list every
image once (1x) or four times (4x) in both splits, so the 4x run reads four times as
many images through the same code. For each, in a throwaway working directory,
``stages/images.py`` builds data/images (not measured) and then ``stages/train.py``
runs as a child process whose resident memory (RSS, its whole process tree) is polled
every 0.1 s; the peak is reported. Recipe: our recommended one (frozen VGG16 backbone
from --weights, head on cached features, feature_copies 1, 2 epochs, images from the
cache), at --size px (default 160 to keep the run short; memory of the data path does
not depend on the size). Held in memory per image: one feature vector (2 KB for VGG16),
so 4x the images adds ~2 KB x 3 x N. Ratio: peak at 1x over peak at 4x (1.0 = flat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, class_folder_images, describe_machine, ratio

REPO = Path(__file__).resolve().parents[1]
HEADER = ("path", "label", "source", "group")


def write_prepared(root: Path, data: Path, copies: int) -> tuple[int, int]:
    from animalcam.outputs import write_csv

    paths, labels, classes = class_folder_images(data)
    train, val = [], []
    seen: dict[int, int] = {}
    for path, label in zip(paths, labels, strict=True):
        seen[label] = seen.get(label, 0) + 1
        (val if seen[label] % 7 == 0 else train).append((path, classes[label]))
    prepared = root / "data" / "prepared"
    for name, rows in (("train", train), ("val", val)):
        rows = [(p, y, p, i) for i, (p, y) in enumerate(rows * copies)]
        write_csv(prepared / f"{name}.csv", HEADER, rows)
    (prepared / "classes.json").write_text(json.dumps(classes))
    return len(train) * copies, len(val) * copies


def peak_rss(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in MiB of ``cmd``'s process tree, seconds it ran)."""
    started = time.perf_counter()
    log = open(cwd / "stage.log", "w")  # noqa: SIM115 (closed below, after the child)
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    process = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    log.close()
    if child.returncode != 0:
        tail = (cwd / "stage.log").read_text()[-3000:]
        sys.exit(f"{' '.join(cmd)} failed with exit code {child.returncode}:\n{tail}")
    return peak / 2**20, time.perf_counter() - started


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160, help="image size in px (160)")
    args = parser.parse_args()
    print(describe_machine())
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "ANIMALCAM_LOG_LEVEL": "WARNING"}
    params = {
        "train": {
            "weights": str(args.weights),
            "image_size": args.size,
            "trainable": "head",
            "learning_rate": 1e-3,
            "epochs": 2,
            "warmup_epochs": 0,
            "backbone_features": "auto",
            "feature_copies": 1,
            "input": "images",
        }
    }
    print(f"setup: {args.data}, train params {json.dumps(params['train'])}")
    peaks = {}
    for copies in (1, 4):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            n_train, n_val = write_prepared(root, args.data, copies)
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
            subprocess.run(
                [sys.executable, str(REPO / "stages/images.py")],
                cwd=root,
                env=env,
                check=True,
                capture_output=True,
            )
            peak, seconds = peak_rss([sys.executable, str(REPO / "stages/train.py")], root, env)
            peaks[copies] = peak
            print(
                f"{copies}x: {n_train} training + {n_val} validation images: train stage peak "
                f"RSS {peak:.0f} MiB ({seconds:.0f} s)"
            )
    ratio("train_memory_1x_over_4x", peaks[1] / peaks[4])


if __name__ == "__main__":
    main()
