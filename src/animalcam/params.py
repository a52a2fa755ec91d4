"""One typed, validated view of ``params.yaml``.

Every stage reads its settings through :func:`load_params`, which checks the whole file
once: unknown keys (with a "did you mean" hint), wrong types and out-of-range values are
a :class:`~animalcam.errors.ParamsError` naming the key, the value and what is allowed.
Keys left out of ``params.yaml`` take the defaults below, which reproduce the reference
study (see docs/design.md); ``params.yaml`` in the repository spells them all out so that
``dvc params diff`` shows every change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from animalcam.errors import ParamsError, SourceNotFoundError

DEFAULT_PATH = Path("params.yaml")
# A text setting whose values include "on" and "off" ("auto", "on", "off", ...). YAML 1.1
# reads a bare on/off as a boolean; for these keys it is taken back as the word.
Switch = typing.NewType("Switch", str)
# The `mixed_precision` settings of train, evaluate and explain (animalcam.precision):
# "auto" (float16 on a GPU, bfloat16 on a CPU with bfloat16 instructions, else float32),
# "on" (16-bit compute wherever), "off" (float32), or a 16-bit type forced.
PRECISION_SETTINGS = ("auto", "on", "off", "bfloat16", "float16")


# numpy's legacy seeding and TensorFlow's op seeds take 32-bit values; keep to int32.
MAX_SEED = 2**31 - 1
# Bootstrap resamples (evaluate.bootstrap_resamples, `animalcam compare --resamples`):
# fewer than 1,000 leave 25 or fewer resamples in each tail of a 95% interval; beyond
# 100,000 the bounds' resampling wobble is far below the 4 decimals written, only the
# wait grows.
MIN_BOOTSTRAP_RESAMPLES = 1000
MAX_BOOTSTRAP_RESAMPLES = 100_000
# Longest path or name we take: PATH_MAX on Linux; MLflow's database columns hold 256.
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 256
# Control characters (NUL, newline, escape sequences ...) and lone surrogates (YAML's
# "\ud800" escape) have no place in a path or a name: they break open(), log lines and
# MLflow's database.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ParamsError(
            f"params.yaml: {key} = {_show(value)} is not allowed; expected {allowed}."
        )


def _check_choice(section: object, prefix: str, name: str, choices) -> None:
    """``section.name`` is one of ``choices``; the message lists them, quoted."""
    value = getattr(section, name)
    quoted = [f"'{choice}'" for choice in choices]
    allowed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    _check(value in choices, f"{prefix}.{name}", value, allowed)


def _check_ints(obj: object, prefix: str, **ranges: tuple[int, int]) -> None:
    """Each named integer field of ``obj`` within its [low, high]."""
    for name, (low, high) in ranges.items():
        value = getattr(obj, name)
        _check(low <= value <= high, f"{prefix}.{name}", value, f"an integer in [{low}, {high}]")


def _is_clean_text(value: str, max_chars: int) -> bool:
    return bool(value.strip()) and len(value) <= max_chars and not _CONTROL.search(value)


class _ShortRepr(reprlib.Repr):
    """repr() for messages, bounded however long or deeply nested the value is (YAML
    aliases let a small file hold a huge list), and safe for integers too long for str()."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlevel = 2

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # about 60 digits; str() refuses beyond 4300
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return repr(x)


_short_repr = _ShortRepr()


def _show(value: object) -> str:
    text = _short_repr.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


