"""DVC stage `export`: models/model.keras -> models/export/ (SavedModel, LiteRT float16 and
int8, ONNX) and metrics/export.json (their parity with the Keras model on validation)."""

from pathlib import Path

from animalcam import outputs, tracking
from animalcam.params import load_params
from animalcam.stage import run_stage

MODEL = "models/model.keras"
EXPORT_DIR = "models/export"
METRICS = "metrics/export.json"
PARITY_TABLE = "parity.md"  # inside EXPORT_DIR


def main() -> None:
    # TensorFlow is started by run_stage first, with its start-up chatter captured.
    import numpy as np

    from animalcam import dataset, export, export_parity, image_cache, model_runners, modeling

    params = load_params()
    with tracking.stage_run("export", params, model_run_file=tracking.MODEL_RUN_FILE) as run:
        model = modeling.load_model(MODEL)
        names, size = modeling.class_names(model), modeling.image_size(model)
        train = dataset.read_manifest("data/prepared/train.csv", names)
        val = dataset.read_manifest("data/prepared/val.csv", names)
        representative = export.representative_images(
            train.paths, params.export.representative_images, params.export.seed, size
        )
        # Built under a temporary name: a form under its bar leaves the last export as it was.
        with outputs.replace_directory(EXPORT_DIR) as folder:
            paths = export.export_all(model, folder, representative)
            forms = [
                export_parity.Form(
                    "keras",
                    model_runners.KerasRunner(model, MODEL).predict,
                    export.file_bytes(Path(MODEL)),
                )
            ]
            forms += [
                export_parity.Form(
                    name, model_runners.open_model(path).predict, export.file_bytes(path)
                )
                for name, path in paths.items()
            ]
            # The images stage's output when it fits the model (size, split), else the files.
            examples = image_cache.image_examples("data/images", "val", val, size)
            table = export_parity.measure_parity(
                forms, export_parity.pixel_batches(examples), np.asarray(val.labels)
            )
            metrics = {
                "val_images": len(val),
                "representative_images": min(len(train), params.export.representative_images),
                **table,
            }
            outputs.write_json(METRICS, metrics)
            outputs.write_text(folder / PARITY_TABLE, export_parity.parity_table(table, len(val)))
            run.log_metrics(tracking.numeric_metrics(metrics))
            run.log_artifact(METRICS)
            misses = export_parity.parity_misses(table, params.export)
            if misses:
                raise export_parity.ParityError(
                    f"exported model(s) under their bar: {'; '.join(misses)}; the parity "
                    f"table is in {METRICS}, the previous {EXPORT_DIR} was kept."
                )
        run.log_artifact(EXPORT_DIR)
        run.set_headline({f"{form}_agreement": table[form]["agreement"] for form in paths})


if __name__ == "__main__":
    run_stage(main, "export", tensorflow=True)
