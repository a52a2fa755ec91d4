"""DVC stage `train`: data/prepared -> models/model.keras, metrics/train.json, history.csv."""

from pathlib import Path

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage
from animalcam.tracking_store import store_failures

PREPARED = Path("data/prepared")
IMAGES = Path("data/images")  # the images stage's output, read when train.input is "images"
MODEL = "models/model.keras"
METRICS = "metrics/train.json"
HISTORY = "plots/train/history.csv"
# Resume state of an unfinished run. Git-ignored and not a DVC output, so it survives a
# killed `dvc repro` (DVC deletes a stage's outputs before it reruns the stage).
STATE_DIR = Path(".train_state")


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam import distributed, model_registry
    from animalcam.modeling import save_model
    from animalcam.resume import clear_state
    from animalcam.training import HISTORY_COLUMNS, history_rows

    params = load_params()
    # TF_CONFIG: this process is one worker of several (README: "Training on several
    # hosts"); the strategy must exist before TensorFlow runs anything else.
    cluster = distributed.cluster_from_environment()
    strategy = distributed.multi_worker_strategy(cluster) if cluster else None
    if not distributed.is_chief(strategy):
        train(params, strategy, callbacks=[])  # its share of every batch; the chief keeps all
        return
    with tracking.stage_run("train", params) as run:
        result, val_set = train(params, strategy, callbacks=[run.keras_callback()])
        run.log_history(result.history)  # epochs trained before a resume, if any
        save_model(result.model, MODEL)
        outputs.write_json(METRICS, result.metrics)
        outputs.write_csv(HISTORY, HISTORY_COLUMNS, history_rows(result.history))

        run.log_params({"precision": result.metrics["precision"]})  # the policy it ran
        run.log_metrics(tracking.numeric_metrics(result.metrics))
        if result.metrics["collapse_warning"]:  # the training log's warning, as a tag
            with store_failures("tag the run", run.tracking_uri):
                run.client.set_tag(run.run_id, "collapse_warning", "true")
        run.log_artifact(HISTORY)
        run.log_artifact(METRICS)
        val_accuracy = result.metrics["best_val_accuracy"]
        model = model_registry.log_trained_model(
            run,
            MODEL,
            params.mlflow.registered_model,
            val_accuracy=val_accuracy,
            example_image=val_set.paths[0],
        )
        run.record_model_run(tracking.MODEL_RUN_FILE, model)
        run.set_headline({"val_accuracy": val_accuracy})
    clear_state(STATE_DIR)  # only now: a crash above resumes instead of retraining


def train(params, strategy, callbacks):
    """Train on data/prepared; (the TrainResult, the validation manifest)."""
    from animalcam.dataset import read_classes, read_manifest
    from animalcam.feature_store import STORE_DIR
    from animalcam.training import train_model

    class_names = read_classes(PREPARED / "classes.json")
    train_set = read_manifest(PREPARED / "train.csv", class_names)
    val_set = read_manifest(PREPARED / "val.csv", class_names)
    result = train_model(
        params.train,
        class_names,
        train_set,
        val_set,
        state_dir=STATE_DIR,
        strategy=strategy,  # None: animalcam.training.select_strategy
        callbacks=callbacks,
        cache_dir=IMAGES,
        speed=params.speed,
        # Plain backbone features shared with the audit stage (or an earlier run).
        feature_dir=STORE_DIR,
    )
    return result, val_set


if __name__ == "__main__":
    run_stage(main, "train", tensorflow=True)
