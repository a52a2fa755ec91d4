"""The download stage: local zips and folders, hostile archives, Kaggle through a fake API."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import requests
from archive_factory import expected_raw as expected
from archive_factory import (
    kaggle_files,
    kaggle_zip,
    read_tree,
    set_declared_size,
    write_folder,
    write_zip,
    zip_with_symlink,
)

from animalcam import download
from animalcam.archives import Member, extract_member, safe_member_path
from animalcam.errors import (
    CredentialsError,
    DataError,
    SourceNotFoundError,
    UnsafeArchiveError,
)
from animalcam.params import DataParams

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A fresh 'repository root' as the current directory; sources live beside it."""
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def nothing_left(work: Path) -> bool:
    """No data/raw and no temporary folder beside it (an empty data/ may remain)."""
    return not (work / "data").exists() or os.listdir(work / "data") == []


def fetch(source: str | Path, **kwargs) -> download.RawData:
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
        monkeypatch.setattr(download, "_new_kaggle_api", lambda: api)
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
    with pytest.raises(download.DownloadError, match="Could not reach Kaggle") as err:
        fetch("kaggle")
    assert "\n" not in str(err.value)
    assert os.listdir(work / "data") == []


def test_real_kaggle_without_credentials(tmp_path):
    """The real KaggleApi, with an empty home and no KAGGLE_* variables (no network used)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"))
    code = (
        "from pathlib import Path\n"
        "from animalcam import download\n"
        "from animalcam.errors import CredentialsError\n"
        "try:\n"
        "    download.download_kaggle_zip('alessiocorrado99/animals10', Path('.'))\n"
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


def test_stage_script_fails_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: missing/animals10.zip\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/download.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ANIMALCAM_LOG_LEVEL": "WARNING"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("animalcam download: error: data.source = 'missing/animals10.zip'")
    assert not (tmp_path / "data").exists()