@dataclass(frozen=True)
class DataParams:
    # "kaggle" downloads through the Kaggle API; anything else is a local .zip or folder.
    source: str = "kaggle"
    kaggle_dataset: str = "alessiocorrado99/animals10"
    # The real archive unpacks to about 0.6 GB; refuse anything claiming to be far
    # larger before writing a byte (zip bombs, wrong file).
    max_extract_gb: float = 20.0
    # Animals-10 has about 26,000 files; 200,000 leaves room for much larger image sets
    # while refusing archives of millions of tiny entries, whose listing alone exhausts
    # memory and inodes (and which no image dataset needs).
    max_members: int = 200_000

    def check(self, prefix: str) -> None:
        _check(
            _is_clean_text(self.source, MAX_PATH_CHARS),
            f"{prefix}.source",
            self.source,
            "'kaggle' or a path to a local .zip or folder",
        )
        _check(
            re.fullmatch(r"[\w.-]+/[\w.-]+(/\d+)?", self.kaggle_dataset, re.ASCII) is not None,
            f"{prefix}.kaggle_dataset",
            self.kaggle_dataset,
            "'<owner>/<dataset>' or '<owner>/<dataset>/<version>'",
        )
        _check(
            0 < self.max_extract_gb < float("inf"),
            f"{prefix}.max_extract_gb",
            self.max_extract_gb,
            "a finite number > 0",
        )
        _check_ints(self, prefix, max_members=(1, 100_000_000))


@dataclass(frozen=True)
class PrepareParams:
    val_split: float = 0.15  # the study's 85/15 split
    # A third, held-out split for the final figures (0.15: 70/15/15). With it, validation
    # still picks the best epoch and stops training; evaluate and explain report on test.
    test_split: float = 0.0
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
            0 <= self.test_split <= 0.5 and self.val_split + self.test_split <= 0.6,
            f"{prefix}.test_split",
            self.test_split,
            f"a fraction in [0, 0.5] that leaves training at least 40% with val_split "
            f"{self.val_split}",
        )
        _check(
            self.class_set in ("animals10", "folders"),
            f"{prefix}.class_set",
            self.class_set,
            "'animals10' or 'folders'",
        )
        # 65535 px: the largest side a JPEG can have; 1 Gpx decodes to 3 GB of RGB.
        _check_ints(self, prefix, seed=(0, MAX_SEED), min_side=(1, 65_535), max_pixels=(1, 10**9))
        _check(
            0 <= self.near_duplicate_distance <= 16,
            f"{prefix}.near_duplicate_distance",
            self.near_duplicate_distance,
            "an integer in [0, 16]",
        )
        splits = 3 if self.test_split > 0 else 2
        _check(
            splits <= self.min_per_class <= 1_000_000,
            f"{prefix}.min_per_class",
            self.min_per_class,
            f"an integer in [{splits}, 1000000] (at least one image in each of the "
            f"{splits} splits)",
        )


