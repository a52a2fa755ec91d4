"""Label audit: how many planted label flips the audit stage finds (recall), and how many
of the images it flags are flips (precision).

For each --seed, a copy of --data (class folders in the Kaggle layout) with --flip-rate of
its images (5%, seeded draw) moved into another class's folder (also drawn), read as one
manifest in file-name order. On it, the audit stage's own code: animalcam.label_audit's
pooled_features (VGG16 from --weights at --image-size, computed as the train stage
computes them: train's params with mixed_precision auto, batches of 32, the files; one
animalcam.feature_store for the whole run, so the vectors are computed once and the
later draws read them), then audit_labels with the audit params in params.yaml's
defaults (5 out-of-fold heads, cleanlab's low-self-confidence rule). Recall = flips
flagged / flips; precision = flips among the flagged.
Baseline, same run, same features and folds: scikit-learn's LogisticRegression with its
defaults on the raw features, 5-fold, and cleanlab.find_label_issues with its defaults
(the first attempt of issue 14). With --copies N > 1, also the audit's heads trained on N
feature sets per image (plain + train's augmentations, as train.feature_copies makes
them) and their out-of-fold probabilities averaged over the N sets of the held-out images.
Prints each draw, then the mean and the worst draw; the ratio lines are the means.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import IMAGE_SUFFIXES, arguments, describe_machine, ratio


def flipped_copy(data: Path, target: Path, rate: float, seed: int) -> set[str]:
    """Copy ``data``'s class folders to ``target``, each of ``rate`` of the images (a
    seeded draw) into another class's folder; returns the file names moved."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    files = sorted(
        (f for c in classes for f in (data / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda f: (f.parent.name, f.name),
    )
    if len({f.name for f in files}) != len(files):
        raise SystemExit(f"file names under {data} repeat across classes; rename them first")
    rng = np.random.default_rng(seed)
    moved = set(rng.choice(len(files), round(rate * len(files)), replace=False).tolist())
    for c in classes:
        (target / c).mkdir(parents=True)
    for i, f in enumerate(files):
        folder = f.parent.name
        if i in moved:
            others = [c for c in classes if c != folder]
            folder = others[rng.integers(len(others))]
        shutil.copy2(f, target / folder / f.name)
    return {files[i].name for i in moved}


def manifest_of(folder: Path):
    """``(Manifest, English class names)``: every image under ``folder``'s class folders,
    in file-name order (the same order for every draw, so the feature store hits)."""
    from animalcam.classes import english_label
    from animalcam.dataset import Manifest

    folders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    names = sorted(english_label(f, "animals10") or f for f in folders)
    rows = sorted(
        (f.name, str(f), names.index(english_label(d, "animals10") or d))
        for d in folders
        for f in (folder / d).iterdir()
    )
    paths = tuple(p for _, p, _ in rows)
    return Manifest(paths, tuple(y for _, _, y in rows), (0,) * len(rows)), names


def baseline_issues(features: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Issue 14's first attempt: default LogisticRegression, 5 folds, cleanlab defaults."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probs = cross_val_predict(
        LogisticRegression(max_iter=2000), features, labels, cv=folds, method="predict_proba"
    )
    return np.flatnonzero(find_label_issues(labels, probs))


def copies_issues(sets: np.ndarray, labels: np.ndarray, params) -> np.ndarray:
    """The audit's rule with heads trained on every feature set and averaged over them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from animalcam.label_audit import rank_label_issues, unit_rows

    probs = np.zeros((len(labels), int(labels.max()) + 1))
    folds = StratifiedKFold(params.folds, shuffle=True, random_state=params.seed)
    for train, held_out in folds.split(sets[0], labels):
        x = np.concatenate([unit_rows(s[train]) for s in sets])
        head = LogisticRegression(C=params.regularization_c, max_iter=2000)
        head.fit(x, np.tile(labels[train], len(sets)))
        votes = [head.predict_proba(unit_rows(s[held_out])) for s in sets]
        probs[np.ix_(held_out, head.classes_)] = np.mean(votes, axis=0)
    return rank_label_issues(labels, probs)


def augmented_sets(train, manifest, names, copies: int) -> np.ndarray:
    """``(copies, n, width)``: the plain features and copies - 1 augmented sets, made as
    the train stage makes them (animalcam.training_inputs)."""
    import keras

    from animalcam import features, modeling, precision
    from animalcam.augmentation import augmentation
    from animalcam.batches import BatchSettings, ordered_batches
    from animalcam.dataset import FileExamples

    keras.utils.set_random_seed(train.seed)
    policy = precision.resolve_policy(train.mixed_precision)
    model = modeling.build_model(
        train.backbone, names, image_size=train.image_size, weights=train.weights, policy=policy
    )
    examples = FileExamples.of(manifest, train.image_size)
    settings = BatchSettings(train.batch_size)
    return features.feature_copies(
        features.feature_extractor(model),
        lambda augment: ordered_batches(examples, settings, labels=False, augment=augment),
        len(manifest),
        copies,
        lambda k: augmentation(train.augment, seed=train.seed, stream=k),
    )


def scores(flagged, moved: set[str], paths) -> tuple[float, float]:
    hits = sum(Path(paths[i]).name in moved for i in flagged)
    return hits / len(moved), hits / max(1, len(flagged))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--flip-rate", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--copies", type=int, default=1, help="also try N feature sets")
    args = parser.parse_args()

    from animalcam.feature_store import FeatureStore
    from animalcam.label_audit import audit_labels, pooled_features
    from animalcam.params import params_from_dict
    from animalcam.precision import resolve_policy

    params = params_from_dict(
        {"train": {"weights": str(args.weights), "image_size": args.image_size, "input": "files"}}
    )
    print(describe_machine())
    print(
        f"setup: {args.data}, {args.flip_rate:.0%} of labels flipped, draws {args.seed}; "
        f"{params.train.backbone} at {args.image_size} px, policy "
        f"{resolve_policy(params.train.mixed_precision)}; audit {params.audit}"
    )
    results: dict[str, list[tuple[float, float]]] = {"audit": [], "baseline": []}
    if args.copies > 1:
        results[f"audit, {args.copies} feature sets"] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp) / "features")
        for seed in args.seed:
            copy = Path(tmp) / f"draw-{seed}"
            moved = flipped_copy(args.data, copy, args.flip_rate, seed)
            manifest, names = manifest_of(copy)
            started = time.perf_counter()
            x = pooled_features(params.train, names, {"all": manifest}, copy, store)
            seconds = time.perf_counter() - started
            labels = np.asarray(manifest.labels)
            flagged = {
                "audit": audit_labels(x, labels, names, params.audit).issues,
                "baseline": baseline_issues(x, labels, params.audit.seed),
            }
            if args.copies > 1:
                sets = augmented_sets(params.train, manifest, names, args.copies)
                flagged[f"audit, {args.copies} feature sets"] = copies_issues(
                    sets, labels, params.audit
                )
            line = [f"draw {seed}: {len(moved)} flips of {len(labels)}, features {seconds:.0f} s"]
            for name, issues in flagged.items():
                recall, precision = scores(issues, moved, manifest.paths)
                results[name].append((recall, precision))
                line.append(
                    f"{name}: {len(issues)} flagged, recall {recall:.2f} precision {precision:.2f}"
                )
            print("; ".join(line))
    for name, values in results.items():
        r, p = np.array(values).T
        print(
            f"{name}: recall mean {r.mean():.3f} (worst {r.min():.3f}), "
            f"precision mean {p.mean():.3f} (worst {p.min():.3f}) over {len(values)} draws"
        )
    recall, precision = np.array(results["audit"]).mean(axis=0)
    base_recall, base_precision = np.array(results["baseline"]).mean(axis=0)
    ratio("label_audit_recall", recall)
    ratio("label_audit_precision", precision)
    ratio("label_audit_precision_vs_cleanlab_default", precision / max(base_precision, 1e-9))
    ratio("label_audit_recall_vs_cleanlab_default", recall / max(base_recall, 1e-9))


if __name__ == "__main__":
    main()
