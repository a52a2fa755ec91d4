"""Label-issue review: the images whose given label the rest of the data disagrees with.

1. Out-of-fold probabilities. The images of every split, pooled, are cut into K folds
   (stratified by given label, seeded); a head trained on the other K - 1 folds predicts
   each fold, so no image is judged by a head that learnt its label; repeated with
   ``audit.repeats`` fold draws and averaged, so no image hangs on one draw. The heads are
   multinomial logistic regressions on the backbone's pooled features, L2-normalised:
   the direction of an ImageNet feature vector says what the picture holds, its length
   mostly how busy it is.
2. Confident learning (cleanlab): the confident joint (how many images of each given
   class the heads confidently put in each class), calibrated to the given label
   counts, estimates off its diagonal how many labels are wrong; that many images are
   flagged, those with the lowest self-confidence (the probability of their given
   label), most likely issue first.

docs/benchmarks.md measures the rule on the real sample with planted flips, against
cleanlab's defaults on an unnormalised logistic regression (which flag far more images
than are wrong). The features are the plain ones training's frozen-backbone epochs
use, shared through animalcam.feature_store (:func:`pooled_features`, the one function
here that runs TensorFlow); the rest works on arrays.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from animalcam import figures
from animalcam.errors import DataError
from animalcam.examples import read_rgb
from animalcam.outputs import write_bytes, write_csv
from animalcam.params import AuditParams, TrainParams

log = logging.getLogger(__name__)

ISSUES_HEADER = ("path", "given_label", "suggested_label", "score", "rank")
# lbfgs on unit-length features converges in a few hundred steps; the cap only bounds a
# pathological input.
MAX_ITERATIONS = 2000


@dataclass(frozen=True)
class Audit:
    """The outcome for ``n`` images: out-of-fold probabilities and the flagged images."""

    labels: np.ndarray  # (n,) given class indices
    probabilities: np.ndarray  # (n, classes) out-of-fold
    issues: np.ndarray  # indices of the flagged images, most likely issue first
    folds: int  # folds used (0: a single class, nothing to compare)

    @property
    def scores(self) -> np.ndarray:
        """Label quality of each image: the out-of-fold probability of its given label."""
        return self.probabilities[np.arange(len(self.labels)), self.labels]


def pooled_features(
    params: TrainParams,
    class_names: Sequence[str],
    splits: Mapping[str, object],
    cache_dir: str | Path,
    store,
    autotune: bool = True,
) -> np.ndarray:
    """The plain backbone features of every split's images (``splits``: name ->
    animalcam.dataset.Manifest), stacked in that order: ``(n, width)`` float32.

    The backbone is the one train builds from ``params`` (backbone, weights,
    preprocessing, image size, precision policy, seed), fed the images as train reads
    them (``train.input``; splits the images stage does not hold come from the files),
    in batches of ``train.batch_size``, so that ``store`` (an
    animalcam.feature_store.FeatureStore) serves the same vectors to both stages."""
    import keras
    import tensorflow as tf

    from animalcam import image_cache, modeling, precision
    from animalcam.batches import BatchSettings, ordered_batches
    from animalcam.training_inputs import split_examples

    if params.deterministic:  # as the train stage: its op determinism is in the store's key
        tf.config.experimental.enable_op_determinism()
    policy = precision.resolve_policy(params.mixed_precision, "train.mixed_precision")
    keras.utils.set_random_seed(params.seed)  # train's seeding: the same random init
    model = modeling.build_model(
        params.backbone,
        class_names,
        image_size=params.image_size,
        weights=params.weights,
        preprocessing=params.preprocessing,
        dense_units=params.dense_units,
        dropout=params.dropout,
        policy=policy,
    )
    settings = BatchSettings.for_training(params, autotune)
    vectors = []
    for name, manifest in splits.items():
        cached = params.input == "images" and name in image_cache.SPLITS
        examples = split_examples(
            cache_dir, name, manifest, params, "images" if cached else "files"
        )
        vectors.append(
            store.features(
                name,
                model,
                lambda examples=examples: ordered_batches(examples, settings, labels=False),
                len(examples),
                settings.batch_size,
                f"{name} features",
            )
        )
    return np.concatenate(vectors)


def audit_labels(
    features: np.ndarray, labels: Sequence[int], class_names: Sequence[str], params: AuditParams
) -> Audit:
    """Out-of-fold probabilities of ``features`` ``(n, width)`` and the images whose
    given ``labels`` look wrong (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities, folds = out_of_fold_probabilities(
        features,
        labels,
        class_names,
        folds=params.folds,
        seed=params.seed,
        regularization_c=params.regularization_c,
        repeats=params.repeats,
    )
    issues = rank_label_issues(labels, probabilities) if folds else np.zeros(0, np.int64)
    return Audit(labels, probabilities, issues, folds)


def usable_folds(labels: np.ndarray, class_names: Sequence[str], folds: int) -> int:
    """How many folds the labels allow: ``folds``, fewer when a class has fewer images
    (logged), 0 with fewer than two classes. A class with one image is a DataError: no
    head could learn it without it."""
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        log.warning("only one class has images: no label can disagree with another class")
        return 0
    smallest = int(present[np.argmin(counts[present])])
    if counts[smallest] < 2:
        raise DataError(
            f"class {class_names[smallest]!r} has a single image, which no out-of-fold head "
            "can learn; add images of it, or exclude it (data/exclude.txt)."
        )
    if counts[smallest] < folds:
        log.warning(
            "audit.folds = %d but class %r has %d images; using %d folds",
            *(folds, class_names[smallest], counts[smallest], counts[smallest]),
        )
        return int(counts[smallest])
    return folds


def out_of_fold_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    folds: int,
    seed: int,
    regularization_c: float,
    repeats: int = 1,
) -> tuple[np.ndarray, int]:
    """``((n, classes) probabilities, folds used)``: each image's row comes from heads
    trained without it, averaged over ``repeats`` fold draws (seeds ``seed``,
    ``seed + 1``, ...). Classes without images get probability 0; with a single class
    every image gets its given label with probability 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=np.int64)
    n_classes = len(class_names)
    probabilities = np.zeros((len(labels), n_classes), dtype=np.float64)
    used = usable_folds(labels, class_names, folds)
    if used == 0:
        probabilities[np.arange(len(labels)), labels] = 1.0
        return probabilities, 0
    x = unit_rows(features)
    for repeat in range(repeats):
        splitter = StratifiedKFold(n_splits=used, shuffle=True, random_state=seed + repeat)
        for train, held_out in splitter.split(x, labels):
            head = LogisticRegression(C=regularization_c, max_iter=MAX_ITERATIONS)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                head.fit(x[train], labels[train])
            for warning in caught:
                log.warning("audit head: %s", warning.message)
            rows = head.predict_proba(x[held_out]) / repeats
            probabilities[np.ix_(held_out, head.classes_)] += rows
    return probabilities, used


def unit_rows(features: np.ndarray) -> np.ndarray:
    """``features`` with each row scaled to length 1 (an all-zero row stays zero)."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Indices of the likely label issues, most likely first: cleanlab's calibrated
    estimate of how many labels are wrong (the confident joint, rescaled to the given
    label counts, off its diagonal), that many images of the lowest self-confidence.
    Classes without images are left out of cleanlab's view."""
    from cleanlab.count import num_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.flatnonzero(np.bincount(labels, minlength=probabilities.shape[1]))
    remap = np.full(probabilities.shape[1], -1)
    remap[present] = np.arange(len(present))
    given = remap[labels]
    probs = probabilities[:, present]
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    scores = get_label_quality_scores(given, probs, method="self_confidence")
    # The calibrated count, not cleanlab's default (the plain off-diagonal): on the real
    # sample with planted flips, the default's count fell short of the flips on some
    # draws; the calibrated one flags a few more images and misses far fewer flips
    # (docs/benchmarks.md). A review list can afford a few extra images, not misses.
    count = num_label_issues(given, probs, estimation_method="off_diagonal_calibrated")
    return np.argsort(scores, kind="stable")[:count].astype(np.int64)


