"""Prediction throughput: `animalcam predict` on a folder of photos against the bare model.

Same model (animalcam's flat VGG16 classifier at 224 px, backbone from --weights, a
seeded random head over the class folders: speed does not depend on the head's
weights, so nothing is trained), saved as .keras and loaded as `animalcam predict`
loads it; same images, same batch size:
- ours: animalcam.predict.predict_files, what `animalcam predict FOLDER` runs once the
  model is loaded: the folder walked, each file read by the one image reader (EXIF,
  formats, pixel limit) in tf.data's parallel map, batches through the model while the
  next ones are decoded, one CSV row per file written and flushed after every batch;
- ceiling: the bare model's batched ``model.predict(x, batch_size=B)`` on the same images
  already decoded and resized in memory (decoding not timed).
Each side gets one untimed warm-up batch, then is timed --repeats times, the two
alternating; the best time of each is kept (on a shared machine other processes only
ever slow a run down). The two must agree on every label (asserted).
``ratio predict_vs_bare_model`` = ceiling time / ours: 1.0 means decoding, file I/O and
the CSV are entirely hidden behind the model.

Then the int8 LiteRT file the export stage writes (animalcam.export: SavedModel, then
full-integer conversion calibrated on --calibration images drawn from the same folder
with seed 0, as ``export.representative_images`` draws the training split's), run by
``animalcam predict``'s LiteRT runner (ai-edge-litert, all cores), against the same
Keras model, both on the decoded images in memory, same batches, best of --repeats:
images/s, ``ratio int8_litert_vs_keras``, the files' sizes and the share of images on
whose label the two agree.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, describe_machine, ratio

SIZE = 224


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="first N files (all)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (2)")
    parser.add_argument(
        "--calibration", type=int, default=200, help="int8 calibration images (200)"
    )
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 LiteRT part")
    args = parser.parse_args()

    import keras

    from animalcam import modeling, predict
    from animalcam.images import model_pixels
    from animalcam.model_runners import open_model
    from animalcam.outputs import read_csv

    print(describe_machine())

    def files():
        return itertools.islice(predict.image_paths([str(args.data)]), args.images)

    paths = list(files())
    classes = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    keras.utils.set_random_seed(0)
    model = modeling.build_model("vgg16", classes, image_size=SIZE, weights=str(args.weights))
    scratch = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    modeling.save_model(model, scratch / "model.keras")
    runner = open_model(scratch / "model.keras")
    model = runner.keras_model
    images = np.stack([model_pixels(p, (SIZE, SIZE)) for p in paths]).astype(np.float32)
    size_mb = sum(Path(p).stat().st_size for p in paths) / 2**20
    print(
        f"setup: {len(paths)} files ({size_mb:.1f} MB) under {args.data}, VGG16 flat model "
        f"({model.count_params():,} parameters, backbone {args.weights.name}), {SIZE} px, "
        f"float32, batch {args.batch_size}; best of {args.repeats} runs per side"
    )

    def ours(limit=None) -> tuple[float, list[str]]:
        csv_path = scratch / "predictions.csv"
        started = time.perf_counter()
        source = itertools.islice(files(), limit)
        predict.predict_files(runner, source, csv_path, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        return seconds, [row["label"] for row in read_csv(csv_path)]

    def bare(limit=None) -> tuple[float, list[str]]:
        started = time.perf_counter()
        probabilities = model.predict(images[:limit], batch_size=args.batch_size, verbose=0)
        seconds = time.perf_counter() - started
        return seconds, [classes[i] for i in probabilities.argmax(axis=1)]

    ours(args.batch_size)  # warm-up: traces the predict function, starts tf.data
    bare(args.batch_size)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        seconds, bare_labels = bare()
        times["bare"].append(seconds)
        seconds, our_labels = ours()
        times["ours"].append(seconds)
        assert our_labels == bare_labels, "predict and the bare model disagree"
    for name, label in (("bare", "bare model.predict on decoded tensors"), ("ours", "predict")):
        best = min(times[name])
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{label + ':':42s} {len(paths) / best:6.2f} images/s (best {best:.1f} s; {runs})")
    ratio("predict_vs_bare_model", min(times["bare"]) / min(times["ours"]))
    if not args.no_int8:
        int8_against_keras(model, scratch, paths, images, classes, args)


def int8_against_keras(model, scratch: Path, paths, images, classes, args) -> None:
    """The export stage's int8 LiteRT file against the Keras model, on decoded images."""
    from animalcam import export
    from animalcam.export_metadata import write_export_metadata
    from animalcam.model_runners import open_model

    started = time.perf_counter()
    saved = scratch / "saved_model"
    export.export_saved_model(model, saved)
    representative = export.representative_images(paths, args.calibration, 0, SIZE)
    int8_path = scratch / "model_int8.tflite"
    int8_path.write_bytes(export.convert_int8(saved, representative))
    write_export_metadata(int8_path, classes, SIZE)
    int8 = open_model(int8_path)
    print(
        f"int8: exported and converted in {time.perf_counter() - started:.0f} s "
        f"(calibration on {min(args.calibration, len(paths))} of the images); "
        f".keras {(scratch / 'model.keras').stat().st_size / 2**20:.1f} MB, "
        f"int8 {int8_path.stat().st_size / 2**20:.1f} MB"
    )
    pixels = images.astype(np.uint8)  # exact: the images are whole numbers in [0, 255]
    step = args.batch_size

    def run(predict) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        out = np.concatenate([predict(pixels[i : i + step]) for i in range(0, len(pixels), step)])
        return time.perf_counter() - started, out

    run(lambda batch: int8.predict(batch[:1]))  # warm-up: allocates the interpreter
    times: dict[str, list[float]] = {"keras": [], "int8": []}
    for _ in range(args.repeats):
        seconds, keras_probabilities = run(lambda b: model.predict_on_batch(b.astype(np.float32)))
        times["keras"].append(seconds)
        seconds, int8_probabilities = run(int8.predict)
        times["int8"].append(seconds)
    agree = float(np.mean(keras_probabilities.argmax(1) == int8_probabilities.argmax(1)))
    largest = float(np.abs(keras_probabilities - int8_probabilities).max())
    for name in ("keras", "int8"):
        best = min(times[name])
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        label = "Keras (float32)" if name == "keras" else "int8 LiteRT"
        print(f"{label + ':':42s} {len(pixels) / best:6.2f} images/s (best {best:.1f} s; {runs})")
    print(
        f"int8 agrees with Keras on {agree:.1%} of {len(pixels)} labels, largest "
        f"probability difference {largest:.3f} (a random head: not the export stage's "
        "parity, which is measured on a trained model)"
    )
    ratio("int8_litert_vs_keras", min(times["keras"]) / min(times["int8"]))


if __name__ == "__main__":
    main()
