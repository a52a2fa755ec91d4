import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, blob_image, make_class_tree, save_image
from PIL import Image

from animalcam.errors import DataError, SourceNotFoundError
from animalcam.outputs import read_csv
from animalcam.params import PrepareParams
from animalcam.prepare import (
    class_distribution_columns,
    class_distribution_rows,
    data_metrics,
    prepare_dataset,
)

PARAMS = PrepareParams(min_side=16, min_per_class=4)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def add_awkward_files(raw: Path) -> None:
    """The kinds of file a scraped dataset holds, spread over the classes."""
    (raw / "cane" / "empty.jpg").write_bytes(b"")
    (raw / "cane" / "notes.txt").write_text("not an image")
    buffer = io.BytesIO()
    blob_image(77, (120, 100)).save(buffer, format="JPEG")
    (raw / "gatto" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    blob_image(78).convert("CMYK").save(raw / "mucca" / "cmyk.jpg")
    rgba = blob_image(79).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(raw / "pecora" / "alpha.png")
    save_image(raw / "ragno" / "tiny.png", seed=80, size=(8, 8))
    # An exact copy inside one class, and a resized near-copy in the same class.
    (raw / "cavallo" / "img_0_copy.jpg").write_bytes((raw / "cavallo" / "img_0.jpg").read_bytes())
    Image.open(raw / "elefante" / "img_1.jpg").resize((40, 35)).save(
        raw / "elefante" / "small_1.jpg"
    )
    # The same bytes filed under two classes: no label is right for it.
    (raw / "gallina" / "both.jpg").write_bytes((raw / "farfalla" / "img_2.jpg").read_bytes())
    (raw / "README.txt").write_text("stray file outside the class folders")


@pytest.fixture
def messy_raw(tmp_path):
    raw = tmp_path / "data" / "raw"
    make_class_tree(raw, per_class=8, size=(64, 56))
    add_awkward_files(raw)
    return raw


def test_prepare_cleans_groups_and_splits(messy_raw, tmp_path):
    before = snapshot(messy_raw)
    out = tmp_path / "data" / "prepared"
    result = prepare_dataset(messy_raw, out, PARAMS, workers=1)

    assert snapshot(messy_raw) == before  # sources only read
    assert json.loads((out / "classes.json").read_text()) == [
        "butterfly",
        "cat",
        "chicken",
        "cow",
        "dog",
        "elephant",
        "horse",
        "sheep",
        "spider",
        "squirrel",
    ]
    rejected = {Path(r["path"]).name: r["reason"] for r in read_csv(out / "rejected.csv")}
    assert rejected == {
        "empty.jpg": "empty_file",
        "notes.txt": "not_an_image",
        "truncated.jpg": "truncated",
        "tiny.png": "too_small",
        "img_0_copy.jpg": "duplicate",
        "both.jpg": "conflicting_labels",
        "img_2.jpg": "conflicting_labels",
        "README.txt": "not_in_class_folder",
    }

    train, val = read_csv(out / "train.csv"), read_csv(out / "val.csv")
    assert list(train[0]) == ["path", "label", "source", "group"]
    rows = train + val
    assert len({r["source"] for r in rows}) == len(rows)
    # 10 classes x 8, +CMYK, +alpha, +near copy, -copy_of_0's twin kept, -img_2 (conflict)
    assert len(rows) == 80 + 3 - 1
    by_name = {Path(r["source"]).name + r["label"]: r for r in rows}
    for name, label in (("cmyk.jpg", "cow"), ("alpha.png", "sheep")):
        row = by_name[name + label]
        # No converted copies: every stage reads the original with the same reader.
        assert row["path"] == row["source"] and Path(row["path"]).is_file()
    # The near-duplicate pair shares a group and a side of the split.
    pair = [
        r
        for r in rows
        if r["label"] == "elephant" and Path(r["source"]).name in ("img_1.jpg", "small_1.jpg")
    ]
    assert len(pair) == 2 and pair[0]["group"] == pair[1]["group"]
    assert (pair[0] in val) == (pair[1] in val)
    # Stratified: every class on both sides, about 15% validation.
    for label in result.classes:
        assert any(r["label"] == label for r in val) and any(r["label"] == label for r in train)
    assert 0.10 <= len(val) / len(rows) <= 0.2

    metrics = data_metrics(result)
    assert metrics["images"] == {"train": len(train), "val": len(val)}
    assert metrics["rejected"] == {
        "total": 8,
        "conflicting_labels": 2,
        "duplicate": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "not_in_class_folder": 1,
        "too_small": 1,
        "truncated": 1,
    }
    assert metrics["duplicates"]["exact_sets"] == 2
    assert metrics["duplicates"]["near_groups"] >= 1
    assert "converted_to_png" not in metrics
    assert sum(metrics["per_class"]["val"].values()) == len(val)


def test_same_data_and_params_give_the_same_bytes(messy_raw, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(messy_raw, out, PARAMS, workers=1)
    first = snapshot(out)
    prepare_dataset(messy_raw, out, PARAMS, workers=2)  # through the process pool
    assert snapshot(out) == first
    prepare_dataset(messy_raw, out, PrepareParams(min_side=16, min_per_class=4, seed=7), workers=1)
    assert snapshot(out)["val.csv"] != first["val.csv"]


def test_unknown_class_folder_is_an_error_unless_folders_are_accepted(tmp_path):
    raw = tmp_path / "raw"
    make_class_tree(raw, per_class=5, classes=("cane", "lupo"))
    with pytest.raises(
        DataError, match=r"lupo is not an Animals-10 class folder.*prepare.class_set: folders"
    ):
        prepare_dataset(raw, tmp_path / "out", PARAMS, workers=1)
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(
        raw,
        tmp_path / "out",
        PrepareParams(min_side=16, min_per_class=4, class_set="folders"),
        workers=1,
    )
    assert result.classes == ["cane", "lupo"]


def test_english_folder_names_are_accepted(tmp_path):
    raw = tmp_path / "raw"
    make_class_tree(raw, per_class=5, classes=("dog", "gatto"))
    assert prepare_dataset(raw, tmp_path / "out", PARAMS, workers=1).classes == ["cat", "dog"]


def test_too_few_usable_images_is_an_error_and_writes_nothing(tmp_path):
    raw = tmp_path / "raw"
    make_class_tree(raw, per_class=5, classes=("cane",))
    make_class_tree(raw, per_class=3, classes=("gatto",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous output")
    with pytest.raises(
        DataError, match=r"class 'cat' has 3 usable images, fewer than prepare.min_per_class=4"
    ):
        prepare_dataset(raw, tmp_path / "out", PARAMS, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temp dirs
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous output"


def test_empty_or_missing_source(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="holds no images in class folders"):
        prepare_dataset(tmp_path / "raw", tmp_path / "out", PARAMS)
    with pytest.raises(SourceNotFoundError, match="dvc repro download"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", PARAMS)


def test_stage_script_writes_outputs_and_fails_in_one_line(tmp_path):
    raw = tmp_path / "data" / "raw"
    make_class_tree(raw, per_class=6)
    (tmp_path / "params.yaml").write_text("prepare:\n  min_side: 16\n  min_per_class: 4\n")
    env = {**os.environ, "ANIMALCAM_LOG_LEVEL": "WARNING"}
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert metrics["images"] == {"train": 50, "val": 10}
    plot = (tmp_path / "plots" / "prepare" / "class_distribution.csv").read_text().splitlines()
    assert plot[0] == "class,train,val" and "butterfly,5,1" in plot and len(plot) == 11

    (tmp_path / "params.yaml").write_text("prepare:\n  val_split: 0.9\n")
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "animalcam prepare: error: params.yaml: prepare.val_split = 0.9 is not allowed; "
        "expected a fraction in (0, 0.5]."
    ]


def test_every_accepted_image_reads_the_same_in_every_later_stage(tmp_path):
    """Whatever prepare accepts, the tf.data reader (cache, train.input: files) gives
    exactly the pixels of the one reader: 16-bit BMPs, palettes, EXIF, CMYK, ..."""
    from image_kinds import bmp_16bit, kinds

    from animalcam.dataset import load_image
    from animalcam.images import model_pixels

    raw = tmp_path / "raw"
    make_class_tree(raw, per_class=5, classes=("cane", "gatto"))
    for kind in kinds():
        (raw / "gatto" / kind.name).write_bytes(kind.data)
    (raw / "cane" / "bmp16.bmp").write_bytes(bmp_16bit()[0])
    params = dataclasses.replace(PARAMS, min_side=8, near_duplicate_distance=0)
    prepare_dataset(raw, tmp_path / "out", params, workers=1)
    rejected = read_csv(tmp_path / "out" / "rejected.csv")
    assert [r for r in rejected if r["reason"] != "duplicate"] == []
    rows = read_csv(tmp_path / "out" / "train.csv") + read_csv(tmp_path / "out" / "val.csv")
    names = {Path(r["path"]).name for r in rows}
    assert "bmp16.bmp" in names and "exif6.jpg" in names and "palette.png" in names
    for row in rows:
        in_graph = load_image(row["path"], 24).numpy()
        assert np.array_equal(in_graph, model_pixels(row["path"], (24, 24)).astype(np.float32))


def test_a_test_split_is_a_third_disjoint_stratified_manifest(tmp_path):
    raw = tmp_path / "data" / "raw"
    make_class_tree(raw, per_class=20)
    out = tmp_path / "prepared"
    params = dataclasses.replace(PARAMS, test_split=0.15)
    result = prepare_dataset(raw, out, params, workers=1)

    splits = {name: read_csv(out / f"{name}.csv") for name in ("train", "val", "test")}
    paths = [{r["path"] for r in rows} for rows in splits.values()]
    assert sum(map(len, paths)) == len(set.union(*paths)) == 200  # disjoint, all there
    for name in ("val", "test"):
        assert Counter(r["label"] for r in splits[name]) == {c: 3 for c in result.classes}
    metrics = data_metrics(result)
    assert metrics["images"] == {"train": 140, "val": 30, "test": 30}
    assert class_distribution_columns(result) == ("class", "train", "val", "test")
    assert ("butterfly", 14, 3, 3) in class_distribution_rows(result)
    # Without it, only the two manifests of the study's split.
    prepare_dataset(raw, out, PARAMS, workers=1)
    assert sorted(p.name for p in out.glob("*.csv")) == ["rejected.csv", "train.csv", "val.csv"]


def corrections_project(tmp_path, exclude: str = "", relabel: str = "") -> Path:
    raw = tmp_path / "data" / "raw"
    make_class_tree(raw, per_class=6, classes=("cane", "gatto", "ragno"))
    (tmp_path / "params.yaml").write_text("prepare:\n  min_side: 16\n  min_per_class: 4\n")
    if exclude:
        (tmp_path / "data" / "exclude.txt").write_text(exclude)
    if relabel:
        (tmp_path / "data" / "relabel.csv").write_text(relabel)
    return tmp_path


def run_prepare_stage(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "prepare.py")],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "ANIMALCAM_LOG_LEVEL": "INFO", "MLFLOW_TRACKING_URI": ""},
        check=False,
    )


def test_confirmed_label_issues_are_dropped_or_relabelled_and_counted(tmp_path):
    root = corrections_project(
        tmp_path,
        exclude="# confirmed in the audit gallery\ndata/raw/cane/img_0.jpg\n\n"
        "./data/raw/gatto/img_1.jpg  # a basket, not a cat\ndata/raw/gone.jpg\n",
        relabel="path,label,score\ndata/raw/ragno/img_2.jpg,dog,0.9\n"
        "data/raw/cane/img_3.jpg,gatto,0.8\n",
    )
    raw_before = snapshot(root / "data" / "raw")
    run = run_prepare_stage(root)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "label corrections: dropped 2 image(s) listed in data/exclude.txt, relabelled 2 from "
        "data/relabel.csv" in run.stderr
    )
    assert "1 path(s) in data/exclude.txt / data/relabel.csv match no image" in run.stderr
    rows = read_csv(root / "data/prepared/train.csv") + read_csv(root / "data/prepared/val.csv")
    labels = {r["path"]: r["label"] for r in rows}
    assert "data/raw/cane/img_0.jpg" not in labels and "data/raw/gatto/img_1.jpg" not in labels
    assert labels["data/raw/ragno/img_2.jpg"] == "dog"
    assert labels["data/raw/cane/img_3.jpg"] == "cat"  # the folder name maps to English
    assert len(labels) == 16
    rejected = read_csv(root / "data/prepared/rejected.csv")
    assert {(r["path"], r["reason"]) for r in rejected} == {
        ("data/raw/cane/img_0.jpg", "excluded"),
        ("data/raw/gatto/img_1.jpg", "excluded"),
    }
    metrics = json.loads((root / "metrics/data.json").read_text())
    assert metrics["corrections"] == {"excluded": 2, "relabelled": 2}
    assert snapshot(root / "data" / "raw") == raw_before  # sources never touched


@pytest.mark.parametrize(
    ("exclude", "relabel", "message"),
    [
        (
            "",
            "path;label\ndata/raw/cane/img_0.jpg;cat\n",
            "animalcam prepare: error: data/relabel.csv must start with the header "
            "'path,label' (found 'path;label');",
        ),
        (
            "",
            "path,label\ndata/raw/cane/img_0.jpg,unicorn\n",
            "animalcam prepare: error: data/relabel.csv, line 2: 'unicorn' is not a class;",
        ),
        (
            "",
            "path,label\ndata/raw/cane/img_0.jpg,horse\n",
            "animalcam prepare: error: data/relabel.csv names the class 'horse', which is not "
            "in the data (classes: cat, dog, spider); fix the label.",
        ),
        (
            "data/raw/cane/img_0.jpg\n",
            "path,label\ndata/raw/cane/img_0.jpg,cat\n",
            "animalcam prepare: error: data/raw/cane/img_0.jpg is listed in both "
            "data/exclude.txt and data/relabel.csv",
        ),
    ],
)
def test_bad_correction_files_fail_in_one_line_and_keep_the_outputs(
    tmp_path, exclude, relabel, message
):
    root = corrections_project(tmp_path)
    assert run_prepare_stage(root).returncode == 0
    before = snapshot(root / "data" / "prepared")
    if exclude:
        (root / "data" / "exclude.txt").write_text(exclude)
    (root / "data" / "relabel.csv").write_text(relabel)
    run = run_prepare_stage(root)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    assert snapshot(root / "data" / "prepared") == before