def issue_rows(
    audit: Audit, paths: Sequence[str], class_names: Sequence[str]
) -> list[list[object]]:
    """Rows of ``label_issues.csv`` (:data:`ISSUES_HEADER`), most likely issue first:
    the manifest path, the given and the suggested (most probable) class, the label
    quality score (lower: more likely wrong) and the rank from 1."""
    scores = audit.scores
    rows = []
    for rank, i in enumerate(audit.issues, start=1):
        suggested = int(np.argmax(audit.probabilities[i]))
        given = class_names[audit.labels[i]]
        rows.append([paths[i], given, class_names[suggested], round(float(scores[i]), 6), rank])
    return rows


def audit_metrics(
    audit: Audit, class_names: Sequence[str], splits: Mapping[str, int]
) -> dict[str, object]:
    """``metrics/audit.json``: images audited (per split, in the order of ``splits``:
    name -> number of images, the order the images were pooled in), folds, issues in all,
    per given class and per split, the estimated noise rate and the out-of-fold accuracy."""
    n = len(audit.labels)
    flagged = np.zeros(n, dtype=bool)
    flagged[audit.issues] = True
    per_class = np.bincount(audit.labels[flagged], minlength=len(class_names))
    per_split, start = {}, 0
    for name, size in splits.items():
        per_split[name] = int(flagged[start : start + size].sum())
        start += size
    predicted = np.argmax(audit.probabilities, axis=1)
    return {
        "images_audited": n,
        "images_per_split": {name: int(size) for name, size in splits.items()},
        "folds": audit.folds,
        "issues": int(flagged.sum()),
        "estimated_noise_rate": round(float(flagged.sum()) / n, 6) if n else 0.0,
        "issues_per_class": {name: int(c) for name, c in zip(class_names, per_class, strict=True)},
        "issues_per_split": per_split,
        "out_of_fold_accuracy": round(float(np.mean(predicted == audit.labels)), 6) if n else 0.0,
    }


def gallery_png(rows: Sequence[Sequence[object]], n: int) -> bytes:
    """The first ``n`` issue rows as a gallery: each image titled with its given and
    suggested class and the given label's score."""
    shown = rows[:n]
    images = [read_rgb(str(row[0])) for row in shown]
    titles = [
        f"given: {row[1]} ({figures.percent(float(row[3]))})\nsuggested: {row[2]}" for row in shown
    ]
    return figures.image_grid_png(
        images,
        titles,
        [figures.INCORRECT_COLOR] * len(shown),
        heading="Likely label issues (most likely first)",
        empty_message="no label issues found",
    )


def write_audit(
    audit: Audit,
    paths: Sequence[str],
    class_names: Sequence[str],
    splits: Mapping[str, int],
    params: AuditParams,
    csv_path,
    png_path,
) -> dict[str, object]:
    """Write ``label_issues.csv`` and its gallery; return the metrics."""
    rows = issue_rows(audit, paths, class_names)
    write_csv(csv_path, ISSUES_HEADER, rows)
    write_bytes(png_path, gallery_png(rows, params.gallery_size))
    metrics = audit_metrics(audit, class_names, splits)
    log.info(
        "%d likely label issue(s) among %d images (%d folds); review %s",
        *(metrics["issues"], metrics["images_audited"], audit.folds, csv_path),
    )
    return metrics
