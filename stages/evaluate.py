"""DVC stage `evaluate`: model + validation split -> metrics/evaluate.json, plots/evaluate/."""

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

METRICS = "metrics/evaluate.json"


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
        val = dataset.read_manifest("data/prepared/val.csv", names)
        # The images stage's output when it fits the model (size, split), else the files.
        examples = image_cache.image_examples("data/images", "val", val, modeling.image_size(model))
        settings = BatchSettings(batch_size=params.speed.evaluate_batch_size)
        batches = ordered_batches(examples, settings, labels=False)
        probabilities = evaluation.predict_probabilities(model, batches)
        metrics = evaluation.write_evaluation(
            val.paths, val.labels, probabilities, names, params.evaluate, "plots/evaluate"
        )
        metrics["precision"] = policy
        outputs.write_json(METRICS, metrics)
        run.log_params({"precision": policy})
        run.log_metrics(tracking.numeric_metrics(metrics))
        run.log_artifact(METRICS)
        run.log_artifact("plots/evaluate")
        run.set_headline(
            {"val_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_avg"]["f1"]}
        )


if __name__ == "__main__":
    run_stage(main, "evaluate", tensorflow=True)
