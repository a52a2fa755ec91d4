"""train.deterministic: what bit-for-bit reruns cost, and whether they are bit for bit.

On the real images of --data (class folders, split 85/15 as prepare does), VGG16 from
--weights at --image-size px, animalcam.training.train_model with the default recipe
(--warmup-epochs head epochs on backbone features, two feature copies, then every layer
fine-tuned on augmented images; --epochs in all; the default precision policy, images
from the files), once with ``train.deterministic: true`` and once with ``false``, each
in a process of its own (TensorFlow's op determinism is process-wide and has no public
switch back), the two kinds interleaved --repeats times so that a busy neighbour slows
both alike. Timed: the whole train_model call (the feature passes and every epoch, graph
tracing included), the feature passes, the head epochs and the fine-tuning epochs
(steady epochs: the first of each phase also traces). Reported per kind: the best time
of each, and whether its runs gave the same weights and history (a digest of both). The
ratio line is the deterministic runs' speed over the others' (best total times).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, describe_machine, ratio, train_val_manifests

KINDS = {"not deterministic": False, "deterministic": True}


def one_run(args) -> dict:
    """Train once in this process; what the parent prints."""
    import numpy as np

    from animalcam.params import TrainParams
    from animalcam.training import HISTORY_COLUMNS, train_model

    train, val, classes = train_val_manifests(args.data, None)
    params = TrainParams(
        weights=str(args.weights),
        image_size=args.image_size,
        input="files",
        warmup_epochs=args.warmup_epochs,
        epochs=args.epochs,
        deterministic=args.run == "deterministic",
    )
    with tempfile.TemporaryDirectory() as state:
        started = time.perf_counter()
        result = train_model(params, classes, train, val, state_dir=state)
        total = time.perf_counter() - started
    weights = hashlib.sha256()
    for variable in result.model.weights:
        weights.update(np.ascontiguousarray(variable.numpy()).tobytes())
    history = [[row.get(k) for k in HISTORY_COLUMNS] for row in result.history]
    head = [r for r in result.history if r["epoch"] <= args.warmup_epochs]
    tuned = [r for r in result.history if r["epoch"] > args.warmup_epochs]
    return {
        "total": total,
        "features": result.metrics["feature_seconds"],
        "head_epoch": _steady_epoch(head),
        "fine_tune_epoch": _steady_epoch(tuned),
        "precision": result.metrics["precision"],
        "images": len(train),
        "val_images": len(val),
        "classes": len(classes),
        "digest": weights.hexdigest()[:12]
        + "/"
        + hashlib.sha256(json.dumps(history).encode()).hexdigest()[:12],
        "best_val_accuracy": result.metrics["best_val_accuracy"],
    }


def _steady_epoch(rows: list[dict]) -> float:
    """The mean training seconds of an epoch, leaving out the first of a fit (tracing)."""
    steady = [r["train_seconds"] for r in rows if not r.get("first_of_fit")]
    rows_seconds = steady or [r["train_seconds"] for r in rows]
    return sum(rows_seconds) / len(rows_seconds) if rows_seconds else float("nan")


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="total, warm-up included")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind")
    parser.add_argument(
        "--run", choices=["deterministic", "not"], help="(internal) one run of that kind"
    )
    args = parser.parse_args()
    if args.run:  # a child: one training, its figures as the last line
        print(json.dumps(one_run(args)))
        return

    print(describe_machine())
    print(f"oneDNN: TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}")
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind, deterministic in KINDS.items():
            child = [sys.executable, __file__, *sys.argv[1:]]
            child += ["--run", "deterministic" if deterministic else "not"]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
            done = subprocess.run(child, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = runs["deterministic"][0]
    print(
        f"setup: {args.data}: {first['images']} train / {first['val_images']} val images, "
        f"{first['classes']} classes, {args.image_size} px, VGG16 from {args.weights.name}, "
        f"{args.warmup_epochs} head epochs on backbone features (2 copies) then every layer "
        f"on augmented images, {args.epochs} epochs in all, policy {first['precision']}; "
        f"{args.repeats} runs of each kind, each in its own process, interleaved; best times"
    )
    best = {kind: {} for kind in KINDS}
    for kind, results in runs.items():
        for key in ("total", "features", "head_epoch", "fine_tune_epoch"):
            best[kind][key] = min(r[key] for r in results)
        digests = sorted({r["digest"] for r in results})
        same = "identical" if len(digests) == 1 else f"{len(digests)} different"
        accuracy = ", ".join(f"{r['best_val_accuracy']:.3f}" for r in results)
        print(
            f"{kind:17s}: train_model {best[kind]['total']:6.1f} s | feature passes "
            f"{best[kind]['features']:5.1f} s | head epoch {best[kind]['head_epoch']:5.2f} s "
            f"| fine-tune epoch {best[kind]['fine_tune_epoch']:6.2f} s | weights/history "
            f"across its runs: {same} ({', '.join(digests)}) | best val accuracy {accuracy}"
        )
    det, nondet = best["deterministic"], best["not deterministic"]
    for key in ("features", "head_epoch", "fine_tune_epoch"):
        print(f"{key}: deterministic takes {det[key] / nondet[key]:.2f}x the time")
    ratio("deterministic_vs_not", nondet["total"] / det["total"])


if __name__ == "__main__":
    main()
