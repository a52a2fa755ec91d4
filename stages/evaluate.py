"""DVC stage `evaluate`: model + test split (validation without one) ->
metrics/evaluate.json, plots/evaluate/."""

from pathlib import Path

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

METRICS = "metrics/evaluate.json"
PREPARED = Path("data/prepared")


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam import dataset, evaluation, image_cache, modeling, precision
    from animalcam.batches import BatchSettings, ordered_batches

    params = load_params()
    with tracking.stage_run("evaluate", params, model_run_file=tracking.MODEL_RUN_FILE) as run:
        model = modeling.load_model("models/model.keras")
        policy = precision.resolve_policy(
            params.evaluate.mixed_precision, "evaluate.mixed_precision"
        )
        model = precision.inference_model(model, policy)  # this machine's fastest
        names = modeling.class_names(model)
        settings = BatchSettings(batch_size=params.speed.evaluate_batch_size)

        def predict(split: str):
            manifest = dataset.read_manifest(PREPARED / f"{split}.csv", names)
            # The images stage's output when it fits the model (size, split), else the files.
            examples = image_cache.image_examples(
                "data/images", split, manifest, modeling.image_size(model)
            )
            batches = ordered_batches(examples, settings, labels=False)
            return manifest, evaluation.predict_probabilities(model, batches)

        # Validation chose the best epoch and stopped training, so its figures flatter the
        # model; with a test split the reported ones (and explain's) come from test.
        split = "test" if (PREPARED / "test.csv").is_file() else "val"
        manifest, probabilities = predict(split)
        metrics = evaluation.write_evaluation(
            manifest.paths, manifest.labels, probabilities, names, params.evaluate, "plots/evaluate"
        )
        metrics["split"] = split
        if split == "test":
            val, val_probabilities = predict("val")
            metrics["val"] = evaluation.headline_metrics(
                val.labels, val_probabilities, names, params.evaluate
            )
        metrics["precision"] = policy
        outputs.write_json(METRICS, metrics)
        run.log_params({"precision": policy, "split": split})
        run.log_metrics(tracking.numeric_metrics(metrics))
        run.log_artifact(METRICS)
        run.log_artifact("plots/evaluate")
        run.set_headline(
            {f"{split}_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_avg"]["f1"]}
        )


if __name__ == "__main__":
    run_stage(main, "evaluate", tensorflow=True)
