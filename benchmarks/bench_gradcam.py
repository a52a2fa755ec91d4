"""Grad-CAM throughput: images/second, animalcam's batched Grad-CAM against keras.io's loop.

Same model (animalcam's flat VGG16 classifier at 224 px, backbone from --weights, a
seeded random head over the class folders), same images, same target (each image's
predicted class, scored by its logit), same layer (block5_conv3):
- ours: animalcam.gradcam.gradcam_heatmaps, one forward + backward pass per batch;
- baseline: keras.io's ``make_gradcam_heatmap`` (examples/vision/grad_cam.py), written
  out below, called once per image, as the study did.
Both get one untimed warm-up call. The heatmaps must agree to 1e-4 (asserted).
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
    parser.add_argument("--images", type=int, default=32, help="images to explain (32)")
    parser.add_argument("--batch-size", type=int, default=16, help="our batch size (16)")
    args = parser.parse_args()

    import keras

    from animalcam import explanation, gradcam, modeling

    print(describe_machine())
    paths, _, classes = class_folder_images(args.data, args.images)
    keras.utils.set_random_seed(0)
    model = modeling.build_model("vgg16", classes, image_size=SIZE, weights=str(args.weights))
    _, images = explanation.load_images(paths, (SIZE, SIZE))
    print(
        f"setup: {len(images)} images from {args.data}, VGG16 flat model ({model.count_params():,}"
        f" parameters, backbone {args.weights.name}), {SIZE} px, layer {LAYER}, predicted "
        f"class; ours in batches of {args.batch_size}, baseline one image per call"
    )

    gradcam.gradcam_heatmaps(model, images[:2], layer=LAYER, batch_size=args.batch_size)
    started = time.perf_counter()
    ours = gradcam.gradcam_heatmaps(model, images, layer=LAYER, batch_size=args.batch_size)
    ours_s = time.perf_counter() - started

    make_gradcam_heatmap(images[:1], model, LAYER)
    started = time.perf_counter()
    baseline = np.stack(
        [make_gradcam_heatmap(images[i : i + 1], model, LAYER) for i in range(len(images))]
    )
    base_s = time.perf_counter() - started

    baseline = np.nan_to_num(baseline)  # keras.io divides 0 by 0 for an all-negative map
    difference = float(np.abs(ours - baseline).max())
    print(f"max |ours - keras.io| over {ours.size} heatmap values: {difference:.2e}")
    assert difference < 1e-4, difference
    ours_rate, base_rate = len(images) / ours_s, len(images) / base_s
    print(f"ours (batched):          {ours_rate:7.2f} images/s ({ours_s:.1f} s)")
    print(f"baseline (keras.io loop): {base_rate:7.2f} images/s ({base_s:.1f} s)")
    ratio("gradcam_batched_vs_keras_io_loop", ours_rate / base_rate)


if __name__ == "__main__":
    main()
