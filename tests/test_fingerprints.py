"""animalcam.fingerprints: digests of values and code, and one-line descriptions of what
differs, shared by every place that keeps a result while what built it is unchanged."""

import textwrap

from animalcam import fingerprints


def test_digest_ignores_key_order_and_sees_every_value():
    assert fingerprints.digest({"b": 1, "a": [1, 2]}) == fingerprints.digest({"a": [1, 2], "b": 1})
    assert fingerprints.digest({"a": [1, 2]}) != fingerprints.digest({"a": [2, 1]})
    assert fingerprints.digest({"a": 1}) != fingerprints.digest({"a": "1"})


def test_describe_changes_names_the_parts_and_their_keys():
    saved = {"code": {"a.py": "1", "b.py": "2"}, "source": "x.zip", "format": 1}
    current = {"code": {"a.py": "1", "b.py": "3", "c.py": "4"}, "source": "y.zip", "format": 1}
    assert fingerprints.describe_changes(saved, current) == "code (b.py, c.py), source"
    assert fingerprints.describe_changes(current, current) == ""
    # A stored value of the wrong shape: everything differs.
    assert fingerprints.describe_changes("garbage", {"code": {}, "format": 1}) == "code, format"


def _package(root, files):
    package = root / "animalcam"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return package


def test_imported_modules_follow_every_kind_of_import(tmp_path):
    package = _package(
        tmp_path,
        {
            "__init__.py": "",
            "top.py": """
                import json
                import animalcam.plain
                from animalcam import named, not_a_module
                from . import relative
                def later():
                    from animalcam.sub.inner import thing
            """,
            "plain.py": "from animalcam.leaf import x\n",
            "named.py": "",
            "relative.py": "",
            "leaf.py": "",
            "sub/__init__.py": "",
            "sub/inner.py": "from ..leaf import y\n",
            "unused.py": "",
        },
    )
    assert fingerprints.imported_modules(package / "top.py", package) == {
        "",
        "plain",
        "named",
        "relative",
        "leaf",
        "sub",
        "sub.inner",
    }
    digests = fingerprints.code_digest("plain", package_dir=package)
    assert sorted(digests) == ["__init__.py", "leaf.py", "plain.py"]
    before = digests["leaf.py"]
    (package / "leaf.py").write_text("# changed\n")
    assert fingerprints.code_digest("plain", package_dir=package)["leaf.py"] != before


def test_the_download_stamp_covers_what_download_imports():
    digests = fingerprints.code_digest("download")
    assert {"download.py", "archives.py", "params.py", "__init__.py"} <= set(digests)
    assert "training.py" not in digests
