"""DVC stage `images`: data/prepared (+ data/raw) -> data/images/, each image decoded and
resized once, for train and evaluate to read instead of the original files."""

from animalcam import tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

IMAGES = "data/images"


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    from animalcam.image_cache import build_cache

    params = load_params()
    with tracking.stage_run("images", params) as run:
        counts = build_cache(
            "data/prepared", IMAGES, image_size=params.train.image_size, params=params.images
        )
        run.log_metrics(counts)


if __name__ == "__main__":
    run_stage(main, "images", tensorflow=True)
