"""One typed, validated view of ``params.yaml``.

Every stage reads its settings through :func:`load_params`, which checks the whole file
once: unknown keys (with a "did you mean" hint), wrong types and out-of-range values are
a :class:`~animalcam.errors.ParamsError` naming the key, the value and what is allowed.
Keys left out of ``params.yaml`` take the defaults below, which reproduce the reference
study (see docs/DESIGN.md); ``params.yaml`` in the repository spells them all out so that
``dvc params diff`` shows every change.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from animalcam.errors import ParamsError, SourceNotFoundError

DEFAULT_PATH = Path("params.yaml")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {key} = {value!r} is not allowed; expected {allowed}.")


@dataclass(frozen=True)
class DataParams:
    # "kaggle" downloads through the Kaggle API; anything else is a local .zip or folder.
    source: str = "kaggle"
    kaggle_dataset: str = "alessiocorrado99/animals10"
    # The real archive unpacks to about 0.6 GB; refuse anything claiming to be far
    # larger before writing a byte (zip bombs, wrong file).
    max_extract_gb: float = 20.0

    def check(self, prefix: str) -> None:
        _check(
            bool(self.source.strip()),
            f"{prefix}.source",
            self.source,
            "'kaggle' or a path to a local .zip or folder",
        )
        _check(
            "/" in self.kaggle_dataset,
            f"{prefix}.kaggle_dataset",
            self.kaggle_dataset,
            "'<owner>/<dataset>'",
        )
        _check(
            self.max_extract_gb > 0, f"{prefix}.max_extract_gb", self.max_extract_gb, "a number > 0"
        )


@dataclass(frozen=True)
class PrepareParams:
    val_split: float = 0.15  # the study's 85/15 split
    seed: int = 42
    # "animals10": folders must be the ten Kaggle classes (Italian or English names).
    # "folders": every folder is a class named after it (bring your own data).
    class_set: str = "animals10"
    # Thumbnails and icons below this side carry no signal at 224 px.
    min_side: int = 32
    # Pillow's own decompression-bomb limit (about 89 Mpx); checked before decoding.
    max_pixels: int = 89_478_485
    # Largest Hamming distance between 64-bit perceptual hashes that still counts as
    # the same picture (resized, recompressed, lightly edited). 0: identical hashes only.
    near_duplicate_distance: int = 4
    min_per_class: int = 5  # fewer usable images than this cannot be split sensibly

    def check(self, prefix: str) -> None:
        _check(
            0 < self.val_split <= 0.5,
            f"{prefix}.val_split",
            self.val_split,
            "a fraction in (0, 0.5]",
        )
        _check(
            self.class_set in ("animals10", "folders"),
            f"{prefix}.class_set",
            self.class_set,
            "'animals10' or 'folders'",
        )
        _check(self.min_side >= 1, f"{prefix}.min_side", self.min_side, "an integer >= 1")
        _check(self.max_pixels >= 1, f"{prefix}.max_pixels", self.max_pixels, "an integer >= 1")
        _check(
            0 <= self.near_duplicate_distance <= 16,
            f"{prefix}.near_duplicate_distance",
            self.near_duplicate_distance,
            "an integer in [0, 16]",
        )
        _check(
            self.min_per_class >= 2,
            f"{prefix}.min_per_class",
            self.min_per_class,
            "an integer >= 2 (one image each side of the split)",
        )


@dataclass(frozen=True)
class AugmentParams:
    """The study's ImageDataGenerator settings, as Keras preprocessing layers."""

    rotation: float = 20.0  # degrees, either way
    translate: float = 0.2  # fraction of width/height, either way
    shear: float = 0.2  # shear intensity, either way
    zoom: float = 0.2  # fraction, in or out
    horizontal_flip: bool = True
    # true: all five in one resampling per image (animalcam.dataset.RandomAffine, about
    # 5x faster on a CPU); false: Keras' own RandomRotation ... RandomFlip layers in a row.
    fused: bool = True

    def check(self, prefix: str) -> None:
        _check(
            0 <= self.rotation <= 180, f"{prefix}.rotation", self.rotation, "degrees in [0, 180]"
        )
        for name in ("translate", "shear", "zoom"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{prefix}.{name}", value, "a fraction in [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    backbone: str = "vgg16"
    # "imagenet" (Keras' download), "none" (random init) or a path to a weights file.
    weights: str = "imagenet"
    # "backbone": the preprocessing the backbone was pretrained with (Caffe BGR mean
    # subtraction for VGG16). "rescale": the study's 1/255, kept to reproduce it.
    preprocessing: str = "backbone"
    image_size: int = 224
    batch_size: int = 32  # global batch; split across replicas under MirroredStrategy
    epochs: int = 15
    learning_rate: float = 1e-4
    dense_units: int = 512
    dropout: float = 0.0
    label_smoothing: float = 0.0
    # "all" (the study), "head" (frozen backbone), or N: unfreeze the top N conv blocks.
    trainable: int | str = "all"
    # Epochs with a frozen backbone before the policy above applies; a fresh head's
    # large gradients would otherwise wreck the pretrained filters.
    warmup_epochs: int = 0
    warmup_learning_rate: float = 1e-3
    class_weight: str = "none"  # "none" or "balanced" (inverse class frequency)
    seed: int = 42
    top_k: int = 3
    augment: AugmentParams = field(default_factory=AugmentParams)
    early_stopping_patience: int = 5
    reduce_lr_factor: float = 0.2
    reduce_lr_patience: int = 3
    min_lr: float = 1e-7
    # "auto": float16 compute on a GPU, float32 elsewhere; "on"/"off" force it.
    mixed_precision: str = "auto"
    # XLA for the full model (backbone + head). Off: on a CPU compiling VGG16 costs more
    # than it saves and the last, smaller batch compiles twice; worth trying on a GPU.
    xla: bool = False
    # --- Speed (docs/benchmarks.md). None of these changes what the model learns, except
    # feature_copies, which sets how much augmentation the head-only epochs see.
    # "cache": read the prepared-image cache (data/cache, decoded and resized once by the
    # cache stage); "files": decode and resize the original files every epoch.
    input: str = "cache"
    # Images in the shuffle buffer when reading the cache (records are read in sequence,
    # so the shuffle is a buffer, plus a shuffled shard order); ~150 KB each in memory.
    shuffle_buffer: int = 2048
    # "auto": epochs with a frozen backbone (trainable: head, or warm-up) train the head on
    # backbone features computed once per image, instead of running the backbone every
    # epoch; "off": always run the whole model.
    feature_cache: str = "auto"
    # Feature sets computed per training image for those epochs: the first without
    # augmentation, the others with train.augment; epoch e uses set e mod feature_copies.
    # 1 = no augmentation for the head (fastest); each extra copy costs one backbone pass.
    feature_copies: int = 2
    # XLA for the head-only fast path: a small dense graph that compiles in a second.
    head_xla: bool = True
    # tf.data's autotuning of parallelism and buffer sizes (off: fixed, for debugging).
    autotune: bool = True
    # With one GPU, stage the next batches in GPU memory while the current one trains.
    prefetch_to_device: bool = True

    def check(self, prefix: str) -> None:
        from animalcam.backbones import BACKBONES  # the registry names the allowed values

        _check(
            self.backbone in BACKBONES,
            f"{prefix}.backbone",
            self.backbone,
            "one of " + ", ".join(sorted(BACKBONES)),
        )
        _check(
            bool(self.weights.strip()),
            f"{prefix}.weights",
            self.weights,
            "'imagenet', 'none' or a path to a weights file",
        )
        _check(
            self.preprocessing in ("backbone", "rescale"),
            f"{prefix}.preprocessing",
            self.preprocessing,
            "'backbone' or 'rescale'",
        )
        _check(self.image_size >= 32, f"{prefix}.image_size", self.image_size, "an integer >= 32")
        for name in (
            "batch_size",
            "epochs",
            "dense_units",
            "top_k",
            "early_stopping_patience",
            "reduce_lr_patience",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "an integer >= 1")
        for name in ("learning_rate", "warmup_learning_rate"):
            value = getattr(self, name)
            _check(value > 0, f"{prefix}.{name}", value, "a number > 0")
        _check(self.min_lr >= 0, f"{prefix}.min_lr", self.min_lr, "a number >= 0")
        _check(
            0 < self.reduce_lr_factor < 1,
            f"{prefix}.reduce_lr_factor",
            self.reduce_lr_factor,
            "a number in (0, 1)",
        )
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{prefix}.{name}", value, "a number in [0, 1)")
        trainable_ok = self.trainable in ("all", "head") or (
            isinstance(self.trainable, int) and self.trainable >= 1
        )
        _check(
            trainable_ok,
            f"{prefix}.trainable",
            self.trainable,
            "'all', 'head', or a number of top conv blocks >= 1",
        )
        _check(
            0 <= self.warmup_epochs < self.epochs,
            f"{prefix}.warmup_epochs",
            self.warmup_epochs,
            f"an integer in [0, train.epochs={self.epochs})",
        )
        _check(
            self.class_weight in ("none", "balanced"),
            f"{prefix}.class_weight",
            self.class_weight,
            "'none' or 'balanced'",
        )
        _check(
            self.input in ("cache", "files"), f"{prefix}.input", self.input, "'cache' or 'files'"
        )
        _check(
            self.feature_cache in ("auto", "off"),
            f"{prefix}.feature_cache",
            self.feature_cache,
            "'auto' or 'off'",
        )
        for name in ("shuffle_buffer", "feature_copies"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "an integer >= 1")
        _check(
            self.mixed_precision in ("auto", "on", "off"),
            f"{prefix}.mixed_precision",
            self.mixed_precision,
            "'auto', 'on' or 'off'",
        )


@dataclass(frozen=True)
class CacheParams:
    """The prepared-image cache (data/cache): each usable image decoded and resized once,
    to train.image_size, so that train and evaluate never decode the originals again."""

    # "jpeg": re-encoded at `quality` (about 25 KB an image at 224 px, so the 26k images
    # take ~0.6 GB; decoding a 224 px JPEG is far cheaper than a full-size original).
    # "raw": uint8 pixels (150 KB an image at 224 px), exact, no decoding at all.
    encoding: str = "jpeg"
    quality: int = 95  # JPEG quality; 95 keeps pixels within a few levels of the resize
    shard_images: int = 1024  # images per TFRecord shard (shuffled shard order per epoch)

    def check(self, prefix: str) -> None:
        _check(
            self.encoding in ("jpeg", "raw"),
            f"{prefix}.encoding",
            self.encoding,
            "'jpeg' or 'raw'",
        )
        _check(
            1 <= self.quality <= 100, f"{prefix}.quality", self.quality, "an integer in [1, 100]"
        )
        _check(
            self.shard_images >= 1, f"{prefix}.shard_images", self.shard_images, "an integer >= 1"
        )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    top_k: int = 3
    gallery_size: int = 16  # images in each of the correct / incorrect galleries
    calibration_bins: int = 15  # for the expected calibration error

    def check(self, prefix: str) -> None:
        for name in ("batch_size", "top_k", "gallery_size", "calibration_bins"):
            value = getattr(self, name)
            _check(value >= 1, f"{prefix}.{name}", value, "an integer >= 1")


@dataclass(frozen=True)
class ExplainParams:
    n_correct: int = 8
    n_incorrect: int = 8
    layer: str | None = None  # None: the backbone's last convolutional layer
    alpha: float = 0.4  # heatmap opacity in the overlay
    batch_size: int = 16
    faithfulness_fraction: float = 0.2  # share of the image blurred in the check
    seed: int = 0  # places the random regions the faithfulness check compares against
    # XLA for the Grad-CAM step. "auto": on a GPU only (no gain measured on a CPU).
    xla: str = "auto"

    def check(self, prefix: str) -> None:
        for name in ("n_correct", "n_incorrect"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", value, "an integer >= 0")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        _check(0 < self.alpha < 1, f"{prefix}.alpha", self.alpha, "a number in (0, 1)")
        _check(
            self.xla in ("auto", "on", "off"), f"{prefix}.xla", self.xla, "'auto', 'on' or 'off'"
        )
        _check(
            0 < self.faithfulness_fraction < 1,
            f"{prefix}.faithfulness_fraction",
            self.faithfulness_fraction,
            "a number in (0, 1)",
        )


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "animalcam"
    registered_model: str = "animalcam-classifier"

    def check(self, prefix: str) -> None:
        for name in ("experiment", "registered_model"):
            value = getattr(self, name)
            _check(bool(value.strip()), f"{prefix}.{name}", value, "a non-empty name")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    cache: CacheParams = field(default_factory=CacheParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    """Read and validate ``params.yaml``; raise ParamsError on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path} not found; run from the repository root, where params.yaml lives."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return params_from_dict(raw or {})


def params_from_dict(raw: object) -> Params:
    return _build(Params, raw, prefix="")


def as_dict(params: object) -> dict[str, Any]:
    """Plain nested dict (for logging to MLflow, writing JSON)."""
    return dataclasses.asdict(params)  # type: ignore[arg-type]


def _build(cls: type, raw: object, prefix: str) -> Any:
    where = prefix or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params.yaml: {where} should be a mapping of keys to values, got {raw!r}."
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ParamsError(
                f"params.yaml: unknown key '{_join(prefix, key)}'.{hint} "
                f"Allowed in {where}: {', '.join(names)}."
            )
    values = {
        name: _convert(hints[name], raw[name], _join(prefix, name)) for name in names if name in raw
    }
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert(hint: Any, value: object, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        # YAML's true/false are ints to Python; never let them pass as numbers.
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string; accept it as the number
        # the user meant.
        if option is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join(_TYPE_WORDS.get(o, "null") for o in options)
    raise ParamsError(f"params.yaml: {key} = {value!r} has the wrong type; expected {wanted}.")
