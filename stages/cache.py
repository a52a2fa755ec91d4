"""DVC stage `cache`: data/prepared (+ data/raw) -> data/cache/, images decoded once."""

from animalcam import tracking
from animalcam.params import load_params
from animalcam.stage import run_stage


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam.image_cache import build_cache

    params = load_params()
    with tracking.stage_run("cache", params, sections=("cache",), data_path="data/prepared") as run:
        counts = build_cache(
            "data/prepared", "data/cache", image_size=params.train.image_size, params=params.cache
        )
        run.log_metrics(counts)


if __name__ == "__main__":
    run_stage(main, "cache", tensorflow=True)
