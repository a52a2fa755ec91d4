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
