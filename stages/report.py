"""DVC stage `report`: every output of the run -> reports/report.html, the reference
study's sections regenerated from this run, one self-contained page."""

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage
from animalcam.tracking_secrets import public_uri

REPORT = "reports/report.html"


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam import report

    params = load_params()
    # Joins the pipeline run of the model it reports on, as evaluate and explain do.
    with tracking.stage_run("report", params, model_run_file=tracking.MODEL_RUN_FILE) as run:
        page = report.build_report(
            ".",
            params,
            tracking_run={
                "run_id": run.run_id,
                "parent_run_id": run.parent_run_id,
                "experiment_id": run.experiment_id,
                "tracking_uri": public_uri(run.tracking_uri),
            },
        )
        outputs.write_text(REPORT, page)
        run.log_artifact(REPORT)


if __name__ == "__main__":
    run_stage(main, "report", tensorflow=True)
