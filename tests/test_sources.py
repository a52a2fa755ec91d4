"""Folder sources that are not what they seem: links, special files, unreadable entries,
names that are not UTF-8. Each is skipped and listed with a reason (never followed out of
the source, never opened when special, never a traceback or a hang)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
from archive_factory import (
    expected_raw,
    jpeg_bytes,
    kaggle_files,
    left_in_data,
    one_error_line,
    read_tree,
    run_download_stage,
    write_folder,
)

from animalcam import download, folder_source, raw_data
from animalcam.errors import DataError
from animalcam.params import DataParams

STAMP = "data/raw.source.json"
SECRET = b"secret outside the source"


@pytest.fixture
def source(tmp_path) -> Path:
    """A folder in the Kaggle layout, and a secret file next to it (outside the source)."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return write_folder(tmp_path / "animals10", kaggle_files())


def fetch(folder: Path) -> raw_data.RawData:
    return download.download_dataset(DataParams(source=str(folder)), "data/raw", STAMP)


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Every entry under ``root`` as lstat shows it (links not followed), and file bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            content = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    content = f.read()
            found[path] = (info.st_mode, info.st_size, info.st_mtime_ns, content)
    return found


def stamp_skipped(work: Path) -> dict[str, str]:
    content = json.loads((work / STAMP).read_text())
    return {entry["path"]: entry["reason"] for entry in content["skipped"]}


