"""End to end: `dvc repro prepare` on an archive in the Kaggle layout, as a user runs it."""

import io
import json
import zipfile

import pytest
from archive_factory import TRANSLATE_PY, write_zip
from conftest import blob_image
from dvc_project import DvcProject
from PIL import Image

from animalcam.outputs import read_csv

CLASSES = ("cane", "gatto", "ragno")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def messy_kaggle_zip(path):
    """Eight good JPEGs a class, and the awkward files a scraped archive holds."""
    files = {"translate.py": TRANSLATE_PY.encode()}
    for c, name in enumerate(CLASSES):
        for i in range(8):
            files[f"raw-img/{name}/{i}.jpeg"] = encoded(blob_image(100 * c + i, (64, 48)), "JPEG")
    good = files["raw-img/cane/0.jpeg"]
    alpha = blob_image(901, (50, 50)).convert("RGBA")
    alpha.putalpha(100)
    files.update(
        {
            "raw-img/cane/copy.jpeg": good,  # exact duplicate
            "raw-img/cane/cmyk.jpg": encoded(blob_image(902, (60, 40)).convert("CMYK"), "JPEG"),
            "raw-img/gatto/alpha.png": encoded(alpha, "PNG"),
            "raw-img/gatto/cut.jpeg": encoded(blob_image(903, (200, 150)), "JPEG")[:2500],
            "raw-img/ragno/corrupt.jpeg": b"\xff\xd8\xff\xe0" + b"\x13" * 300,
            "raw-img/ragno/readme.jpeg": b"<html>not an image</html>",
        }
    )
    return write_zip(path, files)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-prepare")
    archive = messy_kaggle_zip(tmp / "animals10.zip")
    project = DvcProject.create(tmp / "repo")
    project.set_params(data={"source": str(archive)}, prepare={"min_side": 16, "min_per_class": 4})
    first = project.repro("prepare")
    return project, archive, first


def test_repro_prepare_writes_every_output(prepared):
    project, _, first = prepared
    root = project.root
    assert "Running stage 'download'" in first.stdout and "Running stage 'prepare'" in first.stdout
    assert sorted(p.name for p in (root / "data" / "raw").iterdir()) == list(CLASSES)
    assert not list(root.rglob("translate.py"))

    assert json.loads((root / "data/prepared/classes.json").read_text()) == ["cat", "dog", "spider"]
    rejected = {
        r["path"].rsplit("/", 1)[1]: r["reason"]
        for r in read_csv(root / "data/prepared/rejected.csv")
    }
    assert rejected == {
        "copy.jpeg": "duplicate",
        "cut.jpeg": "truncated",
        "corrupt.jpeg": "corrupt",
        "readme.jpeg": "not_an_image",
    }
    train = read_csv(root / "data/prepared/train.csv")
    val = read_csv(root / "data/prepared/val.csv")
    assert len(train) + len(val) == 3 * 8 + 2  # + CMYK + alpha, - duplicate
    assert {r["label"] for r in val} == {"cat", "dog", "spider"}
    for row in train + val:
        assert (root / row["path"]).is_file()
        assert row["source"].startswith("data/raw/")

    metrics = json.loads((root / "metrics/data.json").read_text())
    assert metrics["images"] == {"train": len(train), "val": len(val)}
    assert metrics["rejected"]["total"] == 4
    assert metrics["duplicates"]["exact_sets"] == 1
    assert (
        (root / "plots/prepare/class_distribution.csv").read_text().startswith("class,train,val\n")
    )


def test_second_repro_changes_nothing(prepared):
    project, _, _ = prepared
    before = {
        name: (project.root / name).read_bytes()
        for name in ("data/prepared/train.csv", "data/prepared/val.csv", "metrics/data.json")
    }
    again = project.repro("prepare")
    assert "Running stage 'prepare'" not in again.stdout
    assert "didn't change, skipping" in again.stdout
    assert json.loads(project.run("dvc", "status", "prepare", "--json").stdout) == {}
    for name, content in before.items():
        assert (project.root / name).read_bytes() == content


def test_dvc_reads_metrics_and_params(prepared):
    project, _, _ = prepared
    shown = project.run("dvc", "metrics", "show", "--json").stdout
    assert '"train": ' in shown and "rejected" in shown
    diff = project.run("dvc", "params", "diff", "--all").stdout
    assert "prepare.val_split" in diff


def test_zip_slip_archive_is_refused_and_leaves_nothing(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("raw-img/cane/0.jpeg", encoded(blob_image(1), "JPEG"))
        zf.writestr("raw-img/../../escaped.txt", "gotcha")
    project = DvcProject.create(tmp_path / "repo")
    project.set_params(data={"source": str(evil)})
    result = project.repro("prepare", check=False)
    assert result.returncode != 0
    errors = [
        line for line in result.stderr.splitlines() if line.startswith("animalcam download: error:")
    ]
    assert len(errors) == 1
    assert "climbs out of the target folder" in errors[0] and "nothing was written" in errors[0]
    # Only the label corrections that come with the repository (git), nothing written.
    assert sorted(p.name for p in (project.root / "data").iterdir()) == [
        "exclude.txt",
        "relabel.csv",
    ]
    assert not list(tmp_path.rglob("escaped.txt"))
