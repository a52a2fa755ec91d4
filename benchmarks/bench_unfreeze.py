"""Unfreezing after a head warm-up: how much of the warm-up's accuracy the first
fine-tuning epoch keeps, the defaults against the plain switch they replaced.

Per seed (the split stays seed 42; the seed drives initialisation, shuffling and
augmentation), two runs through animalcam.training.train_model, images read from the
files, every other setting at params.yaml's defaults:
- defaults: --warmup-epochs head epochs on backbone features, then every layer, the
  backbone at train.backbone_lr_factor x the rate, a learning-rate warm-up at the switch,
  the head initialised at the backbone's feature scale;
- plain switch (the baseline, what issue 12 found collapsing): the same epochs with one
  Adam at 1e-4 for every layer, no learning-rate warm-up and a plain Glorot head.
Printed per run: validation accuracy per epoch, the warm-up's best, the first unfrozen
epoch's accuracy as a fraction of it ("kept"), and the best after unfreezing. Issue 12's
check: kept >= 0.90 and best after >= warm-up best - 0.02. The ratio line is the mean
"kept" of the defaults over the plain switch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, describe_machine, ratio, train_val_manifests

PLAIN_SWITCH = {"backbone_lr_factor": 1.0, "lr_warmup_steps": 0}


@contextlib.contextmanager
def glorot_head():
    """The head's first layer at plain Glorot, as before issue 12 (feature_rms 1)."""
    from animalcam import backbones

    saved = dict(backbones.BACKBONES)
    for name, spec in saved.items():
        backbones.BACKBONES[name] = dataclasses.replace(spec, feature_rms=1.0)
    try:
        yield
    finally:
        backbones.BACKBONES.update(saved)


def kept(history: list[dict], warmup_epochs: int) -> tuple[float, float, float]:
    """(warm-up best, first unfrozen epoch, best after) validation accuracies."""
    accuracy = [row["val_accuracy"] for row in sorted(history, key=lambda r: r["epoch"])]
    return max(accuracy[:warmup_epochs]), accuracy[warmup_epochs], max(accuracy[warmup_epochs:])


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--val-data", type=Path, help="a validation folder of class folders")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--warmup-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="total, warm-up included")
    parser.add_argument("--seeds", default="42,1,2", help="comma-separated training seeds")
    parser.add_argument("--skip-baseline", action="store_true", help="the defaults only")
    args = parser.parse_args()

    from animalcam.params import TrainParams
    from animalcam.training import train_model

    train, val, classes = train_val_manifests(args.data, args.val_data)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(describe_machine())
    print(
        f"setup: {args.data}: {len(train)} train / {len(val)} val images, {len(classes)} "
        f"classes, {args.image_size} px, {args.warmup_epochs} head epochs then every layer, "
        f"{args.epochs} epochs in all, seeds {seeds}, one run per seed and recipe"
    )
    base = TrainParams(
        weights=str(args.weights),
        image_size=args.image_size,
        input="files",
        warmup_epochs=args.warmup_epochs,
        epochs=args.epochs,
        trainable="all",
    )
    recipes = {"defaults": ({}, contextlib.nullcontext)}
    if not args.skip_baseline:
        recipes["plain switch"] = (PLAIN_SWITCH, glorot_head)
    fractions: dict[str, list[float]] = {name: [] for name in recipes}
    for seed in seeds:
        for name, (overrides, context) in recipes.items():
            params = dataclasses.replace(base, seed=seed, **overrides)
            started = time.perf_counter()
            with context(), tempfile.TemporaryDirectory() as state:
                result = train_model(params, classes, train, val, state_dir=state)
            wall = time.perf_counter() - started
            before, first, after = kept(result.history, args.warmup_epochs)
            fractions[name].append(first / before)
            curve = " ".join(f"{row['val_accuracy']:.2f}" for row in result.history)
            print(
                f"{name:13s} seed {seed:3d}: val accuracy {curve} | warm-up best {before:.2f}, "
                f"first unfrozen {first:.2f} (kept {first / before:.2f}), best after "
                f"{after:.2f} ({after - before:+.2f}) in {wall:5.0f} s, "
                f"{result.metrics.get('precision', 'float32')}"
            )
    for name, values in fractions.items():
        print(f"{name:13s} kept: mean {statistics.mean(values):.2f}, lowest {min(values):.2f}")
    if "plain switch" in fractions:
        ratio(
            "first_unfrozen_epoch_kept_defaults_vs_plain_switch",
            statistics.mean(fractions["defaults"])
            / max(statistics.mean(fractions["plain switch"]), 1e-9),
        )


if __name__ == "__main__":
    main()
