"""Grad-CAM throughput: images/second, animalcam's batched Grad-CAM against keras.io's loop.

Same model (animalcam's flat VGG16 classifier at 224 px, backbone from --weights, a
seeded random head over the class folders), same images, same target (each image's
predicted class, scored by its logit), same layer (block5_conv3). Each side produces,
per image, the class probabilities and the heatmap:
- ours: animalcam.gradcam.GradCam, one compiled forward + backward pass per batch that
  returns both (built and compiled once, XLA as speed.explain_xla's default decides for this
  machine, as the explain stage does; that one-off cost is printed);
- baseline: keras.io's procedure (examples/vision/grad_cam.py), one image at a time as
  the study did: ``preds = model.predict(img_array)`` to get the prediction, then
  ``make_gradcam_heatmap`` (written out below) for the heatmap.
A second ratio counts the baseline's ``make_gradcam_heatmap`` calls alone (no predict),
for who wants the heatmap only. Every variant gets one untimed warm-up call. Heatmaps
must agree to 1e-4 and probabilities to 1e-5 (asserted). TensorFlow's settings (such as
TF_ENABLE_ONEDNN_OPTS) apply to all: same process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, class_folder_images, describe_machine, ratio

SIZE = 224
LAYER = "block5_conv3"


def make_gradcam_heatmap(img_array, model, last_conv_layer_name, pred_index=None):
    """keras.io's function, verbatim but for the score: animalcam's models expose the
    pre-softmax scores as the "logits" layer (keras.io removes the last softmax)."""
    import keras
    import tensorflow as tf

    grad_model = keras.models.Model(
        model.inputs,
        [model.get_layer(last_conv_layer_name).output, model.get_layer("logits").output],
    )
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array)
        if pred_index is None:
            pred_index = tf.argmax(preds[0])
        class_channel = preds[:, pred_index]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    last_conv_layer_output = last_conv_layer_output[0]
    heatmap = last_conv_layer_output @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images to explain (48)")
    parser.add_argument("--batch-size", type=int, default=16, help="our batch size (16)")
    args = parser.parse_args()

    import keras

    from animalcam import examples, gradcam, modeling
    from animalcam.params import SpeedParams

    print(describe_machine())
    paths, _, classes = class_folder_images(args.data, args.images)
    keras.utils.set_random_seed(0)
    model = modeling.build_model("vgg16", classes, image_size=SIZE, weights=str(args.weights))
    _, images = examples.load_images(paths, (SIZE, SIZE))
    xla, step = gradcam.use_xla(SpeedParams().explain_xla), args.batch_size
    print(
        f"setup: {len(images)} images from {args.data}, VGG16 flat model ({model.count_params():,}"
        f" parameters, backbone {args.weights.name}), {SIZE} px, layer {LAYER}, predicted "
        f"class; ours in batches of {args.batch_size} (XLA: {xla}), baseline one image per call"
    )

    started = time.perf_counter()
    explain = gradcam.GradCam(model, LAYER, jit_compile=xla)
    explain(images[:step])  # the timed batches' shape: XLA compiles per shape
    one_off = time.perf_counter() - started
    print(f"ours, one-off: gradient model + compile + first batch {one_off:.1f} s")
    started = time.perf_counter()
    batches = [explain(images[i : i + args.batch_size]) for i in range(0, len(images), step)]
    ours_s = time.perf_counter() - started
    ours = np.concatenate([heatmaps for heatmaps, _ in batches])
    ours_probabilities = np.concatenate([probabilities for _, probabilities in batches])

    def keras_io_loop(with_predict: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        heatmaps, predictions = [], []
        for i in range(-1, len(images)):  # -1: the untimed warm-up on the first image
            if i == 0:
                started = time.perf_counter()
            img_array = images[max(i, 0) : max(i, 0) + 1]
            if with_predict:
                predictions.append(model.predict(img_array, verbose=0))
            heatmaps.append(make_gradcam_heatmap(img_array, model, LAYER))
        seconds = time.perf_counter() - started
        # keras.io divides 0 by 0 for an all-negative map
        heatmaps = np.nan_to_num(np.stack(heatmaps[1:]))
        return seconds, heatmaps, np.concatenate(predictions[1:]) if with_predict else None

    loop_s, loop_heatmaps, loop_probabilities = keras_io_loop(with_predict=True)
    heatmap_only_s, heatmap_only, _ = keras_io_loop(with_predict=False)

    difference = max(float(np.abs(ours - h).max()) for h in (loop_heatmaps, heatmap_only))
    print(f"max |ours - keras.io| over {ours.size} heatmap values: {difference:.2e}")
    assert difference < 1e-4, difference
    np.testing.assert_allclose(ours_probabilities, loop_probabilities, atol=1e-5)
    figures = (
        ("ours (batched, probabilities + heatmap)", ours_s),
        ("keras.io loop (predict + make_gradcam_heatmap)", loop_s),
        ("keras.io make_gradcam_heatmap alone", heatmap_only_s),
    )
    for name, seconds in figures:
        print(f"{name + ':':50s} {len(images) / seconds:6.2f} images/s ({seconds:.1f} s)")
    rates = {"ours": 1 / ours_s, "loop": 1 / loop_s, "heatmap_only": 1 / heatmap_only_s}
    ratio("gradcam_batched_vs_keras_io_loop", rates["ours"] / rates["loop"])
    ratio("gradcam_batched_vs_keras_io_heatmap_only", rates["ours"] / rates["heatmap_only"])


if __name__ == "__main__":
    main()
