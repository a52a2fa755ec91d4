"""The download stage: local zips and folders, hostile archives, Kaggle through a fake API."""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import requests
from archive_factory import expected_raw as expected
from archive_factory import (
    jpeg_bytes,
    kaggle_files,
    kaggle_zip,
    left_in_data,
    one_error_line,
    read_tree,
    run_download_stage,
    set_declared_size,
    write_folder,
    write_zip,
    zip_with_raw_name,
    zip_with_symlink,
)
from tqdm import tqdm

from animalcam import download, kaggle_redaction, kaggle_source, local_source, raw_data
from animalcam.archives import Member, extract_member, safe_member_path
from animalcam.errors import (
    CredentialsError,
    DataError,
    DownloadError,
    SourceNotFoundError,
    UnsafeArchiveError,
)
from animalcam.params import DataParams


def nothing_left(work: Path) -> bool:
    """No data/raw and no temporary folder beside it (an empty data/ may remain)."""
    return not (work / "data").exists() or os.listdir(work / "data") == []


def fetch(source: str | Path, **kwargs) -> raw_data.RawData:
    stamp = kwargs.pop("stamp", None)
    return download.download_dataset(DataParams(source=str(source), **kwargs), "data/raw", stamp)


# ---------------------------------------------------------------- local sources


def test_local_zip_gives_class_folders_only(work, tmp_path):
    archive = kaggle_zip(tmp_path / "animals10.zip")
    before = archive.read_bytes()

    raw = fetch(archive)

    assert read_tree(work / "data/raw") == expected()  # no translate.py, no raw-img/ level
    assert raw.classes == {"cane": 2, "gatto": 2, "ragno": 2}
    assert (raw.files, raw.reused) == (6, False)
    assert archive.read_bytes() == before
    assert os.listdir(work / "data") == ["raw"]  # no temporary folder left beside it


def test_relative_source_is_relative_to_the_repo_root(work):
    kaggle_zip(work / "downloads/animals10.zip")
    fetch("downloads/animals10.zip")
    assert read_tree(work / "data/raw") == expected()


@pytest.mark.parametrize("layout", ["archive root", "raw-img folder", "nested archive root"])
def test_local_folder_in_either_layout(work, tmp_path, layout):
    unpacked = write_folder(tmp_path / "downloads/animals10", kaggle_files())
    source = {
        "archive root": unpacked,
        "raw-img folder": unpacked / "raw-img",
        "nested archive root": unpacked.parent,  # .../animals10/raw-img one level down
    }[layout]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in unpacked.rglob("*.*")}

    fetch(source)

    assert read_tree(work / "data/raw") == expected()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in unpacked.rglob("*.*")} == before


def test_hidden_files_and_macos_metadata_are_skipped(work, tmp_path):
    archive = kaggle_zip(
        tmp_path / "a.zip",
        {
            "__MACOSX/raw-img/cane/._0.jpg": b"AppleDouble",
            "raw-img/cane/.DS_Store": b"junk",
            "raw-img/README.txt": b"loose file beside the classes",
        },
    )
    fetch(archive)
    assert read_tree(work / "data/raw") == expected()


def test_folders_without_images_are_not_classes(work, tmp_path):
    files = {**kaggle_files(), "raw-img/notes/readme.txt": b"no images here"}
    fetch(write_zip(tmp_path / "a.zip", files))
    assert sorted(os.listdir(work / "data/raw")) == ["cane", "gatto", "ragno"]


def test_empty_class_folder_in_a_zip_is_listed_not_dropped(work, tmp_path, caplog):
    archive = kaggle_zip(tmp_path / "a.zip", {"raw-img/elefante/": b"", "./": b""})
    with caplog.at_level(logging.WARNING, logger="animalcam"):
        raw = fetch(archive, stamp="data/raw.source.json")
    assert [(s.path, s.reason) for s in raw.skipped] == [("raw-img/elefante/", "no_images")]
    assert "Skipping raw-img/elefante/" in caplog.text
    assert "1 entry skipped (1 no_images): raw-img/elefante/ (no_images)" in caplog.text
    assert read_tree(work / "data/raw") == expected()


