"""`animalcam predict`: files, folders and globs in; one CSV row per file out, as it goes.

The model is the colour model of test_serving (red images are "cat", blue ones "dog", by
hand-set weights), or a numpy stand-in with the same rule where only the pipeline is
under test. Every model form predict loads is covered in test_model_runners.py.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from image_kinds import exif_rotated
from PIL import Image
from test_serving import BLUE, RED, save_color_model

from animalcam import cli, predict
from animalcam.errors import DataError, ModelError, SourceNotFoundError
from animalcam.images import resize_for_model
from animalcam.model_runners import ModelRunner

REPO_ROOT = Path(__file__).resolve().parents[1]


class ColourRunner(ModelRunner):
    """The colour model's rule in numpy: red -> cat, blue -> dog; counts its batches."""

    kind = "colour"
    source = "colour rule"
    class_names = ["cat", "dog"]  # noqa: RUF012
    image_size = 16

    def __init__(self, fail_at_batch: int | None = None, error=KeyboardInterrupt):
        self.batches = 0
        self.fail_at_batch = fail_at_batch
        self.error = error

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.batches += 1
        if self.batches == self.fail_at_batch:
            raise self.error()
        pixels = np.asarray(pixels, np.float32)
        red, blue = pixels[..., 0].mean(axis=(1, 2)), pixels[..., 2].mean(axis=(1, 2))
        logits = np.stack([red - blue, blue - red], axis=1) / 50
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def save(path: Path, color, size=(40, 24), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of red and blue photos in sub-folders, and four files that are no image."""
    root = tmp_path / "photos"
    save(root / "red.png", RED)
    save(root / "barn" / "blue.jpg", BLUE, fmt="JPEG")
    save(root / "barn" / "loft" / "red.bmp", RED)
    # A phone photo: stored sideways, upright once EXIF orientation 6 is applied.
    upright = np.zeros((24, 40, 3), np.uint8)
    upright[:] = BLUE
    (root / "phone.jpg").write_bytes(exif_rotated(upright, 6)[0])
    truncated_jpeg(root / "barn" / "cut.jpg")
    (root / "notes.jpg").write_text("not a picture")
    (root / "empty.png").write_bytes(b"")
    (root / "readme.txt").write_text("a stray file")
    save(root / ".hidden.png", RED)  # hidden: skipped by the folder walk
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == predict.CSV_COLUMNS
        return list(reader)


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    return stop.value.code


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    return save_color_model(tmp_path_factory.mktemp("predict") / "model.keras")


def test_folders_are_walked_recursively_in_name_order_skipping_hidden_files(photos):
    found = [os.path.relpath(p, photos) for p in predict.image_paths([str(photos)])]
    assert found == [
        "barn/blue.jpg",
        "barn/cut.jpg",
        "barn/loft/red.bmp",
        "empty.png",
        "notes.jpg",
        "phone.jpg",
        "readme.txt",
        "red.png",
    ]


def test_globs_files_and_folders_mix_in_argument_order(photos):
    args = [str(photos / "red.png"), str(photos / "**" / "*.bmp"), str(photos / "barn" / "loft")]
    found = [os.path.relpath(p, photos) for p in predict.image_paths(args)]
    assert found == ["red.png", "barn/loft/red.bmp", "barn/loft/red.bmp"]
    assert sorted(os.path.relpath(p, photos) for p in predict.image_paths([f"{photos}/*.png"])) == [
        "empty.png",
        "red.png",
    ]


def test_listing_is_lazy():
    # An endless source: listing everything first would never return.
    endless = predict.image_paths(f"img{i}.jpg" for i in itertools.count())
    assert list(itertools.islice(endless, 3)) == ["img0.jpg", "img1.jpg", "img2.jpg"]


def test_paths_that_name_nothing_stop_before_any_model_is_loaded(photos, tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"nope\.jpg does not exist .*glob"):
        predict.check_paths([str(photos), str(tmp_path / "nope.jpg")])
    with pytest.raises(SourceNotFoundError, match=r"\*\.gif does not exist"):
        predict.check_paths([str(photos / "*.gif")])
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="neither a file nor a folder"):
        predict.check_paths([str(fifo)])
    predict.check_paths([str(photos), str(photos / "*.png")])  # fine


def test_a_fifo_inside_a_folder_is_skipped_not_opened(tmp_path, no_hang):
    save(tmp_path / "a" / "red.png", RED)
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    assert [Path(p).name for p in predict.image_paths([str(tmp_path / "a")])] == ["red.png"]


def test_batches_hold_upright_pixels_and_the_reasons_of_bad_files(photos):
    files = [str(photos / name) for name in ("phone.jpg", "barn/cut.jpg", "notes.jpg", "red.png")]
    batches = list(predict.image_batches(iter(files), 16, batch_size=3))
    assert [len(names) for names, _, _ in batches] == [3, 1]
    names = [n.decode() for b in batches for n in b[0].numpy()]
    pixels = np.concatenate([b[1].numpy() for b in batches])
    reasons = [r.decode() for b in batches for r in b[2].numpy()]
    assert names == files
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 16, 16, 3)
    # EXIF orientation applied: the phone photo is blue everywhere, as a viewer shows it.
    np.testing.assert_allclose(pixels[0].mean(axis=(0, 1)), BLUE, atol=3)
    assert reasons[0] == "" and reasons[3] == ""
    assert reasons[1].startswith("truncated: ")
    assert reasons[2].startswith("not_an_image: ")
    assert not pixels[1].any() and not pixels[2].any()


def test_exif_rotation_changes_the_pixels_as_a_viewer_shows_them(tmp_path):
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    upright = np.asarray(Image.fromarray(coarse).resize((60, 40), Image.Resampling.BICUBIC))
    path = tmp_path / "turned.jpg"
    path.write_bytes(exif_rotated(upright, 6)[0])
    ((_, pixels, reasons),) = predict.image_batches(iter([str(path)]), 20, batch_size=4)
    expected = resize_for_model(upright, (20, 20)).astype(np.float32)
    assert reasons.numpy()[0] == b""
    assert np.abs(pixels.numpy()[0] - expected).mean() < 4
    sideways = resize_for_model(np.rot90(upright), (20, 20)).astype(np.float32)
    assert np.abs(pixels.numpy()[0] - sideways).mean() > 20


def test_top_k_lists_the_likeliest_classes_first():
    p = np.array([0.05, 0.91, 0.02, 0.02], np.float32)
    names = ["cat", "dog", "horse", "cow"]
    assert predict.top_k_text(p, names, 3) == "dog:0.9100;cat:0.0500;horse:0.0200"
    assert predict.top_k_text(p, names, 1) == "dog:0.9100"


def test_every_file_gets_a_row_and_bad_files_their_reason(photos, tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    summary = predict.predict_files(
        ColourRunner(), predict.image_paths([str(photos)]), out, top_k=5, batch_size=3
    )
    rows = {os.path.relpath(r["path"], photos): r for r in read_rows(out)}
    assert (summary.rows, summary.failed) == (8, 4)
    assert {name: r["label"] for name, r in rows.items() if not r["error"]} == {
        "barn/blue.jpg": "dog",
        "barn/loft/red.bmp": "cat",
        "phone.jpg": "dog",
        "red.png": "cat",
    }
    red = rows["red.png"]
    top = [pair.split(":") for pair in red["top_k"].split(";")]
    assert [name for name, _ in top] == ["cat", "dog"]  # k is capped at the classes
    assert float(top[0][1]) == pytest.approx(float(red["confidence"])) and float(top[0][1]) > 0.9
    assert sum(float(p) for _, p in top) == pytest.approx(1, abs=1e-3)
    reasons = {name: r["error"].split(":")[0] for name, r in rows.items() if r["error"]}
    assert reasons == {
        "barn/cut.jpg": "truncated",
        "notes.jpg": "not_an_image",
        "empty.png": "empty_file",
        "readme.txt": "not_an_image",
    }
    for name in reasons:
        assert rows[name]["label"] == rows[name]["confidence"] == rows[name]["top_k"] == ""


def test_bad_files_never_reach_the_model(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_text("x")
    (tmp_path / "in" / "b.jpg").write_text("y")
    save(tmp_path / "in" / "c.png", RED)
    runner = ColourRunner()
    summary = predict.predict_files(
        runner, predict.image_paths([str(tmp_path / "in")]), tmp_path / "p.csv", batch_size=2
    )
    assert runner.batches == 1  # batch [a, b] skipped the model; batch [c] ran it
    assert (summary.rows, summary.failed) == (3, 2)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_rows_of_finished_batches_are_on_disk_when_a_later_batch_fails(tmp_path, error, no_hang):
    for i in range(3):
        save(tmp_path / "in" / f"{i}.png", RED)
    # Endless input (the three files over and over): only streaming gets to batch 3.
    endless = itertools.cycle(sorted(str(p) for p in (tmp_path / "in").iterdir()))
    out = tmp_path / "p.csv"
    with pytest.raises(error):
        predict.predict_files(
            ColourRunner(fail_at_batch=3, error=error), endless, out, batch_size=2
        )
    rows = read_rows(out)
    assert len(rows) == 4  # two batches of two
    assert all(r["label"] == "cat" and not r["error"] for r in rows)


def test_cli_writes_the_csv_and_exits_1_when_a_file_failed(photos, tmp_path, colour_model, capsys):
    out = tmp_path / "predictions.csv"
    args = ["predict", str(photos), "--model", str(colour_model), "--output", str(out)]
    code = run_cli([*args, "--batch-size", "2", "--top-k", "1"])
    assert code == cli.EXIT_FAILED_ROWS == 1
    rows = read_rows(out)
    assert len(rows) == 8
    labelled = {Path(r["path"]).name: r["label"] for r in rows if not r["error"]}
    assert labelled == {"blue.jpg": "dog", "red.bmp": "cat", "phone.jpg": "dog", "red.png": "cat"}
    assert all(";" not in r["top_k"] for r in rows)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"animalcam predict: 4 of 8 files could not be used; see the error column of {out}"
    )


def test_cli_exits_0_when_every_file_was_predicted(tmp_path, colour_model):
    save(tmp_path / "in" / "a.png", BLUE)
    save(tmp_path / "in" / "b.png", RED)
    out = tmp_path / "p.csv"
    pattern = str(tmp_path / "in" / "*.png")
    assert run_cli(["predict", pattern, "--model", str(colour_model), "--output", str(out)]) == 0
    assert [(Path(r["path"]).name, r["label"]) for r in read_rows(out)] == [
        ("a.png", "dog"),
        ("b.png", "cat"),
    ]


def test_outputs_inside_the_predicted_folder_get_no_rows(tmp_path, colour_model):
    folder = tmp_path / "in"
    save(folder / "a.png", BLUE)
    save(folder / "b.png", RED)
    save(folder / "panels" / "old.png", RED)  # a panel of an earlier run
    out = folder / "p.csv"
    args = ["predict", str(folder), "--model", str(colour_model), "--output", str(out)]
    assert run_cli([*args, "--gradcam", str(folder / "panels"), "--batch-size", "1"]) == 0
    assert [Path(r["path"]).name for r in read_rows(out)] == ["a.png", "b.png"]


def test_cli_interrupted_keeps_the_rows_written_so_far(tmp_path, colour_model, monkeypatch, capsys):
    from animalcam.model_runners import KerasRunner

    for i in range(5):
        save(tmp_path / "in" / f"{i}.png", RED)
    calls = []
    real_predict = KerasRunner.predict

    def predict_then_interrupt(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_predict(self, pixels)

    monkeypatch.setattr(KerasRunner, "predict", predict_then_interrupt)
    out = tmp_path / "p.csv"
    args = ["predict", str(tmp_path / "in"), "--model", str(colour_model), "--output", str(out)]
    assert run_cli([*args, "--batch-size", "2"]) == 130
    assert [Path(r["path"]).name for r in read_rows(out)] == ["0.png", "1.png", "2.png", "3.png"]
    assert capsys.readouterr().err.strip().endswith("animalcam predict: interrupted")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{photos}", "--model", "{tmp}/missing.keras"], r"model .*missing\.keras does not exist"),
        (["{tmp}/nothing/*.jpg"], r"nothing/\*\.jpg does not exist"),
        (["{tmp}/empty_folder"], r"no files found in .*empty_folder"),
        (["{photos}", "--model", "{photos}/red.png"], r"red\.png is not a model file"),
        (["{photos}", "--model", "{tmp}/mystery"], r"neither a SavedModel .* nor an MLflow"),
        (["{photos}", "--output", "{tmp}"], r"cannot write the CSV .* \(Is a directory\)"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    photos, tmp_path, colour_model, args, message, capsys
):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "mystery").mkdir()
    args = [a.format(photos=photos, tmp=tmp_path, model=colour_model) for a in args]
    out = tmp_path / "p.csv"
    assert run_cli(["predict", "--model", str(colour_model), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("animalcam predict: error: ")  # no traceback
    assert re.search(message, err[0]), err[0]
    assert not out.exists()  # stopped before the CSV


@pytest.mark.parametrize("option", [["--top-k", "0"], ["--batch-size", "-3"]])
def test_bad_numbers_are_refused_by_the_parser(photos, option, capsys):
    assert run_cli(["predict", str(photos), *option]) == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err


def test_gradcam_writes_one_panel_per_usable_image(photos, tmp_path, colour_model):
    panels = tmp_path / "panels"
    out = tmp_path / "p.csv"
    args = ["predict", str(photos), "--model", str(colour_model), "--output", str(out)]
    assert run_cli([*args, "--gradcam", str(panels), "--batch-size", "3"]) == 1
    rows = read_rows(out)
    expected = {
        predict.panel_name(i, r["path"]) for i, r in enumerate(rows, start=1) if not r["error"]
    }
    assert {p.name for p in panels.iterdir()} == expected
    assert "000008_red.png" in expected and "000003_red.png" in expected  # two red files
    with Image.open(panels / "000008_red.png") as panel:
        assert panel.format == "PNG"
        width, height = panel.size
    assert width > 2 * height  # photo, heatmap and overlay side by side


def test_gradcam_needs_a_keras_model(photos, tmp_path):
    with pytest.raises(ModelError, match=r"--gradcam needs a Keras model .* colour model"):
        predict.predict_files(
            ColourRunner(), predict.image_paths([str(photos)]), tmp_path / "p.csv", gradcam_dir="x"
        )


def test_panel_names_are_safe_and_follow_the_row_order():
    assert predict.panel_name(42, "/a/b/IMG 1234.JPG") == "000042_IMG-1234.png"
    assert predict.panel_name(1, "/a/..jpg") == "000001_image.png"


def test_python_m_animalcam_predict_in_a_fresh_process(tmp_path, colour_model):
    """A fresh interpreter: the .keras file loads (our loader imports the custom layers)
    and the CSV can go to standard output."""
    save(tmp_path / "in" / "a.png", RED)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["predict", str(tmp_path / "in"), "--model", str(colour_model), "--output", "-"]
    result = subprocess.run(
        [sys.executable, "-m", "animalcam", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(Path(r["path"]).name, r["label"]) for r in rows] == [("a.png", "cat")]
    assert "Traceback" not in result.stderr
