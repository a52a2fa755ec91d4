"""The ``animalcam`` command: ``animalcam predict PATH...``, ``animalcam compare A B``
(``python -m animalcam`` too).

One subcommand per use of a trained model (argparse subparsers). Errors follow the
stages' rule (:func:`animalcam.stage.run_stage`): one line on stderr, no traceback
unless ``ANIMALCAM_DEBUG=1``.

Exit codes of ``predict``: 0 every file predicted; 1 the run finished but some files
could not be used (their reasons are in the CSV's ``error`` column); 2 nothing or not all
was predicted because of the arguments, the model or the data (bad option, missing
model, no files found); 130 interrupted (Ctrl-C), 128 + N stopped by signal N. Rows
written before an interruption stay in the CSV.

Exit codes of ``compare``: 0 the report was printed (whatever its verdict); 2 bad
arguments, or A or B not found or not comparable (other images, other labels).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Sequence

from animalcam.errors import DataError
from animalcam.params import (
    MAX_BOOTSTRAP_RESAMPLES,
    MAX_SEED,
    MIN_BOOTSTRAP_RESAMPLES,
    PRECISION_SETTINGS,
    EvaluateParams,
)
from animalcam.stage import run_stage

log = logging.getLogger(__name__)

# What the train stage writes (stages/train.py), the model `dvc repro` leaves behind.
DEFAULT_MODEL = "models/model.keras"
EXIT_FAILED_ROWS = 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _int_in(low: int, high: int):
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a whole number in [{low}, {high}], got {text!r}"
            )
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from animalcam import predict  # no TensorFlow: `--help` stays instant

    parser = argparse.ArgumentParser(
        prog="animalcam", description="Use a trained animalcam classifier."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "predict",
        help="predict image files, folders or globs into a CSV",
        description=(
            "Predict the class of every image named by PATH (files, folders walked "
            "recursively, globs) and write one CSV row per file: "
            + ",".join(predict.CSV_COLUMNS)
            + ". Exit code 0: all predicted; 1: some files could not be used (see the "
            "error column); 2: bad arguments, model or no files."
        ),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="M",
        help=(
            f"a .keras file (default: {DEFAULT_MODEL}), an MLflow model URI "
            "(models:/animalcam-classifier/3, runs:/<run id>/model), a SavedModel folder, "
            "a .tflite file (LiteRT) or a .onnx file"
        ),
    )
    p.add_argument(
        "--output",
        default="predictions.csv",
        metavar="CSV",
        help="where the rows go (default: predictions.csv; '-' for standard output)",
    )
    p.add_argument(
        "--top-k",
        type=_positive_int,
        default=predict.DEFAULT_TOP_K,
        metavar="K",
        help=f"classes listed in the top_k column (default: {predict.DEFAULT_TOP_K})",
    )
    p.add_argument(
        "--gradcam",
        metavar="DIR",
        help="also write one Grad-CAM panel per image into DIR (Keras models only)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=predict.DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images per batch (default: {predict.DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_SETTINGS,
        default="off",
        help=(
            "Keras models: 'off' computes in float32 as saved (default; the labels every "
            "exported float format gives); 'auto' uses bfloat16 on a CPU that has it "
            "(about twice as fast; a near tie may flip) or float16 on a GPU"
        ),
    )
    p.set_defaults(handler=run_predict, tensorflow=True)

    source = (
        "a predictions.csv of the evaluate stage (or a folder holding one), an MLflow run "
        "id (an evaluate-stage run or its pipeline run), a DVC experiment's name (its "
        "evaluate run) or an MLflow experiment name (its latest finished evaluate-stage run)"
    )
    c = commands.add_parser(
        "compare",
        help="is B's accuracy really different from A's? (paired test on the same images)",
        description=(
            "Compare two evaluated models on the same images: accuracy of each, B - A "
            "with a paired bootstrap 95% interval, McNemar's exact p-value and a verdict. "
            "Exit code 0: report printed; 2: bad arguments, A or B not found or not on "
            "the same images."
        ),
    )
    c.add_argument("a", metavar="A", help=source)
    c.add_argument("b", metavar="B", help="the same for the model compared with A")
    defaults = EvaluateParams()  # as the intervals in metrics/evaluate.json
    c.add_argument(
        "--resamples",
        type=_int_in(MIN_BOOTSTRAP_RESAMPLES, MAX_BOOTSTRAP_RESAMPLES),
        default=defaults.bootstrap_resamples,
        metavar="N",
        help=f"bootstrap resamples (default: {defaults.bootstrap_resamples})",
    )
    c.add_argument(
        "--seed",
        type=_int_in(0, MAX_SEED),
        default=defaults.bootstrap_seed,
        metavar="S",
        help=f"seed of the resamples (default: {defaults.bootstrap_seed})",
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(handler=run_compare, tensorflow=False)
    return parser


def run_predict(args: argparse.Namespace) -> None:
    """``animalcam predict``: load the model, stream the files, write the CSV."""
    from animalcam import predict
    from animalcam.model_runners import open_model

    predict.check_paths(args.paths)
    paths = predict.without_outputs(predict.image_paths(args.paths), args.output, args.gradcam)
    first = next(paths, None)
    if first is None:
        raise DataError(f"no files found in {' '.join(args.paths)}.")
    runner = open_model(args.model, precision=args.precision)
    log.info("predicting with %s", runner.describe())
    summary = predict.predict_files(
        runner,
        itertools.chain([first], paths),
        args.output,
        top_k=args.top_k,
        batch_size=args.batch_size,
        gradcam_dir=args.gradcam,
    )
    where = "standard output" if args.output == predict.STDOUT else args.output
    log.info(
        "%d rows in %s (%d could not be used) in %.1f s, %.1f images/s%s",
        summary.rows,
        where,
        summary.failed,
        summary.seconds,
        summary.rows / max(summary.seconds, 1e-9),
        f"; Grad-CAM panels in {args.gradcam}" if args.gradcam else "",
    )
    if summary.failed:
        print(
            f"animalcam predict: {summary.failed} of {summary.rows} files could not be used; "
            f"see the error column of {where}",
            file=sys.stderr,
        )
        sys.exit(EXIT_FAILED_ROWS)


def run_compare(args: argparse.Namespace) -> None:
    """``animalcam compare``: read A and B, compare them, print the report."""
    import json

    from animalcam import comparison
    from animalcam.prediction_sources import load_predictions

    a, b = load_predictions(args.a), load_predictions(args.b)
    result = comparison.compare_predictions(a, b, n_resamples=args.resamples, seed=args.seed)
    if args.json:
        print(json.dumps(comparison.comparison_dict(result), indent=2))
    else:
        print(comparison.format_comparison(result))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``animalcam`` console script; never returns."""
    args = build_parser().parse_args(argv)
    run_stage(lambda: args.handler(args), args.command, tensorflow=args.tensorflow)
