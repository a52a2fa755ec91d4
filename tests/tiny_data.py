"""Tiny prepared datasets for the train-stage tests: real image files and manifests.

Each class has its own dominant colour plus noise, so that even a randomly initialised
VGG16 at 32 px separates them after a couple of epochs. Files mix PNG, JPEG and RGBA
to exercise decoding. Manifests follow the prepare stage's contract:
``path,label,source,group`` with paths relative to the given root (the repository root
in real runs), and ``classes.json`` lists the class names in index order.
"""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "horse")
COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "horse": (40, 40, 220)}


def class_image(label: str, seed: int, size: int = 40) -> Image.Image:
    """An RGB picture dominated by the class colour, with per-image noise."""
    rng = np.random.default_rng(seed)
    colour = np.array(COLOURS.get(label, (128, 128, 128)), dtype=np.float32)
    noise = rng.normal(0, 25, size=(size, size, 3))
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_images(
    root: Path, split: str, per_class: int, classes=CLASSES, size: int = 40
) -> list[tuple[str, str]]:
    """Write ``per_class`` images per class under ``root/images/<split>/<class>/``.

    Returns (path relative to root, label) rows. Every fourth file is a JPEG and every
    fourth an RGBA PNG; the rest are RGB PNGs.
    """
    rows = []
    for c, label in enumerate(classes):
        for i in range(per_class):
            image = class_image(label, seed=zlib.crc32(f"{split}/{c}/{i}".encode()), size=size)
            if i % 4 == 3:
                rel = f"images/{split}/{label}/{i}.jpg"
                kwargs = {"quality": 95}
            elif i % 4 == 2:
                rel = f"images/{split}/{label}/{i}.png"
                image = image.convert("RGBA")  # alpha must be dropped by the loader
                kwargs = {}
            else:
                rel = f"images/{split}/{label}/{i}.png"
                kwargs = {}
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, **kwargs)
            rows.append((rel, label))
    return rows


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A prepare-style manifest: path,label,source,group (one group per image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "source", "group"])
        for i, (rel, label) in enumerate(rows):
            writer.writerow([rel, label, f"raw/{rel}", i])
    return path


def write_prepared(
    root: Path, train_per_class: int = 4, val_per_class: int = 2, classes=CLASSES, size: int = 40
) -> Path:
    """``root/data/prepared/{train,val}.csv`` and ``classes.json``; returns that folder."""
    prepared = root / "data" / "prepared"
    write_manifest(
        prepared / "train.csv", write_images(root, "train", train_per_class, classes, size)
    )
    write_manifest(prepared / "val.csv", write_images(root, "val", val_per_class, classes, size))
    (prepared / "classes.json").write_text(json.dumps(sorted(classes)))
    return prepared