@dataclass(frozen=True)
class AugmentParams:
    """The study's ImageDataGenerator settings, as Keras preprocessing layers."""

    rotation: float = 20.0  # degrees, either way
    translate: float = 0.2  # fraction of width/height, either way
    shear: float = 0.2  # shear intensity, either way
    zoom: float = 0.2  # fraction, in or out
    horizontal_flip: bool = True
    # true: all five in one resampling per image (animalcam.layers.RandomAffine, faster
    # on a CPU: docs/benchmarks.md); false: Keras' own RandomRotation ... RandomFlip
    # layers in a row.
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
    # The main phase's rate for the head; with the warm-up below the study's 1e-4 only
    # fine-tunes (the study trained everything at 1e-4 from the first step).
    learning_rate: float = 1e-4
    # In a phase with backbone layers trainable, they update at learning_rate x this
    # (discriminative rates, as fastai's fine_tune): pretrained filters need smaller steps
    # than a head trained for two epochs. 1: every variable at learning_rate (the study).
    backbone_lr_factor: float = 0.1
    # In a phase with backbone layers trainable, the rate rises linearly from
    # learning_rate / N to learning_rate over its first N optimizer steps, however many
    # epochs that takes (a ReduceLROnPlateau cut during the ramp carries through it):
    # a fresh Adam moves every weight by about one learning rate per step whatever its
    # gradient, and its moments need some steps to settle. 50 steps: 1/14 of an epoch of
    # Animals-10 at batch 32 (690 steps), 5.6 epochs of a 270-image sample (capped at one
    # epoch, the sample's first unfrozen epoch lost up to 11% of the warm-up's accuracy).
    # 0: no warm-up (the study).
    lr_warmup_steps: int = 50
    dense_units: int = 512
    dropout: float = 0.0
    label_smoothing: float = 0.0
    # "all" (the study), "head" (frozen backbone), or N: unfreeze the top N conv blocks.
    trainable: int | str = "all"
    # Epochs with a frozen backbone before the policy above applies; a fresh head's
    # large gradients would otherwise wreck the pretrained filters (issue 12: the study's
    # all-at-1e-4 from step 1 sits at a near-uniform output). Two epochs on cached
    # features cost little next to one epoch through the whole network. 0: the study.
    warmup_epochs: int = 2
    warmup_learning_rate: float = 1e-3
    class_weight: str = "none"  # "none" or "balanced" (inverse class frequency)
    seed: int = 42
    # Bit-for-bit reruns: on top of the seeds (which always fix the order, the
    # augmentations and the initial weights), TensorFlow's op determinism, so that the same
    # params, data, code and machine give the same weights and history, and a resumed run
    # the same as an uninterrupted one. It costs little on a CPU; on a GPU cuDNN then
    # picks slower deterministic kernels, and an op that has none raises an error
    # (docs/benchmarks.md). It is process-wide: once a run has switched it on, it stays on
    # in that process (the train stage is a process of its own). false: TensorFlow's
    # default, results may differ in the last bits from run to run.
    deterministic: bool = True
    top_k: int = 3
    augment: AugmentParams = field(default_factory=AugmentParams)
    early_stopping_patience: int = 5
    reduce_lr_factor: float = 0.2
    reduce_lr_patience: int = 3
    min_lr: float = 1e-7
    # "auto": float16 compute on a GPU, bfloat16 on a CPU with bfloat16 instructions
    # (AVX512_BF16 or AMX: about twice float32's speed there), float32 elsewhere; "on"
    # forces 16-bit compute (bfloat16 on any CPU), "off" float32, "bfloat16"/"float16"
    # that type. Weights, softmax and loss stay float32; the saved model is float32.
    mixed_precision: Switch = "auto"
    # --- Faster paths (docs/benchmarks.md). Each changes the order or the kind of what
    # the model sees, so each is a dep of train; pure speed switches live in `speed`.
    # "images": read the images stage's output (data/images, decoded and resized once);
    # "files": decode and resize the original files every epoch.
    input: str = "images"
    # Images in the shuffle buffer when reading data/images (records are read in
    # sequence, so the shuffle is a buffer, plus a shuffled shard order).
    shuffle_buffer: int = 2048
    # "auto": epochs with a frozen backbone (trainable: head, or warm-up) train the head on
    # backbone features computed once per image, instead of running the backbone every
    # epoch; "off": always run the whole model.
    backbone_features: Switch = "auto"
    # Feature sets computed per training image for those epochs: the first without
    # augmentation, the others with train.augment; epoch e uses set e mod feature_copies.
    # 1 = no augmentation for the head (fastest); each extra copy costs one backbone pass.
    feature_copies: int = 2

    def check(self, prefix: str) -> None:
        self._check_model(prefix)
        self._check_optimizer(prefix)
        self._check_inputs(prefix)

    def _check_model(self, prefix: str) -> None:
        from animalcam.backbones import BACKBONES  # the registry names the allowed values

        _check_choice(self, prefix, "backbone", sorted(BACKBONES))
        _check(
            _is_clean_text(self.weights, MAX_PATH_CHARS),
            f"{prefix}.weights",
            self.weights,
            "'imagenet', 'none' or a path to a weights file (no control characters)",
        )
        _check_choice(self, prefix, "preprocessing", ("backbone", "rescale"))
        _check_choice(self, prefix, "mixed_precision", PRECISION_SETTINGS)
        blocks = len(BACKBONES[self.backbone].blocks)
        trainable_ok = self.trainable in ("all", "head") or (
            isinstance(self.trainable, int) and 1 <= self.trainable <= blocks
        )
        _check(
            trainable_ok,
            f"{prefix}.trainable",
            self.trainable,
            f"'all', 'head', or a number of top blocks of {self.backbone} in [1, {blocks}]",
        )

    def _check_optimizer(self, prefix: str) -> None:
        # Upper bounds far above any real use, below what exhausts memory or overflows.
        _check_ints(
            self,
            prefix,
            image_size=(32, 2048),
            batch_size=(1, 65_536),
            epochs=(1, 100_000),
            dense_units=(1, 65_536),
            top_k=(1, 1000),
            early_stopping_patience=(1, 100_000),
            reduce_lr_patience=(1, 100_000),
            seed=(0, MAX_SEED),
            shuffle_buffer=(1, 1_000_000),
            feature_copies=(1, 100),  # each copy is one more backbone pass over the data
        )
        for name in ("learning_rate", "warmup_learning_rate"):
            value = getattr(self, name)
            _check(0 < value <= 10, f"{prefix}.{name}", value, "a number in (0, 10]")
        _check(0 <= self.min_lr <= 10, f"{prefix}.min_lr", self.min_lr, "a number in [0, 10]")
        _check(
            0 < self.reduce_lr_factor < 1,
            f"{prefix}.reduce_lr_factor",
            self.reduce_lr_factor,
            "a number in (0, 1)",
        )
        _check(
            0 < self.backbone_lr_factor <= 1,
            f"{prefix}.backbone_lr_factor",
            self.backbone_lr_factor,
            "a number in (0, 1]",
        )
        _check(
            0 <= self.lr_warmup_steps <= 1_000_000,
            f"{prefix}.lr_warmup_steps",
            self.lr_warmup_steps,
            "an integer in [0, 1000000]",
        )
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{prefix}.{name}", value, "a number in [0, 1)")
        _check(
            0 <= self.warmup_epochs < self.epochs,
            f"{prefix}.warmup_epochs",
            self.warmup_epochs,
            f"an integer in [0, train.epochs={self.epochs})",
        )
        _check_choice(self, prefix, "class_weight", ("none", "balanced"))

    def _check_inputs(self, prefix: str) -> None:
        if self.input == "cache":
            raise ParamsError(
                f"params.yaml: {prefix}.input: cache was renamed to images; "
                f"write {prefix}.input: images instead."
            )
        _check_choice(self, prefix, "input", ("images", "files"))
        _check_choice(self, prefix, "backbone_features", ("auto", "off"))


