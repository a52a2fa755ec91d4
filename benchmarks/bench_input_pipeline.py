"""Input pipeline throughput: training images/second at 224 px with the study's augmentations.

Measured, on the same images, in one run:
- ours from the images stage: animalcam.image_cache (decoded + resized once, raw by default;
  the one-off build time is printed too) -> shuffle -> Keras augmentation layers, tf.data;
- ours from the files: animalcam.dataset.FileExamples (decode + resize every epoch);
- baseline: the study's Keras ImageDataGenerator.flow_from_directory. Keras 3 removed
  ImageDataGenerator and tf_keras is not installed here, so the baseline is its exact
  per-image Python code path re-implemented below (PIL load_img with nearest resize,
  random rotation/shift/shear/zoom as one scipy.ndimage.affine_transform per channel with
  nearest fill, random horizontal flip, 1/255 rescale, batches of 32, one worker: what
  keras_preprocessing 1.1 does).
Each pipeline runs one warm-up epoch (tf.data traces its functions), then --epochs timed
epochs; the figure is images produced per second. Ratios: ours / baseline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import arguments, class_folder_images, describe_machine, ratio

SIZE = 224
BATCH = 32
# The study's ImageDataGenerator arguments (shear_range is in degrees there).
STUDY = {"rotation": 20.0, "shift": 0.2, "shear": 0.2, "zoom": 0.2, "flip": True}


def study_batches(paths: list[str], rng: np.random.Generator):
    """flow_from_directory + random_transform + 1/255, as keras_preprocessing did it."""
    from PIL import Image
    from scipy import ndimage

    order = rng.permutation(len(paths))
    for start in range(0, len(paths), BATCH):
        batch = []
        for i in order[start : start + BATCH]:
            with Image.open(paths[i]) as img:
                img = img.convert("RGB").resize((SIZE, SIZE), Image.NEAREST)
                x = np.asarray(img, dtype=np.float32)
            theta = np.deg2rad(rng.uniform(-STUDY["rotation"], STUDY["rotation"]))
            tx = rng.uniform(-STUDY["shift"], STUDY["shift"]) * SIZE
            ty = rng.uniform(-STUDY["shift"], STUDY["shift"]) * SIZE
            shear = np.deg2rad(rng.uniform(-STUDY["shear"], STUDY["shear"]))
            zx, zy = rng.uniform(1 - STUDY["zoom"], 1 + STUDY["zoom"], 2)
            matrix = np.array(
                [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
            )
            matrix = matrix @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
            matrix = matrix @ np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
            matrix = matrix @ np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
            o = SIZE / 2 + 0.5
            matrix = (
                np.array([[1, 0, o], [0, 1, o], [0, 0, 1]])
                @ matrix
                @ np.array([[1, 0, -o], [0, 1, -o], [0, 0, 1]])
            )
            x = np.stack(
                [
                    ndimage.affine_transform(
                        x[..., c], matrix[:2, :2], matrix[:2, 2], order=1, mode="nearest"
                    )
                    for c in range(3)
                ],
                axis=-1,
            )
            if STUDY["flip"] and rng.random() < 0.5:
                x = x[:, ::-1]
            batch.append(x * (1.0 / 255))
        yield np.stack(batch)


def images_per_second(make_epoch, n_images: int, epochs: int) -> float:
    for _ in make_epoch(0):  # warm-up: tracing, file cache
        pass
    started = time.perf_counter()
    seen = 0
    for e in range(1, epochs + 1):
        for batch in make_epoch(e):
            seen += len(batch[0] if isinstance(batch, tuple) else batch)
    elapsed = time.perf_counter() - started
    assert seen == n_images * epochs, (seen, n_images, epochs)
    return seen / elapsed


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=320, help="images to use (default 320)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (default 2)")
    args = parser.parse_args()  # --weights is accepted for uniformity; not needed here

    from animalcam import dataset, image_cache
    from animalcam.augmentation import augmentation
    from animalcam.batches import BatchSettings, epoch_batches
    from animalcam.outputs import write_csv
    from animalcam.params import AugmentParams, ImagesParams

    print(describe_machine())
    paths, labels, classes = class_folder_images(args.data, args.limit)
    n = len(paths)
    print(
        f"setup: {n} images from {args.data} ({len(classes)} classes), {SIZE} px, batch {BATCH}, "
        f"augmentations rotation 20 deg, shift 0.2, shear 0.2, zoom 0.2, horizontal flip; "
        f"1 warm-up + {args.epochs} timed epochs per pipeline"
    )
    augment = augmentation(AugmentParams(), seed=1)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        rows = [(p, classes[y], p, i) for i, (p, y) in enumerate(zip(paths, labels, strict=True))]
        write_csv(prepared / "train.csv", ("path", "label", "source", "group"), rows)
        write_csv(prepared / "val.csv", ("path", "label", "source", "group"), rows[:1])
        (prepared / "classes.json").write_text(__import__("json").dumps(classes))
        started = time.perf_counter()
        counts = image_cache.build_cache(
            prepared, Path(tmp) / "cache", image_size=SIZE, params=ImagesParams()
        )
        build_s = time.perf_counter() - started
        manifest = dataset.read_manifest(prepared / "train.csv", classes)
        split = image_cache.open_split(Path(tmp) / "cache", "train", manifest, SIZE)
        print(
            f"images stage (once per dataset and size): {build_s:.1f} s for {n} images, "
            f"{counts['bytes'] / n / 1024:.1f} KB per image (default encoding, raw)"
        )
        jpeg = image_cache.build_cache(
            prepared, Path(tmp) / "jpeg", image_size=SIZE, params=ImagesParams(encoding="jpeg")
        )
        print(f"with images.encoding: jpeg (q95): {jpeg['bytes'] / n / 1024:.1f} KB per image")
        jpeg_split = image_cache.open_split(Path(tmp) / "jpeg", "train", manifest, SIZE)

        def cached_epoch(e, split=split):
            return epoch_batches(
                image_cache.CachedExamples(split),
                BatchSettings(BATCH, seed=0, shuffle_buffer=2048),
                first_epoch=e,
                end_epoch=e + 1,
                num_classes=len(classes),
                augment=augment,
            )

        def files_epoch(e):
            return epoch_batches(
                dataset.FileExamples(paths, labels, SIZE),
                BatchSettings(BATCH, seed=0),
                first_epoch=e,
                end_epoch=e + 1,
                num_classes=len(classes),
                augment=augment,
            )

        rng = np.random.default_rng(0)
        # One untimed pass first: the process's one-off costs (thread pools, OpenCV and
        # tf.data start-up) would otherwise land on whichever pipeline is timed first.
        images_per_second(cached_epoch, n, 1)
        cache_rate = images_per_second(cached_epoch, n, args.epochs)
        print(f"ours, from the images stage (raw, default): {cache_rate:8.1f} images/s")
        jpeg_rate = images_per_second(lambda e: cached_epoch(e, jpeg_split), n, args.epochs)
        print(f"ours, from the images stage (JPEG):         {jpeg_rate:8.1f} images/s")
        files_rate = images_per_second(files_epoch, n, args.epochs)
        print(f"ours, from the files:        {files_rate:8.1f} images/s")
        study_rate = images_per_second(lambda e: study_batches(paths, rng), n, args.epochs)
        print(f"baseline (study's ImageDataGenerator path, scipy): {study_rate:8.1f} images/s")
    ratio("input_pipeline_cache_vs_imagedatagenerator", cache_rate / study_rate)
    ratio("input_pipeline_jpeg_cache_vs_imagedatagenerator", jpeg_rate / study_rate)
    ratio("input_pipeline_files_vs_imagedatagenerator", files_rate / study_rate)


if __name__ == "__main__":
    main()