def test_two_kaggle_layouts_in_one_source_are_ambiguous(work, tmp_path):
    files = {f"{top}/raw-img/cane/0.jpg": b"x" for top in ("v1", "v2")}
    with pytest.raises(DataError, match=r"several raw-img/ folders \(v1/raw-img, v2/raw-img\)"):
        fetch(write_zip(tmp_path / "a.zip", files))


def test_foreign_stamp_is_ignored(work, tmp_path):
    (work / "data").mkdir()
    (work / "data/raw.source.json").write_text('{"fingerprint": "x", "files": 0, "bytes": 0}')
    raw = fetch(kaggle_zip(tmp_path / "a.zip"), stamp="data/raw.source.json")
    assert not raw.reused and raw.files == 6


def test_missing_source_says_how_to_fix(work):
    with pytest.raises(SourceNotFoundError) as err:
        fetch("nowhere/animals10.zip")
    message = str(err.value)
    assert "data.source = 'nowhere/animals10.zip' does not exist" in message
    assert "'kaggle'" in message
    assert not (work / "data").exists()


@pytest.mark.parametrize(
    ("files", "found"),
    [
        ({"translate.py": b"x", "docs/a.txt": b"y"}, "docs/, translate.py"),
        ({}, "no files at all"),
        ({"raw-img/a.jpg": b"loose"}, "raw-img/"),
    ],
)
def test_archive_without_class_folders_is_a_data_error(work, tmp_path, files, found):
    with pytest.raises(DataError, match="holds no class folders with images") as err:
        fetch(write_zip(tmp_path / "a.zip", files))
    assert f"(found: {found})" in str(err.value)
    assert not (work / "data/raw").exists()


def test_source_inside_the_output_is_refused(work):
    write_folder(work / "data/raw", {"cane/0.jpg": b"x"})
    with pytest.raises(DataError, match="overlaps the output folder"):
        fetch("data/raw")
    assert (work / "data/raw/cane/0.jpg").read_bytes() == b"x"


# ---------------------------------------------------------------- hostile archives


@pytest.mark.parametrize(
    "name",
    [
        "../evil.txt",
        "raw-img/cane/../../../evil.txt",
        "/tmp/evil.txt",
        "..\\evil.txt",
        "raw-img\\..\\..\\evil.txt",
        "C:/evil.txt",
        "C:evil.txt",
        "raw-img/cane/x.jpg:stream",
    ],
)
def test_escaping_member_is_refused_before_anything_is_written(work, tmp_path, name):
    archive = kaggle_zip(tmp_path / "evil.zip", {name: b"pwned"})
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack") as err:
        fetch(archive)
    assert repr(name) in str(err.value)
    assert not (work / "data").exists()  # not even a temporary folder
    assert not list(tmp_path.rglob("evil.txt"))


def test_refused_archive_keeps_the_previous_data_raw(work, tmp_path):
    fetch(kaggle_zip(tmp_path / "good.zip"))
    before = read_tree(work / "data/raw")

    with pytest.raises(UnsafeArchiveError):
        fetch(kaggle_zip(tmp_path / "evil.zip", {"../evil.txt": b"pwned"}))

    assert read_tree(work / "data/raw") == before
    assert os.listdir(work / "data") == ["raw"]


def test_symlink_member_is_refused(work, tmp_path):
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        fetch(zip_with_symlink(tmp_path / "link.zip"))
    assert not (work / "data").exists()


def test_declared_total_above_the_limit_is_refused(work, tmp_path):
    archive = kaggle_zip(tmp_path / "a.zip", {"raw-img/cane/big.bmp": bytes(200_000)})
    with pytest.raises(UnsafeArchiveError, match=r"max_extract_gb = 0\.0001"):
        fetch(archive, max_extract_gb=0.0001)  # about 107 kB
    assert not (work / "data").exists()


