"""Small archives and folders in the Kaggle Animals-10 layout, honest and hostile.

``raw-img/<italian class>/<n>.jpg`` with tiny real JPEGs, plus the ``translate.py`` the
real archive ships. The hostile ones (path traversal, symlinks, lying sizes) are built
with :mod:`zipfile` and, where zipfile will not write the lie, by patching bytes of the
central directory.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
from pathlib import Path

from PIL import Image

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


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (relative, sorted), hidden ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
