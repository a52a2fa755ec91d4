"""Small archives and folders in the Kaggle Animals-10 layout, honest and hostile.

``raw-img/<italian class>/<n>.jpg`` with tiny real JPEGs, plus the ``translate.py`` the
real archive ships. The hostile ones (path traversal, symlinks, lying sizes, names that
are not UTF-8) are built with :mod:`zipfile` and, where zipfile will not write the lie, by
patching bytes of the local headers and the central directory.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

CLASSES = ("cane", "gatto", "ragno")
PER_CLASS = 2
TRANSLATE_PY = 'translate = {"cane": "dog"}\nprint("never run me")\n'


def jpeg_bytes(seed: int, size: int = 8) -> bytes:
    """A tiny, real JPEG whose colour depends on ``seed``."""
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 199) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def kaggle_files(classes=CLASSES, per_class: int = PER_CLASS) -> dict[str, bytes]:
    """Member name -> content, as in the Kaggle archive (raw-img/ plus translate.py)."""
    files = {"translate.py": TRANSLATE_PY.encode()}
    for c, name in enumerate(classes):
        for i in range(per_class):
            files[f"raw-img/{name}/{i}.jpg"] = jpeg_bytes(10 * c + i)
    return files


def expected_raw(classes=CLASSES, per_class: int = PER_CLASS) -> dict[str, bytes]:
    """What data/raw should hold afterwards: relative path -> content."""
    return {
        name.removeprefix("raw-img/"): data
        for name, data in kaggle_files(classes, per_class).items()
        if name.startswith("raw-img/")
    }


def write_zip(path: Path, files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding ``files`` (name -> bytes) under exactly the names given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def kaggle_zip(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    return write_zip(path, {**kaggle_files(), **(extra or {})})


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def zip_with_symlink(path: Path, name: str = "raw-img/cane/link.jpg") -> Path:
    """The Kaggle zip plus a member that unpacks (with Unix tools) as a symlink."""
    kaggle_zip(path)
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(info, "/etc/passwd")
    return path


def set_declared_size(path: Path, member: str, size: int) -> Path:
    """Rewrite ``member``'s uncompressed size in the central directory (what readers trust)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(member).header_offset
    # Find the central-directory record pointing at this member's local header.
    position = 0
    while (position := data.find(b"PK\x01\x02", position)) >= 0:
        if struct.unpack_from("<I", data, position + 42)[0] == offset:
            struct.pack_into("<I", data, position + 24, size)  # uncompressed size field
            path.write_bytes(bytes(data))
            return path
        position += 4
    raise AssertionError(f"no central-directory record for {member}")


def set_raw_name(path: Path, placeholder: str, raw: bytes, utf8_flag: bool) -> Path:
    """Replace member name ``placeholder`` by the bytes ``raw`` (same length), in the local
    header and the central directory, with the UTF-8 flag (bit 11) set or cleared."""
    assert placeholder.isascii() and len(placeholder) == len(raw)
    data = bytearray(path.read_bytes())
    old = placeholder.encode()
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        position, found = 0, 0
        while (position := data.find(signature, position)) >= 0:
            start = position + name_at
            if data[start : start + len(old)] == old:
                data[start : start + len(old)] = raw
                flags = struct.unpack_from("<H", data, position + flag_at)[0]
                flags = flags | 0x800 if utf8_flag else flags & ~0x800
                struct.pack_into("<H", data, position + flag_at, flags)
                found += 1
            position += 4
        assert found == 1, f"{placeholder} found {found} times after {signature!r}"
    path.write_bytes(bytes(data))
    return path


def zip_with_raw_name(path: Path, raw: bytes, utf8_flag: bool) -> Path:
    """The Kaggle zip plus the member ``raw`` (name bytes as given), an image in it."""
    placeholder = "x" * len(raw)
    kaggle_zip(path, {placeholder: jpeg_bytes(99)})
    return set_raw_name(path, placeholder, raw, utf8_flag)


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (relative, sorted), hidden ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_download_stage(
    project: Path, data: dict, mlflow_db: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python stages/download.py`` in ``project`` with ``data:`` as its params, as DVC
    runs it. ``mlflow_db`` may be shared between calls: creating one costs seconds."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KAGGLE_"))}
    env.update(ANIMALCAM_LOG_LEVEL="WARNING", MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/download.py")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The stage's single stderr line, after checking it failed the way users should see."""
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("animalcam download: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def left_in_data(project: Path) -> list[str]:
    """What a run left in ``project/data`` (temporary folders included)."""
    data = project / "data"
    return sorted(os.listdir(data)) if data.exists() else []
