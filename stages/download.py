"""DVC stage `download`: params data.* -> data/raw/<class folder>/ (+ data/raw.source.json)."""

from animalcam import tracking
from animalcam.download import download_dataset
from animalcam.params import load_params
from animalcam.stage import run_stage


def main() -> None:
    params = load_params()
    with tracking.stage_run("download", params) as run:
        # The stamp records which source built data/raw, so that an unchanged source is
        # not unpacked (or downloaded) again when dvc.yaml re-checks it on every run.
        raw = download_dataset(params.data, "data/raw", stamp="data/raw.source.json")
        run.log_metrics(
            {
                "files": raw.files,
                "bytes": raw.bytes,
                "reused": int(raw.reused),
                "skipped": len(raw.skipped),  # listed with reasons in the stamp
            }
        )


if __name__ == "__main__":
    run_stage(main, "download")
