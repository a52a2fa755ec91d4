"""Metrics of the evaluate stage, checked against scikit-learn and small hand-made cases,
and the evaluate stage's figures (confusion matrix, galleries) as real PNG files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from animalcam.errors import DataError, ModelError
from animalcam.evaluation import (
    PREDICTIONS_HEADER,
    calibration_table,
    classification_metrics,
    classification_report_text,
    confusion_counts,
    expected_calibration_error,
    most_confused,
    predict_probabilities,
    prediction_rows,
    top_k_accuracy,
    write_evaluation,
)
from animalcam.figures import CELL_PX, TITLE_PX, confusion_matrix_png, gallery_png
from animalcam.outputs import read_csv
from animalcam.params import params_from_dict

CLASSES = ["butterfly", "cat", "chicken", "cow", "dog"]


def random_predictions(n: int = 200, n_classes: int = 5, seed: int = 0):
    """Labels and softmax rows that are right about 60% of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p.astype(np.float32)


def without_intervals(row: dict) -> dict:
    """``row`` without its ``*_ci95`` keys (tests/test_intervals.py checks those)."""
    return {k: v for k, v in row.items() if not k.endswith("_ci95")}


def one_hot_probabilities(predicted, n_classes, confidence=1.0):
    rest = (1 - confidence) / (n_classes - 1)
    p = np.full((len(predicted), n_classes), rest)
    p[np.arange(len(predicted)), predicted] = confidence
    return p


def test_metrics_equal_scikit_learn():
    y, p = random_predictions()
    m = classification_metrics(y, p, CLASSES, top_k=2, calibration_bins=10)
    labels = list(range(len(CLASSES)))
    y_pred = p.argmax(axis=1)
    assert m["accuracy"] == round(accuracy_score(y, y_pred), 4)
    assert m["top_k_accuracy"] == round(top_k_accuracy_score(y, p, k=2, labels=labels), 4)
    assert m["log_loss"] == round(log_loss(y, p / p.sum(1, keepdims=True), labels=labels), 4)
    for average in ("macro", "weighted"):
        prf = precision_recall_fscore_support(y, y_pred, average=average, zero_division=0)
        assert [m[f"{average}_avg"][k] for k in ("precision", "recall", "f1")] == [
            round(v, 4) for v in prf[:3]
        ]
    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, zero_division=0)
    for i, name in enumerate(CLASSES):
        assert without_intervals(m["per_class"][name]) == {
            "precision": round(precision[i], 4),
            "recall": round(recall[i], 4),
            "f1": round(f1[i], 4),
            "support": int(support[i]),
        }
    assert m["n_samples"] == 200
    json.dumps(m)  # plain Python types only, as metrics/evaluate.json needs


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 4, 4, 3])
    m = classification_metrics(y, one_hot_probabilities(y, 5), CLASSES, top_k=3)
    assert m["accuracy"] == m["top_k_accuracy"] == 1.0
    # Resampled class by class, perfect predictions stay perfect: intervals [1, 1].
    perfect = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "f1_ci95": [1.0, 1.0]}
    assert m["macro_avg"] == m["weighted_avg"] == perfect
    assert m["per_class"]["dog"] == {
        "precision": 1.0,
        "precision_ci95": [1.0, 1.0],
        "recall": 1.0,
        "recall_ci95": [1.0, 1.0],
        "f1": 1.0,
        "support": 2,
    }
    assert m["accuracy_ci95"] == [1.0, 1.0]
    assert m["ci95"]["accuracy"] == m["ci95"]["macro_f1"] == {"low": 1.0, "high": 1.0}
    assert m["log_loss"] == 0.0
    assert m["ece"] == 0.0
    assert m["most_confused"] == []


def test_class_absent_from_validation_keeps_its_row():
    # "cow" (3) never appears and is never predicted: zero row, no warnings, no shift.
    y = np.array([0, 1, 2, 4, 4])
    pred = np.array([0, 1, 2, 4, 0])
    m = classification_metrics(y, one_hot_probabilities(pred, 5, 0.8), CLASSES)
    assert list(m["per_class"]) == CLASSES
    assert without_intervals(m["per_class"]["cow"]) == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    # Never present, never predicted: 0 in every resample too (zero_division=0).
    cow = m["per_class"]["cow"]
    assert cow["precision_ci95"] == cow["recall_ci95"] == [0.0, 0.0]
    assert m["per_class"]["butterfly"]["precision"] == 0.5


def test_ece_of_perfectly_calibrated_predictions_is_zero():
    # Confidence 0.8 everywhere and right on exactly 8 of 10: calibrated.
    y = np.array([0] * 8 + [1] * 2)
    p = np.tile([0.8, 0.1, 0.1], (10, 1))
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0)
    # Same confidence, right on 5 of 10: overconfident by 0.3.
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.3)


def test_ece_bins_are_weighted_by_count():
    # Bin (0.5, 0.6]: 2 samples, conf 0.6, accuracy 0.5; bin (0.9, 1.0]: 2, conf 1.0, acc 1.
    p = np.array([[0.6, 0.4], [0.6, 0.4], [1.0, 0.0], [1.0, 0.0]])
    y = np.array([0, 1, 0, 0])
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.5 * 0.1)
    table = calibration_table(y, p, n_bins=10)
    assert table == [
        {"bin_upper": 0.6, "confidence": 0.6, "accuracy": 0.5, "count": 2},
        {"bin_upper": 1.0, "confidence": 1.0, "accuracy": 1.0, "count": 2},
    ]