@dataclass(frozen=True)
class ImagesParams:
    """The images stage (data/images): each usable image decoded and resized once, to
    train.image_size, so that train and evaluate never decode the originals again."""

    # "raw": uint8 pixels, exactly what the served model computes from the same file, and
    # nothing to decode (the fastest to read). "png": also exact, about half the size,
    # slower to read. "jpeg": re-encoded at `quality`, the smallest, but lossy: training
    # and evaluation then see JPEG-rounded pixels that serving does not. Sizes and
    # speeds: docs/benchmarks.md.
    encoding: str = "raw"
    quality: int = 95  # JPEG quality; 95 keeps pixels close to the resized image
    # Images per TFRecord shard; the shards' order is shuffled each epoch, so this is
    # part of the training order (a dep of train through data/images).
    shard_images: int = 1024

    def check(self, prefix: str) -> None:
        _check(
            self.encoding in ("png", "jpeg", "raw"),
            f"{prefix}.encoding",
            self.encoding,
            "'png', 'jpeg' or 'raw'",
        )
        _check(
            1 <= self.quality <= 100, f"{prefix}.quality", self.quality, "an integer in [1, 100]"
        )
        _check_ints(self, prefix, shard_images=(1, 100_000))


@dataclass(frozen=True)
class EvaluateParams:
    top_k: int = 3
    gallery_size: int = 16  # images in each of the correct / incorrect galleries
    calibration_bins: int = 15  # for the expected calibration error
    # The predictions' precision, as train.mixed_precision ("auto": bfloat16 on a CPU
    # with bfloat16 instructions). It changes probabilities in their third digit, so it
    # is a key of this stage, not a speed switch (docs/benchmarks.md has the agreement).
    mixed_precision: Switch = "auto"
    # Resamples behind each 95% bootstrap interval in metrics/evaluate.json (the `_ci95`
    # keys). Each 2.5% tail then rests on 50 resamples; below 1,000 the bounds wander
    # from seed to seed. They are drawn as counts, so more cost little.
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0  # the same seed gives the same intervals, byte for byte

    def check(self, prefix: str) -> None:
        _check_choice(self, prefix, "mixed_precision", PRECISION_SETTINGS)
        _check_ints(
            self,
            prefix,
            top_k=(1, 1000),
            gallery_size=(1, 1000),  # images in one figure
            calibration_bins=(1, 1000),
            bootstrap_resamples=(MIN_BOOTSTRAP_RESAMPLES, MAX_BOOTSTRAP_RESAMPLES),
            bootstrap_seed=(0, MAX_SEED),
        )


