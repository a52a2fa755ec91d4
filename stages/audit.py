"""DVC stage `audit`: every prepared split -> plots/audit/label_issues.{csv,png},
metrics/audit.json (the images whose given label looks wrong, most likely first)."""

from pathlib import Path

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

PREPARED = Path("data/prepared")
IMAGES = Path("data/images")  # the images stage's output, read as train reads it
SPLITS = ("train", "val", "test")  # test.csv exists when prepare.test_split > 0
ISSUES_CSV = "plots/audit/label_issues.csv"
GALLERY = "plots/audit/label_issues.png"
METRICS = "metrics/audit.json"


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam import label_audit, precision
    from animalcam.dataset import read_classes, read_manifest
    from animalcam.feature_store import STORE_DIR, FeatureStore

    params = load_params()
    with tracking.stage_run("audit", params) as run:
        class_names = read_classes(PREPARED / "classes.json")
        csvs = {s: PREPARED / f"{s}.csv" for s in SPLITS if (PREPARED / f"{s}.csv").is_file()}
        splits = {name: read_manifest(csv, class_names) for name, csv in csvs.items()}
        store = FeatureStore(STORE_DIR)  # shared with train's frozen-backbone epochs
        features = label_audit.pooled_features(
            params.train, class_names, splits, IMAGES, store, params.speed.autotune
        )
        labels = [label for manifest in splits.values() for label in manifest.labels]
        audit = label_audit.audit_labels(features, labels, class_names, params.audit)
        # The manifests' own `path` values, so that a row pastes into data/exclude.txt.
        paths = [row["path"] for csv in csvs.values() for row in outputs.read_csv(csv)]
        sizes = {name: len(manifest) for name, manifest in splits.items()}
        metrics = label_audit.write_audit(
            audit, paths, class_names, sizes, params.audit, ISSUES_CSV, GALLERY
        )
        policy = precision.resolve_policy(params.train.mixed_precision, "train.mixed_precision")
        metrics["precision"] = policy
        outputs.write_json(METRICS, metrics)
        run.log_params({"precision": policy})
        run.log_metrics(tracking.numeric_metrics(metrics))
        run.log_artifact(METRICS)
        run.log_artifact(Path(ISSUES_CSV).parent)
        run.set_headline({"label_issues": metrics["issues"]})


if __name__ == "__main__":
    run_stage(main, "audit", tensorflow=True)