def test_most_confused_pairs():
    y = np.array([4, 4, 4, 1, 1, 0, 2])
    pred = np.array([1, 1, 1, 4, 4, 2, 2])  # dog->cat x3, cat->dog x2, butterfly->chicken
    assert most_confused(y, pred, CLASSES, n=2) == [
        {"actual": "dog", "predicted": "cat", "count": 3},
        {"actual": "cat", "predicted": "dog", "count": 2},
    ]
    # Ties (count 1) would be ordered by class index; never the diagonal.
    assert len(most_confused(y, pred, CLASSES, n=10)) == 3


def test_top_k_edge_cases():
    y = np.array([0, 1, 1])
    p = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert top_k_accuracy(y, p, k=1) == pytest.approx(2 / 3)  # two classes: 1-D scores
    assert top_k_accuracy(y, p, k=2) == 1.0  # k >= classes: every class is in the top k


def test_report_lists_every_class_once_in_index_order():
    y, p = random_predictions(n=50)
    report = classification_report_text(y, p, CLASSES)
    lines = [line.split()[0] for line in report.splitlines() if line.strip()]
    assert [w for w in lines if w in CLASSES] == CLASSES


def test_confusion_counts_and_prediction_rows():
    y = np.array([0, 1, 1])
    p = np.array([[0.9, 0.1, 0.0], [0.3, 0.6, 0.1], [0.55557, 0.4, 0.04443]])
    names = ["cat", "dog", "horse"]
    assert confusion_counts(y, p.argmax(1), 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    rows = prediction_rows(["a.jpg", "b.jpg", "c.jpg"], y, p, names)
    assert PREDICTIONS_HEADER == ("path", "actual", "predicted", "confidence")
    assert rows == [
        ("a.jpg", "cat", "cat", 0.9),
        ("b.jpg", "dog", "dog", 0.6),
        ("c.jpg", "dog", "cat", 0.5556),
    ]


def test_bad_inputs_say_what_is_wrong():
    y, p = random_predictions(n=10)
    with pytest.raises(ModelError, match="10 samples and 4 classes"):
        classification_metrics(y, p, CLASSES[:4])
    with pytest.raises(DataError, match="class indices"):
        classification_metrics(y + 5, p, CLASSES)
    with pytest.raises(DataError, match="non-empty"):
        classification_metrics([], np.zeros((0, 5)), CLASSES)
    with pytest.raises(DataError, match="pair up"):
        prediction_rows(["a.jpg"], y, p, CLASSES)


class FakeModel:
    """Records the batches it is asked to predict on."""

    def __init__(self):
        self.batches = []

    def predict_on_batch(self, images):
        self.batches.append(len(images))
        return np.tile([0.25, 0.75], (len(images), 1))


def test_predict_probabilities_takes_batches_or_image_label_pairs():
    model = FakeModel()
    batches = [(np.zeros((4, 8, 8, 3)), np.zeros(4)), np.zeros((2, 8, 8, 3))]
    p = predict_probabilities(model, batches)
    assert p.shape == (6, 2) and p.dtype == np.float32
    assert model.batches == [4, 2]  # one call per batch
    with pytest.raises(DataError):
        predict_probabilities(model, [])


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def test_confusion_matrix_png_for_ten_classes():
    names = [f"class{i}" for i in range(10)]
    y, p = random_predictions(n=300, n_classes=10)
    data = confusion_matrix_png(confusion_counts(y, p.argmax(1), 10), names)
    width, height = png_size(data)
    assert width >= 900 and height >= 800  # room for ten labelled rows and columns


def test_gallery_png_has_exact_size_and_handles_empty():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (30 + 5 * i, 40, 3), dtype=np.uint8) for i in range(5)]
    rows = [
        {"actual": "cat", "predicted": "cat" if i % 2 else "dog", "confidence": "0.9"}
        for i in range(5)
    ]
    # 5 images -> 4 columns, 2 rows; a heading adds 40 px.
    assert png_size(gallery_png(images, rows, heading="x")) == (
        4 * CELL_PX,
        2 * (CELL_PX + TITLE_PX) + 40,
    )
    assert png_size(gallery_png([], [])) == (CELL_PX, CELL_PX + TITLE_PX)


def test_write_evaluation_writes_every_file(tmp_path):
    names = ["cat", "dog", "horse"]
    paths = []
    for i in range(6):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    y = np.array([0, 0, 1, 1, 2, 2])
    p = one_hot_probabilities([0, 1, 1, 1, 2, 0], 3, confidence=0.8)
    params = params_from_dict({"evaluate": {"gallery_size": 2, "top_k": 2}}).evaluate
    out = tmp_path / "plots" / "evaluate"
    metrics = write_evaluation(paths, y, p, names, params, out)

    assert metrics["accuracy"] == round(4 / 6, 4) and metrics["top_k"] == 2
    assert sorted(f.name for f in out.iterdir()) == [
        "calibration.csv",
        "classification_report.txt",
        "confusion.png",
        "correct.png",
        "incorrect.png",
        "predictions.csv",
    ]
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == list(PREDICTIONS_HEADER)
    assert [(r["actual"], r["predicted"]) for r in rows[:2]] == [("cat", "cat"), ("cat", "dog")]
    assert read_csv(out / "calibration.csv") == [
        {"bin_upper": "0.8", "confidence": "0.8", "accuracy": "0.6667", "count": "6"}
    ]
    # Galleries: 2 correct (one cat, one dog: spread over classes), the 2 mistakes.
    assert png_size((out / "correct.png").read_bytes())[0] == 2 * CELL_PX
    assert png_size((out / "incorrect.png").read_bytes())[0] == 2 * CELL_PX