@dataclass(frozen=True)
class ExplainParams:
    n_correct: int = 8
    n_incorrect: int = 8
    layer: str | None = None  # None: the backbone's last convolutional layer
    alpha: float = 0.4  # heatmap opacity in the overlay
    faithfulness_fraction: float = 0.2  # share of the image blurred in the check
    seed: int = 0  # places the random regions the faithfulness check compares against
    # Grad-CAM's and the faithfulness check's precision, as train.mixed_precision ("auto":
    # bfloat16 on a CPU with bfloat16 instructions; how close its maps come to float32's
    # is in docs/benchmarks.md).
    mixed_precision: Switch = "auto"

    def check(self, prefix: str) -> None:
        _check_choice(self, prefix, "mixed_precision", PRECISION_SETTINGS)
        _check_ints(
            self,
            prefix,
            n_correct=(0, 1000),  # one Grad-CAM panel each
            n_incorrect=(0, 1000),
            seed=(0, MAX_SEED),
        )
        _check(
            self.layer is None or _is_clean_text(self.layer, MAX_NAME_CHARS),
            f"{prefix}.layer",
            self.layer,
            f"null or a layer name of 1 to {MAX_NAME_CHARS} characters, no control characters",
        )
        _check(0 < self.alpha < 1, f"{prefix}.alpha", self.alpha, "a number in (0, 1)")
        _check(
            0 < self.faithfulness_fraction < 1,
            f"{prefix}.faithfulness_fraction",
            self.faithfulness_fraction,
            "a number in (0, 1)",
        )


