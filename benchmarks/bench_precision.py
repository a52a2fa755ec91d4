"""Precision: float32 against the automatic policy (bfloat16 on a CPU that has it), per path.

In one process, on the real images of --data (class folders), VGG16 from --weights at
224 px, batches of --batch-size, each path timed under float32 and under what
``mixed_precision: auto`` picks on this machine (animalcam.precision.resolve_policy),
both from the same weights:
- feature pass: the frozen backbone's pooled features (animalcam.features, as training's
  fast path computes them) over --images images; and how far the features move;
- one fine-tuning epoch: every layer trainable (the default recipe's main phase: Adam,
  backbone at 0.1 x the head's rate), --fine-tune-images images once through
  ``train_on_batch``;
- Grad-CAM (animalcam.gradcam.GradCam, predicted class, block5_conv3) and predict
  (animalcam.evaluation.predict_probabilities) over every image of --data, with the
  model trained below; the Grad-CAM maps' correlation (Pearson, per image, at the layer's
  14 x 14) and the predictions' agreement;
- time to accuracy: animalcam.training.train_model on an 85/15 split of --data, the
  README's CPU recipe (2 head epochs on backbone features, then the top conv block;
  --epochs in all), images from the files, once per policy; wall time and best
  validation accuracy.
Each throughput is the best of --repeats timed runs after one untimed warm-up call,
float32 and auto interleaved (so a busy neighbour slows both alike). On a CPU without
bfloat16 instructions (or with oneDNN off, and no GPU) auto is float32: the script says
so and reports 1x.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, class_folder_images, describe_machine, ratio, train_val_manifests

SIZE = 224
LAYER = "block5_conv3"
RATIOS = (
    "feature_pass_auto_vs_float32",
    "fine_tune_epoch_auto_vs_float32",
    "gradcam_auto_vs_float32",
    "predict_auto_vs_float32",
    "time_to_accuracy_auto_vs_float32",
)


def best_time(run, repeats: int) -> float:
    """Shortest of ``repeats`` timed calls of ``run`` (after one untimed warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """:func:`best_time` of each of ``runs`` (name -> callable), alternating between them."""
    for run in runs.values():
        run()  # warm-up: traces and compiles
    times = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name] = min(times[name], time.perf_counter() - started)
    return times


