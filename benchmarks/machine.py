"""What every benchmark prints first and needs: the machine, the images, the ratio line.

Not a library module: the benchmarks import it by file location (``sys.path`` holds the
benchmarks folder when one of them runs as a script).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def describe_machine() -> str:
    """CPU model, cores, memory, Python, TensorFlow and Keras versions, GPUs."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = "RAM unknown"
    gpus = tf.config.list_physical_devices("GPU")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {memory}, "
        f"{len(gpus)} GPU(s); Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
    )


def arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the two arguments every benchmark takes (--data, --weights)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a folder of class folders (e.g. .../animals10-sample/raw-img)",
    )
    parser.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="VGG16 ImageNet no-top weights (e.g. vgg16_imagenet_notop.weights.h5)",
    )
    return parser


def class_folder_images(
    data: Path, limit: int | None = None
) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, class names)`` of the images in ``data/<class>/``, sorted; with
    ``limit``, the first images taken round-robin over the classes."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    per_class = [
        sorted(str(f) for f in (data / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for c in classes
    ]
    pairs = []
    for i in range(max(len(files) for files in per_class)):
        for label, files in enumerate(per_class):
            if i < len(files):
                pairs.append((files[i], label))
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise SystemExit(f"no images in class folders under {data}")
    return [p for p, _ in pairs], [label for _, label in pairs], classes


def ratio(name: str, value: float) -> None:
    """The last lines of a benchmark: ours over baseline, higher is better."""
    print(f"ratio {name}: {value:.2f}")


def train_val_manifests(data: Path, val_data: Path | None, seed: int = 42):
    """``(train, val, class names)`` as animalcam Manifests: ``data``'s class folders
    split 85/15 (stratified, seeded, as prepare does), or with ``val_data`` the two
    folders as they come (the cats-and-dogs set)."""
    from animalcam.dataset import Manifest
    from animalcam.splitting import stratified_group_split

    paths, labels, classes = class_folder_images(data)
    if val_data:
        val_paths, val_labels, val_classes = class_folder_images(val_data)
        if val_classes != classes:
            raise SystemExit(f"class folders differ: {val_classes} vs {classes}")
        train = list(zip(paths, labels, strict=True))
        val = list(zip(val_paths, val_labels, strict=True))
    else:
        names = [classes[y] for y in labels]
        is_val = stratified_group_split(names, list(range(len(paths))), 0.15, seed)
        rows = list(zip(paths, labels, is_val, strict=True))
        train = [(p, y) for p, y, v in rows if not v]
        val = [(p, y) for p, y, v in rows if v]

    def manifest(pairs):
        return Manifest(tuple(p for p, _ in pairs), tuple(y for _, y in pairs), (0,) * len(pairs))

    return manifest(train), manifest(val), classes
