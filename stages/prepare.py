"""DVC stage `prepare`: data/raw -> data/prepared/{train,val,rejected}.csv, classes.json."""

from animalcam import outputs
from animalcam.params import load_params
from animalcam.prepare import (
    CLASS_DISTRIBUTION_COLUMNS,
    class_distribution_rows,
    data_metrics,
    prepare_dataset,
)
from animalcam.stage import run_stage


def main() -> None:
    params = load_params()
    result = prepare_dataset("data/raw", "data/prepared", params.prepare)
    outputs.write_json("metrics/data.json", data_metrics(result))
    outputs.write_csv(
        "plots/prepare/class_distribution.csv",
        CLASS_DISTRIBUTION_COLUMNS,
        class_distribution_rows(result),
    )


if __name__ == "__main__":
    run_stage(main, "prepare")