def batches_of(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def report(name: str, n: int, times: dict[str, float], auto: str) -> float:
    """Print both rates; return auto's speed over float32's."""
    rates = {policy: n / seconds for policy, seconds in times.items()}
    print(
        f"{name + ':':24s} float32 {rates['float32']:6.2f} images/s, {auto} "
        f"{rates['auto']:6.2f} images/s ({n} images, best of the timed runs)"
    )
    return rates["auto"] / rates["float32"]


def pearson_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlation of each pair of maps; NaN where either map is constant (all zero)."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=1) / norm, np.nan)


def time_to_accuracy(args, classes, train, val, policy_setting: str):
    from animalcam.params import TrainParams
    from animalcam.training import train_model

    params = TrainParams(
        weights=str(args.weights),
        image_size=SIZE,
        input="files",
        trainable=1,  # the README's recommendation on a CPU
        epochs=args.epochs,
        mixed_precision=policy_setting,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        result = train_model(params, classes, train, val, state_dir=state)
    return result, time.perf_counter() - started


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="feature-pass images (96)")
    parser.add_argument("--fine-tune-images", type=int, default=48, help="(48)")
    parser.add_argument("--batch-size", type=int, default=16, help="(16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path (2)")
    parser.add_argument("--epochs", type=int, default=5, help="time-to-accuracy epochs (5)")
    args = parser.parse_args()

    import keras

    from animalcam import evaluation, examples, features, gradcam, modeling, precision, training

    print(describe_machine())
    auto = precision.resolve_policy("auto")
    has_bf16 = precision.cpu_computes_bfloat16()
    onednn = precision.onednn_enabled()
    print(
        f"processor: bfloat16 instructions (AVX512_BF16 or AMX): {'yes' if has_bf16 else 'no'};"
        f" GPU: {'yes' if precision.gpu_visible() else 'no'}; oneDNN: {'on' if onednn else 'off'};"
        f" mixed_precision auto -> {auto}"
    )
    if auto == precision.FLOAT32:
        print(
            "auto is float32 on this machine (no bfloat16 instructions, oneDNN off, or no "
            "GPU): both sides are the same computation, 1x."
        )
        for name in RATIOS:
            ratio(name, 1.0)
        return

    paths, labels, classes = class_folder_images(args.data)
    _, images = examples.load_images(paths, (SIZE, SIZE))
    labels = np.asarray(labels)
    train, val, _ = train_val_manifests(args.data, None)  # 85/15, as prepare splits
    print(
        f"setup: {len(images)} images from {args.data} ({len(classes)} classes), VGG16 from "
        f"{args.weights.name}, {SIZE} px, batches of {args.batch_size}; feature pass on "
        f"{args.images} images, fine-tuning epoch on {args.fine_tune_images}, Grad-CAM and "
        f"predict on all {len(images)}; best of {args.repeats} timed runs each; time to "
        f"accuracy: {len(train)} train / {len(val)} val, trainable 1 after 2 head epochs, "
        f"{args.epochs} epochs, one run per policy"
    )

    # Time to accuracy first: its float32 model is the trained model the other paths use.
    results = {}
    for name, setting in (("float32", "off"), ("auto", "auto")):
        result, seconds = time_to_accuracy(args, classes, train, val, setting)
        results[name] = (result, seconds)
        m = result.metrics
        print(
            f"time to accuracy, {m['precision']:15s}: val accuracy {m['best_val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']} of {m['epochs_run']}) in {seconds:6.1f} s "
            f"(feature pass {m['feature_seconds']:.1f} s)"
        )
    accuracies = [r.metrics["best_val_accuracy"] for r, _ in results.values()]
    apart = round(abs(accuracies[0] - accuracies[1]) * len(val))
    print(f"validation accuracy: auto is {apart} image(s) of {len(val)} from float32")
    model = results["float32"][0].model  # float32, trained
    fast = precision.inference_model(model, auto)

    # Feature pass.
    subset = batches_of(images[: args.images], args.batch_size)
    extractors = {
        "float32": features.feature_extractor(model),
        "auto": features.feature_extractor(fast),
    }
    out = {}

    def feature_run(name):
        def run():
            out[name] = features.compute_features(extractors[name], subset, args.images)

        return run

    times = interleaved({name: feature_run(name) for name in extractors}, args.repeats)
    speedups = {"feature_pass": report("feature pass", args.images, times, auto)}
    difference = np.abs(out["auto"] - out["float32"]).mean() / np.abs(out["float32"]).mean()
    print(f"features: mean |auto - float32| / mean |float32| = {difference:.4f}")

    # Predict.
    all_batches = batches_of(images, args.batch_size)
    probabilities = {}

    def predict_run(name, net):
        def run():
            probabilities[name] = evaluation.predict_probabilities(net, all_batches)

        return run

    times = interleaved(
        {"float32": predict_run("float32", model), "auto": predict_run("auto", fast)},
        args.repeats,
    )
    speedups["predict"] = report("predict", len(images), times, auto)
    same = probabilities["auto"].argmax(1) == probabilities["float32"].argmax(1)
    gap = np.abs(probabilities["auto"] - probabilities["float32"]).max()
    print(
        f"predict: same class for {same.sum()} of {len(same)} images; max |probability "
        f"difference| {gap:.4f}"
    )

    # Grad-CAM.
    cams = {"float32": gradcam.GradCam(model, LAYER), "auto": gradcam.GradCam(fast, LAYER)}
    heatmaps = {}

    def gradcam_run(name):
        def run():
            heatmaps[name] = np.concatenate([cams[name](b, None)[0] for b in all_batches])

        return run

    times = interleaved({name: gradcam_run(name) for name in cams}, args.repeats)
    speedups["gradcam"] = report("Grad-CAM", len(images), times, auto)
    # The same target for both: float32's predicted class (a close call may flip it).
    targets = probabilities["float32"].argmax(1)
    target_batches = batches_of(targets, args.batch_size)
    same_target = np.concatenate(
        [cams["auto"](b, t)[0] for b, t in zip(all_batches, target_batches, strict=True)]
    )
    r = pearson_per_image(heatmaps["float32"], same_target)
    valid = r[~np.isnan(r)]
    print(
        f"Grad-CAM maps, auto vs float32 (float32's predicted class): Pearson r mean "
        f"{valid.mean():.4f}, median {np.median(valid):.4f}, 5th percentile "
        f"{np.percentile(valid, 5):.4f}, min {valid.min():.4f}; >= 0.99 for "
        f"{(valid >= 0.99).sum()} of {len(valid)} images ({len(r) - len(valid)} all-zero maps "
        "left out)"
    )

    # One fine-tuning epoch, every layer trainable, from the same starting weights.
    fine = batches_of(images[: args.fine_tune_images], args.batch_size)
    onehot = np.eye(len(classes), dtype=np.float32)[labels[: args.fine_tune_images]]
    targets_1h = batches_of(onehot, args.batch_size)
    nets = {}
    for name, policy in (("float32", "float32"), ("auto", auto)):
        keras.utils.set_random_seed(0)
        net = modeling.build_model(
            "vgg16", classes, image_size=SIZE, weights=str(args.weights), policy=policy
        )
        modeling.set_trainable(net, "all")
        training.compile_model(
            net,
            1e-4,
            label_smoothing=0.0,
            top_k=3,
            jit_compile=False,
            backbone_layers=[layer.name for layer in modeling.backbone_layers(net)],
            backbone_lr_factor=0.1,
        )
        nets[name] = net

    def epoch_run(name):
        def run():
            for x, y in zip(fine, targets_1h, strict=True):
                nets[name].train_on_batch(x, y)

        return run

    times = interleaved({name: epoch_run(name) for name in nets}, args.repeats)
    speedups["fine_tune_epoch"] = report("fine-tuning epoch", args.fine_tune_images, times, auto)
    speedups["time_to_accuracy"] = results["float32"][1] / results["auto"][1]
    for name in RATIOS:
        ratio(name, speedups[name.removesuffix("_auto_vs_float32")])


if __name__ == "__main__":
    main()