@dataclass(frozen=True)
class ExportParams:
    """The export stage (models/export): the trained model as SavedModel, LiteRT float16
    and int8, ONNX, and the bars their answers must meet against the Keras model on the
    validation split (README, "Export and run on a device"). A form under its bar fails
    the stage."""

    # Training images (a seeded draw) whose activations calibrate the int8 ranges: a few
    # hundred cover them; each one more is one more float pass in the conversion.
    representative_images: int = 200
    seed: int = 0  # draws the representative images
    # Float forms (SavedModel, LiteRT float16, ONNX): share of validation images whose
    # top-1 class equals the Keras model's. float16 rounding may flip a near tie.
    min_agreement: float = 0.995
    # int8: as above, and its accuracy at most this below the Keras model's. A rise is
    # no fault: on a small split it is one close call going the other way, and the
    # agreement bar already bounds how often int8 answers differently, either way.
    int8_min_agreement: float = 0.98
    int8_max_accuracy_drop: float = 0.01

    def check(self, prefix: str) -> None:
        _check_ints(self, prefix, representative_images=(1, 100_000), seed=(0, MAX_SEED))
        for name in ("min_agreement", "int8_min_agreement", "int8_max_accuracy_drop"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{prefix}.{name}", value, "a fraction in [0, 1]")


@dataclass(frozen=True)
class AuditParams:
    """The audit stage (plots/audit): images whose given label looks wrong, found by
    confident learning (cleanlab) on out-of-fold probabilities of heads trained on the
    backbone's features (README, "Review the labels"; docs/benchmarks.md measures the rule)."""

    # Every image is predicted by a head that never saw it: K heads, each trained on the
    # other K-1 folds (stratified by class). 5: each head sees 80% of the data. Reduced,
    # with a note in the log, when a class has fewer images than folds.
    folds: int = 5
    # The K-fold split repeated with this many fold draws, each image's probabilities
    # averaged over its heads: one unlucky fold draw matters less (the worst of 24 planted
    # draws on the real sample went from precision 0.44 to 0.50: docs/benchmarks.md).
    repeats: int = 3
    seed: int = 0  # draws the folds (repeat r: seed + r)
    # Inverse L2 strength (scikit-learn's C) of the heads: multinomial logistic regressions
    # on L2-normalised features. Smaller: smoother heads, less sure of clean images near a
    # class border; larger: heads that start to learn the wrong labels. 10 flagged planted
    # flips best on the real sample (docs/benchmarks.md).
    regularization_c: float = 10.0
    gallery_size: int = 16  # most likely issues shown in plots/audit/label_issues.png

    def check(self, prefix: str) -> None:
        _check_ints(
            self,
            prefix,
            folds=(2, 100),
            repeats=(1, 100),
            seed=(0, MAX_SEED - 100),
            gallery_size=(1, 1000),
        )
        _check(
            0 < self.regularization_c <= 1e6,
            f"{prefix}.regularization_c",
            self.regularization_c,
            "a number in (0, 1000000]",
        )


@dataclass(frozen=True)
class SpeedParams:
    """Switches that change how fast a stage runs, not what it computes: no stage lists
    this section in dvc.yaml, so changing one reruns nothing. The computation is the
    same; only the last bits of floating-point results may differ (XLA fuses operations,
    a batch size changes how a matrix product is blocked), as between two machines. The
    order in which training sees its examples depends on none of them."""

    # train: tf.data's autotuning of parallelism and buffer sizes (off: fixed, for
    # debugging). The order of the examples is fixed (deterministic maps) either way.
    autotune: bool = True
    # train: with one GPU, stage the next batches in GPU memory while one trains.
    prefetch_to_device: bool = True
    # train: XLA for the full model (backbone + head). Off: on a CPU, compiling VGG16
    # costs more than it saves and the last, smaller batch compiles twice.
    train_xla: bool = False
    # train: XLA for the epochs that train the head on backbone features (a small dense
    # graph that compiles quickly). Both XLA switches only act with train.deterministic
    # false: Keras compiles nothing with XLA under op determinism.
    head_xla: bool = True
    evaluate_batch_size: int = 64  # evaluate: images per forward pass
    explain_batch_size: int = 16  # explain: images per Grad-CAM and faithfulness pass
    # explain: XLA for the Grad-CAM step. "auto": on a GPU only.
    explain_xla: Switch = "auto"

    def check(self, prefix: str) -> None:
        _check_ints(self, prefix, evaluate_batch_size=(1, 65_536), explain_batch_size=(1, 65_536))
        _check(
            self.explain_xla in ("auto", "on", "off"),
            f"{prefix}.explain_xla",
            self.explain_xla,
            "'auto', 'on' or 'off'",
        )


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "animalcam"
    registered_model: str = "animalcam-classifier"

    def check(self, prefix: str) -> None:
        for name in ("experiment", "registered_model"):
            value = getattr(self, name)
            _check(
                _is_clean_text(value, MAX_NAME_CHARS),
                f"{prefix}.{name}",
                value,
                f"a name of 1 to {MAX_NAME_CHARS} characters, no control characters",
            )
        # The model registry's own rule: the name becomes part of models:/<name>/<version>.
        name = self.registered_model
        _check(
            not any(c in name for c in "/:") and not name.startswith("..") and name != ".",
            f"{prefix}.registered_model",
            name,
            "a model name without '/' or ':', not '.' and not starting with '..'",
        )


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    images: ImagesParams = field(default_factory=ImagesParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    export: ExportParams = field(default_factory=ExportParams)
    audit: AuditParams = field(default_factory=AuditParams)
    speed: SpeedParams = field(default_factory=SpeedParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)


# Keys that moved, old -> new: a params.yaml (or a `dvc exp run -S`) still using an old
# one gets one line naming the new key instead of "unknown key".
RENAMED = {
    "cache": "images",
    "train.feature_cache": "train.backbone_features",
    "train.autotune": "speed.autotune",
    "train.prefetch_to_device": "speed.prefetch_to_device",
    "train.xla": "speed.train_xla",
    "train.head_xla": "speed.head_xla",
    "evaluate.batch_size": "speed.evaluate_batch_size",
    "explain.batch_size": "speed.explain_batch_size",
    "explain.xla": "speed.explain_xla",
}


# params.yaml holds a few kilobytes; anything this large is not a settings file.
MAX_FILE_BYTES = 1 << 20


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    """Read and validate ``params.yaml``; raise ParamsError on the first problem."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(
            f"{path} not found; run from the repository root, where params.yaml lives."
        )
    raw = _parse_yaml(path, _read_text(path))
    if raw is None:
        raise ParamsError(
            f"{path} is empty; it should hold the sections "
            f"{', '.join(f.name for f in dataclasses.fields(Params))}. "
            f"Restore it from the repository (git checkout -- {path})."
        )
    return params_from_dict(raw)


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ParamsError(
                f"{path} is {size} bytes, more than a settings file holds "
                f"(limit {MAX_FILE_BYTES}); check that it is the right file."
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ParamsError(
            f"{path} is not UTF-8 text (byte {data[exc.start]:#04x} on line {line}); "
            "save it as UTF-8."
        ) from None


def _parse_yaml(path: Path, text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    except ValueError as exc:  # an integer longer than Python converts (4300 digits)
        raise ParamsError(f"{path} holds a value YAML cannot read: {exc}.") from None
    except RecursionError:
        raise ParamsError(f"{path} nests lists or mappings too deeply to read.") from None


def params_from_dict(raw: object) -> Params:
    return _build(Params, raw, prefix="")


def as_dict(params: object) -> dict[str, Any]:
    """Plain nested dict (for logging to MLflow, writing JSON)."""
    return dataclasses.asdict(params)  # type: ignore[arg-type]


def _build(cls: type, raw: object, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params.yaml: {where} should be a mapping of keys to values, got {_show(raw)}."
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if _join(prefix, key) in RENAMED:
            raise ParamsError(_renamed(_join(prefix, key)))
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ParamsError(
                f"params.yaml: unknown key {_show(_join(prefix, key))}.{hint} "
                f"Allowed in {where}: {', '.join(names)}."
            )
    values = {
        name: _convert(hints[name], raw[name], _join(prefix, name)) for name in names if name in raw
    }
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(prefix)
    _check_limits(obj, prefix)
    return obj


def _renamed(old: str) -> str:
    new = RENAMED[old]
    if "." not in old:
        return f"params.yaml: the section {old} was renamed to {new}; rename it there."
    where = new.rsplit(".", 1)[0]
    return (
        f"params.yaml: {old} was renamed to {new}; move it to the {where} section "
        f"(dvc exp run -S {new}=...)."
    )


def _check_limits(obj: object, prefix: str) -> None:
    """What every field must satisfy, whatever its own check says (or forgets): a number
    is finite, an integer fits in 64 bits (numpy, TensorFlow, SQLite), text has no
    control characters and fits a path."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value, key = getattr(obj, f.name), _join(prefix, f.name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _check(math.isfinite(value), key, value, "a finite number")
        elif isinstance(value, int):
            _check(-(2**63) <= value < 2**63, key, value, "an integer that fits in 64 bits")
        elif isinstance(value, str):
            _check(
                _is_clean_text(value, MAX_PATH_CHARS),
                key,
                value,
                f"non-blank text of at most {MAX_PATH_CHARS} characters, no control characters",
            )


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Switch: "a string",
}


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
            return _to_float(value, key)
        # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string; accept it as the number
        # the user meant.
        if option is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
        if option is Switch and isinstance(value, str):
            return value
        # YAML 1.1 reads a bare on/off (as `dvc exp run -S train.backbone_features=off` writes
        # it) as true/false; for a switch those mean "on" and "off", which the section's
        # check then accepts or refuses with the allowed values.
        if option is Switch and isinstance(value, bool):
            return "on" if value else "off"
    wanted = " or ".join(_TYPE_WORDS.get(o, "null") for o in options)
    raise ParamsError(f"params.yaml: {key} = {_show(value)} has the wrong type; expected {wanted}.")


def _to_float(value: float, key: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range, such as 10**400
        raise ParamsError(
            f"params.yaml: {key} = {_show(value)} is not allowed; expected a finite number."
        ) from None
