"""DVC stage `prepare`: data/raw (+ data/exclude.txt, data/relabel.csv) ->
data/prepared/{train,val[,test],rejected}.csv, classes.json."""

from animalcam import outputs, tracking
from animalcam.label_corrections import EXCLUDE_FILE, RELABEL_FILE, read_corrections
from animalcam.params import load_params
from animalcam.prepare import (
    class_distribution_columns,
    class_distribution_rows,
    data_metrics,
    prepare_dataset,
)
from animalcam.stage import run_stage

METRICS = "metrics/data.json"
DISTRIBUTION = "plots/prepare/class_distribution.csv"


def main() -> None:
    params = load_params()
    with tracking.stage_run("prepare", params) as run:
        corrections = read_corrections(EXCLUDE_FILE, RELABEL_FILE, params.prepare.class_set)
        result = prepare_dataset(
            "data/raw", "data/prepared", params.prepare, corrections=corrections
        )
        metrics = data_metrics(result)
        outputs.write_json(METRICS, metrics)
        outputs.write_csv(
            DISTRIBUTION, class_distribution_columns(result), class_distribution_rows(result)
        )
        run.log_metrics(tracking.numeric_metrics(metrics))
        for path in (
            METRICS,
            DISTRIBUTION,
            "data/prepared/classes.json",
            "data/prepared/rejected.csv",
        ):
            run.log_artifact(path)


if __name__ == "__main__":
    run_stage(main, "prepare")
