"""DVC stage `explain`: model + predictions -> plots/gradcam/, metrics/explain.json."""

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

METRICS = "metrics/explain.json"


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam import explanation, modeling, precision

    params = load_params()
    with tracking.stage_run("explain", params, model_run_file=tracking.MODEL_RUN_FILE) as run:
        model = modeling.load_model("models/model.keras")
        policy = precision.resolve_policy(params.explain.mixed_precision, "explain.mixed_precision")
        model = precision.inference_model(model, policy)  # this machine's fastest
        rows = outputs.read_csv("plots/evaluate/predictions.csv")
        metrics = explanation.explain_predictions(
            model,
            rows,
            modeling.class_names(model),
            params.explain,
            "plots/gradcam",
            seed=params.explain.seed,
            speed=params.speed,
        )
        metrics["precision"] = policy
        outputs.write_json(METRICS, metrics)
        run.log_params({"precision": policy})
        run.log_metrics(tracking.numeric_metrics(metrics))
        run.log_artifact(METRICS)
        run.log_artifact("plots/gradcam")
        check = metrics["faithfulness"]
        run.set_headline(
            {"faithfulness": check["gradcam_drop"], "faithfulness_ratio": check["ratio"]}
        )


if __name__ == "__main__":
    run_stage(main, "explain", tensorflow=True)