def test_absurd_compression_ratio_is_refused(work, tmp_path):
    archive = kaggle_zip(tmp_path / "bomb.zip", {"raw-img/cane/bomb.jpg": b"tiny"})
    set_declared_size(archive, "raw-img/cane/bomb.jpg", 4_000_000_000)
    with pytest.raises(UnsafeArchiveError, match="zip bomb"):
        fetch(archive)  # 3.7 GB is within the default 20 GB: the ratio gives it away
    assert not (work / "data").exists()


def test_member_longer_than_declared_never_lands(work, tmp_path):
    archive = kaggle_zip(tmp_path / "liar.zip")
    set_declared_size(archive, "raw-img/gatto/1.jpg", 10)
    # zipfile stops reading at the declared size, so the CRC-32 gives the lie away.
    with pytest.raises(DataError, match="is corrupt"):
        fetch(archive)
    assert nothing_left(work)


def test_streaming_enforces_declared_size_and_budget(tmp_path):
    """Even if a reader handed back more bytes than declared, extraction stops."""

    class LyingZip:
        def open(self, info):
            return io.BytesIO(b"x" * 5000)

    info = zipfile.ZipInfo("cane/0.jpg")
    info.file_size = 100
    with pytest.raises(UnsafeArchiveError, match="more than its declared 100 bytes"):
        extract_member(
            LyingZip(), Member(info, PurePosixPath("cane/0.jpg")), tmp_path / "a", 10**6, "z"
        )
    info.file_size = 10_000
    with pytest.raises(UnsafeArchiveError, match="max_extract_gb"):
        extract_member(
            LyingZip(), Member(info, PurePosixPath("cane/0.jpg")), tmp_path / "b", 1000, "z"
        )


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("raw-img/cane/0.jpg", "raw-img/cane/0.jpg"),
        ("./raw-img//cane/", "raw-img/cane"),
        ("raw-img\\cane\\0.jpg", "raw-img/cane/0.jpg"),
    ],
)
def test_safe_member_path_normalizes_harmless_names(name, path):
    assert safe_member_path(name) == PurePosixPath(path)


def test_duplicate_member_is_refused(work, tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("raw-img/cane/0.jpg", b"one")
        with pytest.warns(UserWarning):
            zf.writestr("raw-img/cane/0.jpg", b"two")
    with pytest.raises(UnsafeArchiveError, match="appears twice"):
        fetch(archive)


@pytest.mark.parametrize("content", [b"this is not a zip", b""])
def test_non_zip_file_is_a_data_error(work, tmp_path, content):
    bad = tmp_path / "animals10.zip"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="is not a readable zip archive"):
        fetch(bad)
    assert not (work / "data").exists()


