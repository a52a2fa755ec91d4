"""Fine-tuning recipes under one time budget each: which way of training VGG16 wins.

The recipes (train params; everything else at params.yaml's defaults):
- study: every layer trainable from the first step, the study's 1/255 scaling, Adam 1e-4,
  one learning rate, no warm-up of any kind;
- study + backbone preprocessing: the same with Caffe preprocessing (what VGG16's weights
  expect);
- head only: frozen backbone, the head trained on backbone features at 1e-3;
- warm-up + top block: 2 head epochs on features, then the top conv block trainable with
  discriminative rates and a learning-rate warm-up;
- warm-up + all (the defaults): 2 head epochs on features, then every layer trainable,
  the backbone at train.backbone_lr_factor x the head's rate, with a learning-rate
  warm-up at the switch.
Each recipe trains through animalcam.training.train_model on the same split, images
decoded from the files, and stops at the end of the first epoch that ends past --budget
seconds (or earlier by early stopping); the figure is the best validation accuracy
(the checkpointed epoch) and the wall time it took. One run per recipe.

--data is a folder of class folders (split here 85/15, stratified, seeded) or, with
--val-data, the training folder, --val-data then being the validation folder (as the
cats-and-dogs set comes). The ratio line is the defaults' accuracy over the study's.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, describe_machine, ratio, train_val_manifests

RECIPES = {
    "study (1/255)": {
        "preprocessing": "rescale",
        "trainable": "all",
        "learning_rate": 1e-4,
        "warmup_epochs": 0,
        "backbone_lr_factor": 1.0,
        "lr_warmup_steps": 0,
    },
    "study + backbone preprocessing": {
        "preprocessing": "backbone",
        "trainable": "all",
        "learning_rate": 1e-4,
        "warmup_epochs": 0,
        "backbone_lr_factor": 1.0,
        "lr_warmup_steps": 0,
    },
    "head only": {"trainable": "head", "learning_rate": 1e-3, "warmup_epochs": 0},
    "warm-up + top block": {"trainable": 1},
    "warm-up + all, discriminative (defaults)": {},
}


def budget_callback(seconds: float):
    import keras

    class TimeBudget(keras.callbacks.Callback):
        """Stops training at the end of the first epoch that ends past the budget."""

        def __init__(self):
            super().__init__()
            self.deadline = time.monotonic() + seconds

        def on_epoch_end(self, epoch, logs=None):
            if time.monotonic() > self.deadline:
                self.model.stop_training = True

    return TimeBudget()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--val-data", type=Path, help="a validation folder of class folders")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds per recipe")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    from animalcam.params import TrainParams
    from animalcam.training import train_model

    train, val, classes = train_val_manifests(args.data, args.val_data)
    print(describe_machine())
    print(
        f"setup: {args.data}{' + ' + str(args.val_data) if args.val_data else ''}: "
        f"{len(train)} train / {len(val)} val images, {len(classes)} classes, "
        f"{args.image_size} px, budget {args.budget:.0f} s per recipe, images from the "
        "files, one run per recipe"
    )
    base = TrainParams(
        weights=str(args.weights), image_size=args.image_size, epochs=100, input="files"
    )
    results = {}
    for name, overrides in RECIPES.items():
        params = dataclasses.replace(base, **overrides)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as state:
            result = train_model(
                params,
                classes,
                train,
                val,
                state_dir=state,
                callbacks=[budget_callback(args.budget)],
            )
        wall = time.perf_counter() - started
        accuracy = result.metrics["best_val_accuracy"]
        results[name] = accuracy
        print(
            f"{name:42s} val accuracy {accuracy:.4f} (best of {len(result.history)} epochs, "
            f"best epoch {result.metrics.get('best_epoch')}) in {wall:6.1f} s"
        )
    defaults = results["warm-up + all, discriminative (defaults)"]
    ratio("recipe_defaults_vs_study_accuracy", defaults / max(results["study (1/255)"], 1e-9))


if __name__ == "__main__":
    main()