def test_links_and_special_files_are_skipped_and_listed(work, tmp_path, source, no_hang, caplog):
    cane = source / "raw-img/cane"
    (cane / "outside.jpg").symlink_to(tmp_path / "secret.txt")
    (cane / "outside-dir").symlink_to(tmp_path, target_is_directory=True)
    (cane / "inside.jpg").symlink_to(source / "raw-img/gatto/0.jpg")
    (cane / "inside-dir").symlink_to(source / "raw-img/gatto", target_is_directory=True)
    (cane / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (cane / "loop.jpg").symlink_to(cane / "loop.jpg")
    os.mkfifo(cane / "fifo.jpg")
    (cane / "to-fifo.jpg").symlink_to(cane / "fifo.jpg")
    (cane / "device.jpg").symlink_to("/dev/zero")
    before = snapshot(source)

    with caplog.at_level(logging.WARNING, logger="animalcam"):
        raw = fetch(source)

    tree = read_tree(work / "data/raw")
    assert SECRET not in tree.values()
    assert tree["cane/inside.jpg"] == tree["gatto/0.jpg"]  # a link inside is copied
    assert set(tree) == set(expected_raw()) | {"cane/inside.jpg"}
    assert not any(p.is_symlink() for p in (work / "data/raw").rglob("*"))
    listed = {
        "raw-img/cane/outside.jpg": "link_outside_source",
        "raw-img/cane/outside-dir": "linked_folder",
        "raw-img/cane/inside-dir": "linked_folder",
        "raw-img/cane/dangling.jpg": "broken_link",
        "raw-img/cane/loop.jpg": "broken_link",
        "raw-img/cane/fifo.jpg": "special_file",
        "raw-img/cane/to-fifo.jpg": "special_file",
        "raw-img/cane/device.jpg": "link_outside_source",
    }
    assert stamp_skipped(work) == listed
    assert {(s.path, s.reason) for s in raw.skipped} == set(listed.items())
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert (
        "8 entries skipped (2 broken_link, 2 link_outside_source, 2 linked_folder, 2 special_file)"
        in message
    )
    assert f"all listed in {STAMP}" in message
    assert snapshot(source) == before  # read only


def test_socket_in_the_folder_is_skipped(work, source, no_hang, monkeypatch):
    monkeypatch.chdir(source / "raw-img/cane")  # AF_UNIX paths are short: bind relative
    server = socket.socket(socket.AF_UNIX)
    server.bind("s.jpg")
    monkeypatch.chdir(work)
    try:
        fetch(source)
    finally:
        server.close()
    assert stamp_skipped(work) == {"raw-img/cane/s.jpg": "special_file"}
    assert read_tree(work / "data/raw") == expected_raw()


def test_names_that_are_not_utf8_are_skipped(work, source):
    cane = os.fsencode(source / "raw-img/cane")
    with open(os.path.join(cane, b"caf\xe9.jpg"), "wb") as f:
        f.write(jpeg_bytes(7))
    os.mkdir(os.path.join(cane, b"sub\xff"))
    with open(os.path.join(cane, b"sub\xff", b"1.jpg"), "wb") as f:
        f.write(jpeg_bytes(8))

    fetch(source)

    assert read_tree(work / "data/raw") == expected_raw()
    assert stamp_skipped(work) == {
        "raw-img/cane/caf\\xe9.jpg": "name_not_utf8",
        "raw-img/cane/sub\\xff": "name_not_utf8",
    }


def test_unreadable_file_is_skipped(work, source, monkeypatch):
    real_open = folder_source._open_source

    def refuse(path):
        if path.name == "1.jpg" and path.parent.name == "gatto":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(folder_source, "_open_source", refuse)
    raw = fetch(source)
    assert "gatto/1.jpg" not in read_tree(work / "data/raw")
    assert raw.classes == {"cane": 2, "gatto": 1, "ragno": 2}
    assert stamp_skipped(work) == {"raw-img/gatto/1.jpg": "unreadable"}


def test_unreadable_folder_is_skipped(work, source, monkeypatch):
    real_scandir = os.scandir

    def refuse(path="."):
        if os.fspath(path).endswith("ragno"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    raw = fetch(source)
    assert sorted(raw.classes) == ["cane", "gatto"]
    assert stamp_skipped(work) == {"raw-img/ragno": "unreadable_folder"}


def test_class_folder_without_images_is_listed_and_warned(work, source, caplog):
    write_folder(source, {"raw-img/notes/readme.txt": b"no images"})
    with caplog.at_level(logging.WARNING, logger="animalcam"):
        fetch(source)
    assert sorted(os.listdir(work / "data/raw")) == ["cane", "gatto", "ragno"]
    assert stamp_skipped(work) == {"raw-img/notes/": "no_images"}
    assert "Skipping raw-img/notes/" in caplog.text and "holds no images" in caplog.text


def test_empty_class_folder_is_listed(work, source):
    (source / "raw-img/elefante/sub").mkdir(parents=True)
    fetch(source)
    assert stamp_skipped(work) == {"raw-img/elefante/": "no_images"}


def test_skips_are_repeated_when_data_raw_is_reused(work, tmp_path, source, caplog):
    (source / "raw-img/cane/outside.jpg").symlink_to(tmp_path / "secret.txt")
    fetch(source)
    with caplog.at_level(logging.WARNING, logger="animalcam"):
        raw = fetch(source)
    assert raw.reused
    assert [(s.path, s.reason) for s in raw.skipped] == [
        ("raw-img/cane/outside.jpg", "link_outside_source")
    ]
    assert "raw-img/cane/outside.jpg (link_outside_source)" in caplog.text


def test_fixed_permission_rebuilds(work, source, monkeypatch):
    """A chmod changes the mode, not the mtime: the fingerprint must see it."""
    fetch(source)
    os.chmod(source / "raw-img/cane/0.jpg", 0o600)
    assert not fetch(source).reused


def test_nothing_readable_is_one_error_and_nothing_left(work, source, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(folder_source, "_open_source", refuse)
    with pytest.raises(
        DataError,
        match=r"none of the 6 files .* could be read \(6 entries skipped \(6 unreadable\)",
    ):
        fetch(source)
    assert left_in_data(work) == []


def test_all_class_folders_skipped_says_why(work, tmp_path):
    folder = tmp_path / "animals10"
    (folder / "cane").mkdir(parents=True)
    (folder / "cane/0.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(
        DataError, match=r"no class folders.*1 entry skipped \(1 broken_link\): cane/0.jpg"
    ):
        fetch(folder)
    assert left_in_data(work) == []


def test_names_that_collide_on_other_disks_stop_the_stage(work, source):
    write_folder(source, {"raw-img/cane/0.JPG": b"other picture"})
    with pytest.raises(DataError, match=r"'cane/0.JPG' and 'cane/0.jpg' differ only in case"):
        fetch(source)
    assert left_in_data(work) == []


def test_too_many_files_stop_the_scan(work, source):
    with pytest.raises(DataError, match=r"more than data.max_members = 5 files"):
        download.download_dataset(DataParams(source=str(source), max_members=5), "data/raw")
    assert left_in_data(work) == []


def test_file_growing_while_copied_is_skipped(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 100)
    scanned = folder_source.SourceFile(path, size=10, mtime_ns=0, mode=0o100644)
    target = tmp_path / "out/a.jpg"
    assert folder_source.copy_source_file(scanned, target) == "changed_while_copying"
    assert not target.exists()


def test_file_swapped_for_a_fifo_after_the_scan_is_not_read(tmp_path, no_hang):
    path = tmp_path / "a.jpg"
    os.mkfifo(path)
    scanned = folder_source.SourceFile(path, size=10, mtime_ns=0, mode=0o100644)
    assert folder_source.copy_source_file(scanned, tmp_path / "out.jpg") == "special_file"


def test_stage_copies_a_hostile_folder_and_warns_once(tmp_path, source, mlflow_db):
    (source / "raw-img/cane/outside.jpg").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(source / "raw-img/cane/fifo.jpg")
    project = tmp_path / "project"
    result = run_download_stage(project, {"source": str(source)}, mlflow_db, timeout=60)
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.strip().splitlines()
    assert "WARNING" in warning and "1 link_outside_source, 1 special_file" in warning
    assert SECRET not in read_tree(project / "data/raw").values()
    assert left_in_data(project) == ["raw", "raw.source.json"]


def test_stage_refuses_colliding_names_in_one_line(tmp_path, source, mlflow_db):
    write_folder(source, {"raw-img/Cane/9.jpg": jpeg_bytes(9)})
    project = tmp_path / "project"
    line = one_error_line(run_download_stage(project, {"source": str(source)}, mlflow_db))
    assert "'Cane' and 'cane' differ only in case" in line and "nothing was copied" in line
    assert left_in_data(project) == []


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking") / "mlflow.db"