def test_corrupt_member_is_a_data_error_and_leaves_nothing(work, tmp_path):
    archive = write_zip(tmp_path / "a.zip", kaggle_files(), compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    jpeg = kaggle_files()["raw-img/ragno/1.jpg"]
    start = data.find(jpeg)
    data[start + 100 : start + 110] = bytes(10)  # CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is corrupt"):
        fetch(archive)
    assert nothing_left(work)


# ---------------------------------------------------------------- Kaggle, through a fake API


class FakeKaggleApi:
    """Stands in for kaggle's KaggleApi: same calls, no network."""

    def __init__(self, authenticate_error=None, download_error=None):
        self.authenticate_error = authenticate_error
        self.download_error = download_error
        self.config_values = {}
        self.config = "/home/someone/.kaggle/kaggle.json"
        self.calls = []

    def authenticate(self):
        if self.authenticate_error is not None:
            print("Authentication required to call the Kaggle API.")  # what kaggle prints
            raise self.authenticate_error
        self.config_values["auth_method"] = "LEGACY_API_KEY"

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        self.calls.append({"dataset": dataset, "path": path, "unzip": unzip})
        if self.download_error is not None:
            raise self.download_error
        kaggle_zip(Path(path) / f"{dataset.split('/')[1]}.zip")


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.fixture
def fake_kaggle(monkeypatch):
    def install(**kwargs) -> FakeKaggleApi:
        api = FakeKaggleApi(**kwargs)
        monkeypatch.setattr(kaggle_source, "_new_kaggle_api", lambda: api)
        monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
        monkeypatch.delenv("KAGGLE_KEY", raising=False)
        return api

    return install


def test_kaggle_source_downloads_to_a_temp_zip_and_unpacks(work, fake_kaggle):
    api = fake_kaggle()

    raw = fetch("kaggle")

    assert read_tree(work / "data/raw") == expected()
    assert raw.files == 6
    [call] = api.calls
    assert call["dataset"] == "alessiocorrado99/animals10"
    assert call["unzip"] is False
    assert Path(call["path"]).parent.resolve() == (work / "data").resolve()
    assert not Path(call["path"]).exists()  # the downloaded zip is gone
    assert os.listdir(work / "data") == ["raw"]


def test_missing_kaggle_credentials_say_where_to_put_them(work, fake_kaggle, capsys):
    fake_kaggle(authenticate_error=SystemExit(1))  # what KaggleApi.authenticate does
    with pytest.raises(CredentialsError) as err:
        fetch("kaggle")
    message = str(err.value)
    assert message.startswith("No Kaggle credentials found")
    for hint in (
        "~/.kaggle/kaggle.json",
        "KAGGLE_USERNAME",
        "KAGGLE_API_TOKEN",
        "data.source: path/to/animals10.zip",
        "dvc exp run -S data.source=",
    ):
        assert hint in message
    assert "\n" not in message
    assert "Authentication required" not in capsys.readouterr().out  # kaggle's help swallowed
    assert not (work / "data/raw").exists()


@pytest.mark.parametrize(("status", "words"), [(401, "rejected"), (403, "refused access")])
def test_rejected_kaggle_credentials(work, fake_kaggle, status, words):
    fake_kaggle(download_error=http_error(status))
    with pytest.raises(CredentialsError) as err:
        fetch("kaggle")
    message = str(err.value)
    assert f"HTTP {status}" in message and words in message
    assert "/home/someone/.kaggle/kaggle.json" in message  # where the bad key came from
    assert "data.source: path/to/animals10.zip" in message
    assert os.listdir(work / "data") == []  # neither data/raw nor the download folder


def test_unknown_kaggle_dataset(work, fake_kaggle):
    fake_kaggle(download_error=http_error(404))
    with pytest.raises(SourceNotFoundError, match=r"check data\.kaggle_dataset"):
        fetch("kaggle", kaggle_dataset="someone/nothing")


def test_network_failure_is_one_clear_line(work, fake_kaggle):
    fake_kaggle(download_error=requests.ConnectionError("Max retries exceeded\nwith url"))
    with pytest.raises(DownloadError, match="Could not reach Kaggle") as err:
        fetch("kaggle")
    assert "\n" not in str(err.value)
    assert os.listdir(work / "data") == []


def test_real_kaggle_without_credentials(tmp_path):
    """The real KaggleApi, with an empty home and no KAGGLE_* variables (no network used)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    code = (
        "from pathlib import Path\n"
        "from animalcam import kaggle_source\n"
        "from animalcam.errors import CredentialsError\n"
        "try:\n"
        "    kaggle_source.download_kaggle_zip('alessiocorrado99/animals10', Path('.'))\n"
        "except CredentialsError as exc:\n"
        "    print('CredentialsError:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.startswith("CredentialsError: No Kaggle credentials found"), result
    assert "Authentication required" not in result.stdout


def test_local_source_never_imports_kaggle(tmp_path):
    kaggle_zip(tmp_path / "a.zip")
    code = (
        "import sys\n"
        "from animalcam.download import download_dataset\n"
        "from animalcam.params import DataParams\n"
        "download_dataset(DataParams(source='a.zip'), 'data/raw')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kaggle', 'kagglesdk')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "data/raw/cane/0.jpg").is_file()


# ---------------------------------------------------------------- the stamp


def test_unchanged_source_is_not_unpacked_again(work, tmp_path, monkeypatch):
    archive = kaggle_zip(tmp_path / "a.zip")
    fetch(archive, stamp="data/raw.source.json")

    def fail(*args):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(download, "unpack_zip", fail)
    assert fetch(archive, stamp="data/raw.source.json").reused


def test_changed_zip_or_touched_output_is_rebuilt(work, tmp_path):
    archive = kaggle_zip(tmp_path / "a.zip")
    fetch(archive, stamp="data/raw.source.json")

    kaggle_zip(archive, {"raw-img/cane/new.jpg": b"new image"})  # same path, new content
    raw = fetch(archive, stamp="data/raw.source.json")
    assert not raw.reused and raw.classes["cane"] == 3

    (work / "data/raw/cane/new.jpg").unlink()  # someone edited data/raw by hand
    assert not fetch(archive, stamp="data/raw.source.json").reused
    assert (work / "data/raw/cane/new.jpg").is_file()


def test_changed_download_code_rebuilds(work, tmp_path, monkeypatch):
    archive = kaggle_zip(tmp_path / "a.zip")
    fetch(archive, stamp="data/raw.source.json")
    monkeypatch.setattr(download, "_code_digest", lambda: "a newer version of the code")
    assert not fetch(archive, stamp="data/raw.source.json").reused


def test_changed_folder_is_rebuilt(work, tmp_path):
    folder = write_folder(tmp_path / "animals10", kaggle_files())
    fetch(folder, stamp="data/raw.source.json")
    assert fetch(folder, stamp="data/raw.source.json").reused
    write_folder(folder, {"raw-img/gatto/extra.jpg": b"more"})
    assert fetch(folder, stamp="data/raw.source.json").classes["gatto"] == 3


def test_vanished_source_keeps_what_it_built(work, tmp_path, caplog):
    archive = kaggle_zip(tmp_path / "a.zip")
    fetch(archive, stamp="data/raw.source.json")
    archive.unlink()
    with caplog.at_level(logging.WARNING):
        assert fetch(archive, stamp="data/raw.source.json").reused
    assert "is not there any more" in caplog.text
    with pytest.raises(SourceNotFoundError):  # a different (mistyped) path still fails
        fetch(tmp_path / "b.zip", stamp="data/raw.source.json")


def test_kaggle_source_is_downloaded_once(work, fake_kaggle):
    api = fake_kaggle()
    fetch("kaggle", stamp="data/raw.source.json")
    assert fetch("kaggle", stamp="data/raw.source.json").reused
    assert len(api.calls) == 1
    fetch("kaggle", kaggle_dataset="alessiocorrado99/animals10/2", stamp="data/raw.source.json")
    assert len(api.calls) == 2


# ---------------------------------------------------------------- the stage script


def test_stage_script_fails_in_one_line(tmp_path, mlflow_db):
    result = run_download_stage(tmp_path, {"source": "missing/animals10.zip"}, mlflow_db)
    line = one_error_line(result)
    assert line.startswith("animalcam download: error: data.source = 'missing/animals10.zip'")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- names, counts, disk space


def refused(work: Path, archive: Path, error=UnsafeArchiveError, **params) -> str:
    """Run the stage on ``archive``; it must fail with ``error``, write nothing and leave
    the archive as it was. Returns the message."""
    before = archive.read_bytes()
    with pytest.raises(error) as err:
        fetch(archive, **params)
    assert nothing_left(work)
    assert archive.read_bytes() == before
    message = str(err.value)
    assert "\n" not in message
    return message


def test_name_marked_utf8_that_is_not_is_refused(work, tmp_path):
    archive = zip_with_raw_name(tmp_path / "a.zip", b"raw-img/cane/caf\xe9.jpg", utf8_flag=True)
    message = refused(work, archive)
    assert "marked as UTF-8 but is not" in message and "caf\\xe9" in message


def test_unflagged_utf8_name_is_read_as_utf8(work, tmp_path):
    """Linux and macOS zip tools write UTF-8 names without setting the flag."""
    name = "raw-img/cane/café-猫.jpg"
    fetch(zip_with_raw_name(tmp_path / "a.zip", name.encode(), utf8_flag=False))
    assert (work / "data/raw/cane/café-猫.jpg").read_bytes() == jpeg_bytes(99)


def test_unflagged_legacy_name_is_refused(work, tmp_path):
    archive = zip_with_raw_name(tmp_path / "a.zip", b"raw-img/cane/caf\xe9.jpg", utf8_flag=False)
    message = refused(work, archive)
    assert "b'raw-img/cane/caf\\xe9.jpg' is not valid UTF-8" in message
    assert "Re-create the archive with UTF-8 names" in message


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"raw-img/cane/0.jpg/evil.jpg": b"x"}, "'raw-img/cane/0.jpg' is both a file and a folder"),
        ({"raw-img/cane/0.jpg/": b""}, "'raw-img/cane/0.jpg' is both a file and a folder"),
        ({"raw-img/cane/0.JPG": b"x"}, "differ only in case"),
        ({"raw-img/Cane/9.jpg": b"x"}, "'raw-img/Cane' and 'raw-img/cane' differ only in case"),
        (  # "é" composed and decomposed: one name on macOS
            {"raw-img/cane/\u00e9.jpg": b"x", "raw-img/cane/e\u0301.jpg": b"y"},
            "Unicode normalization",
        ),
    ],
)
def test_names_that_would_collide_are_refused(work, tmp_path, extra, words):
    assert words in refused(work, kaggle_zip(tmp_path / "a.zip", extra))


@pytest.mark.parametrize("name", ["raw-img/cane/a\nb.jpg", "raw-img/cane/a\rb.jpg", "c\x1b[2J.jpg"])
def test_control_characters_in_names_are_refused(work, tmp_path, name):
    assert "control character" in refused(work, kaggle_zip(tmp_path / "a.zip", {name: b"x"}))


def test_name_too_long_for_the_file_system_is_refused(work, tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    long_name = "raw-img/cane/" + "a" * (name_max + 1) + ".jpg"
    message = refused(work, kaggle_zip(tmp_path / "a.zip", {long_name: b"x"}))
    assert f"more than the {name_max} this file system allows" in message


def test_path_too_long_for_the_file_system_is_refused(work, tmp_path):
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    deep = "/".join(["d" * 200] * (path_max // 200 + 1))  # every part fits, the whole does not
    message = refused(work, kaggle_zip(tmp_path / "a.zip", {f"raw-img/cane/{deep}/0.jpg": b"x"}))
    assert f"more than the {path_max} this file system allows" in message


def test_more_members_than_the_cap_are_refused(work, tmp_path):
    archive = kaggle_zip(tmp_path / "a.zip")  # 7 entries
    message = refused(work, archive, max_members=6)
    assert "7 entries" in message and "more than data.max_members = 6" in message
    fetch(archive, max_members=7)
    assert read_tree(work / "data/raw") == expected()


def test_default_member_cap_fits_animals10():
    assert 26_179 < DataParams().max_members <= 1_000_000  # Animals-10's file count


def test_archive_larger_than_the_free_space_is_refused_before_unpacking(
    work, tmp_path, monkeypatch
):
    files = {**kaggle_files(), "raw-img/cane/big.bmp": bytes(5_000_000)}
    archive = write_zip(tmp_path / "a.zip", files, compression=zipfile.ZIP_STORED)
    asked = []

    def usage(path):
        asked.append(Path(path).resolve())
        return shutil._ntuple_diskusage(10**12, 10**12 - 20_000_000, 20_000_000)

    monkeypatch.setattr(raw_data.shutil, "disk_usage", usage)
    message = refused(work, archive, error=DataError)
    assert "of disk space for data/raw" in message and "only 19.1 MB is free" in message
    assert asked and asked[0] in (work.resolve(), (work / "data").resolve())


def test_disk_full_while_unpacking_is_one_line(work, tmp_path, monkeypatch):
    """Declared sizes fit, and the disk fills anyway (another process wrote to it)."""
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if "x" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    message = refused(work, kaggle_zip(tmp_path / "a.zip"), error=DataError)
    assert "No space left on device" in message and "free some disk space" in message


def test_truncated_archive_is_a_data_error(work, tmp_path):
    archive = kaggle_zip(tmp_path / "a.zip")
    archive.write_bytes(archive.read_bytes()[:-30])  # the end of the central directory
    assert "is not a readable zip archive" in refused(work, archive, error=DataError)


# ---------------------------------------------------------------- sources that are no file


def special_sources(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "animals10.zip"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    if len(str(sock_path)) < 100:  # AF_UNIX path limit
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(sock_path))
    link = tmp_path / "link.zip"
    link.symlink_to(fifo)
    return {"fifo": fifo, "socket": sock_path, "device": Path("/dev/zero"), "link": link}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("fifo", "is a named pipe (FIFO), not a zip file or a folder"),
        ("device", "is a character device, not a zip file or a folder"),
        ("socket", "is a socket, not a zip file or a folder"),
        ("link", "is a named pipe (FIFO) (through a symbolic link)"),
    ],
)
def test_source_that_is_no_file_is_refused_unread(work, tmp_path, no_hang, kind, words):
    source = special_sources(tmp_path)[kind]
    if not source.exists():
        pytest.skip("no AF_UNIX socket here")
    with pytest.raises(DataError) as err:
        fetch(source, stamp="data/raw.source.json")
    assert words in str(err.value) and "nothing was read from it" in str(err.value)
    assert not (work / "data").exists()
    # Nor does the fingerprint open it (a FIFO would block until a writer came).
    assert "special" in local_source.local_fingerprint(str(source), source)


def test_dangling_link_source_says_where_it_points(work, tmp_path):
    link = tmp_path / "a.zip"
    link.symlink_to(tmp_path / "moved-away.zip")
    with pytest.raises(SourceNotFoundError, match=r"is a symbolic link to '.*moved-away\.zip'"):
        fetch(link)


# ---------------------------------------------------------------- Kaggle output and secrets

KEY = "0123456789abcdef0123456789abcdef"
TOKEN = "KGAT_fedcba9876543210fedcba98765432"


class ChattyKaggleApi(FakeKaggleApi):
    """A KaggleApi with VERBOSE=1: it prints each request, credentials included."""

    def authenticate(self):
        self.config_values.update(username="someone", key=KEY, auth_method="LEGACY_API_KEY")
        basic = base64.b64encode(f"someone:{KEY}".encode()).decode()
        print(f"GET https://www.kaggle.com/api/v1/hello\nAuthorization: Basic {basic}")
        print(f"Authorization: Bearer {TOKEN}", file=sys.stderr)

    def dataset_download_files(self, dataset, path=None, force=False, quiet=True, unzip=False):
        print(f"Dataset URL: https://www.kaggle.com/datasets/{dataset}")
        print(f'{{"username": "someone", "key": "{KEY}"}}', file=sys.stderr)
        sys.stderr.write(f"partial line with key={KEY}")  # never ended by a newline
        for _ in tqdm(range(3), file=None, disable=quiet):
            pass
        super().dataset_download_files(dataset, path, force, quiet, unzip)


def assert_no_secret(*texts: str) -> None:
    basic = base64.b64encode(f"someone:{KEY}".encode()).decode()
    for text in texts:
        for secret in (KEY, TOKEN, basic, KEY[:12]):
            assert secret not in text, text


def test_kaggle_client_output_is_logged_redacted(work, fake_kaggle, monkeypatch, capsys, caplog):
    api = ChattyKaggleApi()
    monkeypatch.setattr(kaggle_source, "_new_kaggle_api", lambda: api)
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)

    with caplog.at_level(logging.INFO, logger="animalcam"):
        raw = fetch("kaggle")

    assert raw.files == 6
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")  # nothing forwarded as it is
    assert_no_secret(caplog.text)
    assert "kaggle: Dataset URL: https://www.kaggle.com/datasets/alessiocorrado99" in caplog.text
    assert "kaggle: Authorization: [redacted]" in caplog.text
    assert "key=[redacted]" in caplog.text  # the partial line, logged when the call ended


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError(f"Unable to connect to proxy http://someone:{KEY}@proxy:3128"),
        requests.ConnectionError(
            f"HTTPSConnectionPool: headers {{'Authorization': 'Bearer {TOKEN}'}}"
        ),
        http_error(500),
        ValueError(f"bad dataset, request had key={KEY}"),
        RuntimeError(f"unexpected: Authorization: Basic {KEY}\nmore"),
    ],
)
def test_kaggle_errors_never_carry_secrets(work, fake_kaggle, monkeypatch, capsys, error):
    if isinstance(error, requests.HTTPError):
        error.args = (f"500 Server Error for url: https://k/api?token={TOKEN}",)
    api = fake_kaggle(download_error=error)
    api.config_values.update(key=KEY)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    with pytest.raises(DownloadError) as err:
        fetch("kaggle")
    message = str(err.value)
    assert "\n" not in message and "[redacted]" in message
    assert_no_secret(message, *capsys.readouterr())
    assert os.listdir(work / "data") == []


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Basic {KEY}",
        f"proxy-authorization:Bearer {KEY}",
        f"Cookie: session={KEY}",
        f"https://user:{KEY}@example.com/x",
        f'{{"key": "{KEY}"}}',
        f"KAGGLE_KEY={KEY}",
        f"api_token: {KEY}",
        f"uses {KEY} somewhere",  # a known secret, wherever it appears
    ],
)
def test_redact_hides_credentials(text):
    assert KEY not in kaggle_redaction.redact(text, [KEY])
    assert kaggle_redaction.redact("Dataset URL: https://www.kaggle.com/datasets/a/b") == (
        "Dataset URL: https://www.kaggle.com/datasets/a/b"
    )


# ---------------------------------------------------------------- through the stage script


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    return tmp_path_factory.mktemp("tracking") / "mlflow.db"


@pytest.mark.parametrize(
    ("raw", "flag", "words"),
    [
        (b"raw-img/cane/caf\xe9.jpg", False, "is not valid UTF-8"),
        (b"raw-img/cane/caf\xe9.jpg", True, "marked as UTF-8 but is not"),
        (b"raw-img/cane/0.JPG", False, "differ only in case"),
    ],
)
def test_stage_refuses_hostile_names_in_one_line(tmp_path, mlflow_db, raw, flag, words):
    archive = zip_with_raw_name(tmp_path / "a.zip", raw, utf8_flag=flag)
    before = archive.read_bytes()
    result = run_download_stage(tmp_path / "project", {"source": str(archive)}, mlflow_db)
    line = one_error_line(result)
    assert words in line and "nothing was written" in line
    assert left_in_data(tmp_path / "project") == []
    assert archive.read_bytes() == before


def test_stage_refuses_a_fifo_source_without_hanging(tmp_path, mlflow_db):
    os.mkfifo(tmp_path / "animals10.zip")
    result = run_download_stage(
        tmp_path / "project", {"source": str(tmp_path / "animals10.zip")}, mlflow_db, timeout=60
    )
    assert "is a named pipe (FIFO)" in one_error_line(result)
    assert left_in_data(tmp_path / "project") == []


def test_member_cap_is_checked_before_the_listing_is_loaded(work, tmp_path, monkeypatch):
    archive = kaggle_zip(tmp_path / "a.zip")

    def never(*args, **kwargs):
        raise AssertionError("zipfile loaded the listing of an archive over the cap")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", never)
    message = refused(work, archive, max_members=6)
    assert "declares 7 entries" in message and "data.max_members = 6" in message


def test_member_cap_holds_when_the_end_record_lies(work, tmp_path):
    archive = kaggle_zip(tmp_path / "a.zip")
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)  # "1 entry", zipfile reads all 7 anyway
    archive.write_bytes(bytes(data))
    assert "holds 7 entries, more than data.max_members = 6" in refused(
        work, archive, max_members=6
    )
